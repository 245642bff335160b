"""Quality benchmark: MSBReg against BYOL, SimCLR, VICReg, Barlow Twins and the ablation of its
three forces, on real blood cells (PBC, ``../shared/data/pbc128``), at equal cost, over seeds.

Protocol
--------
* A fixed, stratified split of PBC by file-name hash (seed 0): ``pretrain`` 70 % (used *without
  labels* for pretraining, and with labels only to fit the linear / kNN probes), ``val`` 10 %
  (tuning: ``--eval-on val``), ``test`` 20 % (never seen in pretraining or tuning; reported).
* Every row: the ``blood_smear`` recipe (resnet18 at 64 px), the same views and optimiser, and
  the same image-view budget (``--steps`` × ``--views-per-step``; each row's batch × views must
  equal it, checked for every row before any training). Only the method and its own settings
  (``TUNED``, chosen on ``val``; docs/tuning.md says how many tuning runs each method had) differ.
* Frozen features, cellssl's own evaluation code: 8-way 1/5/10-shot SimpleShot episodes (15
  queries) on the evaluated split; a logistic-regression linear probe and a kNN (k=20, T=0.07)
  probe fitted on ``pretrain`` and tested on the evaluated split. Reference rows: raw pixels
  (16×16×3) and random-init resnet18.
* ``--seeds N``: N pretraining seeds per row; mean ± 95 % t-interval over seeds.
* Resumable per row and seed: finished results live in ``--store`` (default docs/results.json)
  under a key of every setting that matters; a re-run skips them, so a long benchmark can be
  completed in pieces (``--rows`` picks rows), and an interrupted pretraining run resumes from
  its checkpoint.

    python benchmarks/quality.py --quick                    # a few minutes: 1 seed, tiny budget
    python benchmarks/quality.py                            # full CPU run: 400 steps, 2 seeds
    python benchmarks/quality.py --rows MSBReg,VICReg --seeds 3
    python benchmarks/quality.py --grid benchmarks/tuning.yaml --eval-on val --steps 200 --seeds 1 \\
        --store docs/tuning.json --out docs/tuning.md       # tuning on val

Writes ``--out`` (default docs/results.md) with the tables, commands, machine and date, plots
next to it, and keeps a hand-written ``## Analysis`` section across re-runs. Cite PBC: Acevedo
et al., Data in Brief 30 (2020), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Each method's own settings, chosen on the val split (docs/tuning.md, with the number of tuning
# runs each method had). MSBReg's live in recipes/blood_smear.yaml (what users get).
TUNED: dict[str, list[str]] = {
    "msbreg": [],  # the blood_smear recipe is MSBReg's tuned setting (4 views x 64 images, weak colour)
    # the baselines keep their own 2 views x 128 images (what their papers and cellssl's recipes use);
    # the weak colour jitter tuned on val (for MSBReg and VICReg, docs/tuning.md) is shared by all
    "byol": ["train.batch_size=128", "views.n_views=2"],
    "simclr": ["train.batch_size=128", "views.n_views=2"],
    "vicreg": ["train.batch_size=128", "views.n_views=2"],
    "barlow": ["train.batch_size=128", "views.n_views=2"],
}

# row name -> what to train ("raw"/"random" are the untrained references)
ROWS: dict[str, dict] = {
    "raw pixels (16×16×3)": {"kind": "raw"},
    "random-init resnet18": {"kind": "random"},
    "MSBReg": {"method": "msbreg"},
    "MSBReg, old forms (same-view centroid, stacked SV)": {"method": "msbreg",
                                                            "overlay": "recipes/ablation/old_forms.yaml"},
    "BYOL": {"method": "byol"},
    "SimCLR": {"method": "simclr"},
    "VICReg": {"method": "vicreg"},
    "Barlow Twins": {"method": "barlow"},
    "ablation: centroid only (= BYOL, M views)": {"method": "msbreg", "overlay": "recipes/ablation/centroid.yaml"},
    "ablation: centroid + SV": {"method": "msbreg", "overlay": "recipes/ablation/centroid_sv.yaml"},
    "ablation: centroid + Brownian": {"method": "msbreg", "overlay": "recipes/ablation/centroid_bd.yaml"},
}
ABLATION_FULL = "MSBReg"  # the ablation's "all three forces" row is the MSBReg row
METRICS = ["linear", "knn", "1shot", "5shot", "10shot"]


def make_split(src: Path, work: Path, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, Path]:
    """Symlink a stratified split of a class-folder dataset into ``work/{pretrain,val,test}``.

    Assignment is by a hash of (seed, file name), so it is fixed, and independent of file order.
    """
    parts = {name: work / name for name in ("pretrain", "val", "test")}
    marker = work / ".complete"
    if marker.exists():
        return parts
    cuts = np.cumsum(fractions)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif", ".tiff"))
        keyed = sorted(files, key=lambda f: hashlib.sha1(f"{seed}:{f.name}".encode()).hexdigest())
        n = len(keyed)
        bounds = [0] + [int(round(c * n)) for c in cuts]
        for (name, folder), lo, hi in zip(parts.items(), bounds[:-1], bounds[1:]):
            d = folder / cls.name
            d.mkdir(parents=True, exist_ok=True)
            for f in keyed[lo:hi]:
                link = d / f.name
                if not link.exists():
                    os.symlink(f.resolve(), link)
    marker.write_text("ok")
    return parts


RAW_PIXELS = "pixels:16"  # the raw-pixel row: images area-averaged to 16×16 (cellssl's baseline spec)


def evaluate(train_fs, test_fs, episodes: int) -> dict:
    """Few-shot (on test), linear probe and kNN (train → test) for one feature extractor."""
    from cellssl.eval.fewshot import run_fewshot
    from cellssl.eval.knn import knn_eval
    from cellssl.eval.linear import linear_probe

    fs = run_fewshot(test_fs, ways=8, shots=(1, 5, 10), queries=15, episodes=episodes, seed=0)
    lin = linear_probe(train_fs, test_fs, seed=0)
    kn = knn_eval(train_fs, test_fs, k=20, temperature=0.07)
    row = {"linear": lin["accuracy"], "knn": kn["accuracy"]}
    for k in ("1", "5", "10"):
        row[f"{k}shot"] = fs["results"][k]["mean"]
        row[f"{k}shot_ci"] = fs["results"][k]["ci95"]
    return row


def row_overrides(spec: dict, args) -> list[str]:
    """The recipe overrides of one row: the method's tuned settings, the row's own, then what the command forces."""
    method = spec["method"]
    shared = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    shared += [f"views.n_views={args.n_views}"] if args.n_views else []
    return [f"method.name={method}", f"data.image_size={args.image_size}", f"model.backbone={args.backbone}",
            *TUNED.get(method, []), *spec.get("set", []), *shared, *args.set]


def row_recipe(spec: dict, args, run_overrides: tuple[str, ...] = ()):
    """The recipe one row trains with: ``--recipe``, the run's own overrides, the row's, its overlay."""
    from cellssl.config import load_recipe

    overlay = spec.get("overlay")
    return load_recipe(args.recipe, [*run_overrides, *row_overrides(spec, args)],
                       [str(REPO / overlay)] if overlay else [])


def check_equal_cost(rows: dict[str, dict], args) -> None:
    """Exit before any training if a row's batch × views differs from ``--views-per-step``."""
    for name, spec in rows.items():
        if "method" not in spec:
            continue
        recipe = row_recipe(spec, args)
        per_step = recipe.train.batch_size * recipe.views.n_views
        if per_step != args.views_per_step:
            sys.exit(f"error: row '{name}' trains on {recipe.train.batch_size} images x {recipe.views.n_views} views "
                     f"= {per_step} image-views per step, not the budget's {args.views_per_step} (--views-per-step)")


def row_key(name: str, spec: dict, args) -> str:
    """Hash of everything that changes a row's numbers (not the seed)."""
    overlay = spec.get("overlay")
    text = (REPO / overlay).read_text() if overlay else ""
    untrained = [args.image_size, args.backbone] + ([RAW_PIXELS] if spec.get("kind") == "raw" else [])
    blob = [spec.get("kind", "ssl"), row_overrides(spec, args) if "method" in spec else untrained,
            text, args.recipe, (REPO / "recipes" / f"{args.recipe}.yaml").read_text() if "method" in spec else "",
            args.steps, args.eval_on, args.episodes, args.probe_max]
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


def pretrain(spec: dict, seed: int, parts: dict[str, Path], args, key: str) -> tuple[Path, dict]:
    """Pretrain one row's model for one seed (resumes an interrupted run); returns (checkpoint, done info)."""
    from cellssl.engine.fit import fit

    out = Path(args.work) / "runs" / f"{spec['method']}-{key}-s{seed}"
    ckpt = out / "checkpoints" / "last.pt"
    done_file = out / "done.json"
    if done_file.exists() and ckpt.exists():
        return ckpt, json.loads(done_file.read_text())
    recipe = row_recipe(spec, args, (
        f"data.path={parts['pretrain']}", f"train.max_steps={args.steps}", f"train.seed={seed}", f"train.out={out}",
        f"train.device={args.device}", "train.checkpoint_every=50", f"train.progress={str(args.progress).lower()}",
        f"data.num_workers={args.workers}",
    ))
    per_step = recipe.train.batch_size * recipe.views.n_views
    t0 = time.monotonic()
    res = fit(recipe, resume=ckpt.exists())
    info = {"steps": res.step, "minutes": (time.monotonic() - t0) / 60, "stopped": res.stopped_early,
            "batch": recipe.train.batch_size, "n_views": recipe.views.n_views, "image_views": res.step * per_step}
    done_file.write_text(json.dumps(info))
    return ckpt, info


def features_for(spec_str: str, parts: dict[str, Path], args):
    """Probe (pretrain part) and evaluation features; a checkpoint is read at its own image size."""
    from cellssl.eval.features import load_features

    size = args.image_size if spec_str.startswith(("random:", "pixels:")) else None
    kw = dict(image_size=size, device=args.device, batch_size=256, progress=False)
    train = load_features(spec_str, parts["pretrain"], max_per_class=args.probe_max, **kw)
    test = load_features(spec_str, parts[args.eval_on], **kw)
    return train, test


def run_seed(name: str, spec: dict, seed: int, parts, args, key: str) -> dict:
    """Train (if needed) and evaluate one row for one seed."""
    if spec.get("kind") == "raw":  # the pixels:16 baseline spec of every evaluation command
        return evaluate(*features_for(RAW_PIXELS, parts, args), args.episodes)
    if spec.get("kind") == "random":
        tr, te = features_for(f"random:{args.backbone}", parts, args)
        return evaluate(tr, te, args.episodes)
    ckpt, info = pretrain(spec, seed, parts, args, key)
    tr, te = features_for(str(ckpt), parts, args)
    row = evaluate(tr, te, args.episodes)
    row.update(info, run=str(ckpt.parent.parent))
    return row


def t95(n: int) -> float:
    """Two-sided 95 % Student-t quantile for n − 1 degrees of freedom."""
    return {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776, 6: 2.571}.get(n, 2.0)


def summarise(rows: list[dict]) -> dict:
    """Mean and 95 % t-interval over seeds per metric; with one seed, the episode CI for few-shot."""
    out: dict = {}
    for k in METRICS:
        v = np.array([r[k] for r in rows], dtype=float)
        if len(v) > 1:
            out[k] = (float(v.mean()), float(t95(len(v)) * v.std(ddof=1) / math.sqrt(len(v))))
        else:
            out[k] = (float(v[0]), float(rows[0].get(f"{k}_ci", 0.0)) if "shot" in k else 0.0)
        out[f"{k}_seeds"] = [float(x) for x in v]
    out["n_seeds"] = len(rows)
    out["minutes"] = float(np.mean([r.get("minutes", 0.0) for r in rows]))
    out["steps"] = int(np.mean([r.get("steps", 0) for r in rows]))
    out["shape"] = f"{rows[0]['batch']}×{rows[0]['n_views']}" if "batch" in rows[0] else ""
    return out


def fmt(v: tuple[float, float]) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}" if v[1] else f"{v[0]:.3f}"


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| features | linear acc | kNN acc | 8-way 1-shot | 8-way 5-shot | 8-way 10-shot | seeds | steps | "
             "images×views | min/run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {fmt(r['linear'])} | {fmt(r['knn'])} | {fmt(r['1shot'])} | {fmt(r['5shot'])} | "
                     f"{fmt(r['10shot'])} | {r['n_seeds']} | {r.get('steps') or '–'} | {r.get('shape') or '–'} | "
                     f"{r.get('minutes', 0):.1f} |")
    return lines


def seed_table(results: dict[str, dict]) -> list[str]:
    lines = ["| features | linear per seed | 5-shot per seed |", "|---|---|---|"]
    for name, r in results.items():
        if r["n_seeds"] > 1:
            lines.append(f"| {name} | {', '.join(f'{x:.3f}' for x in r['linear_seeds'])} | "
                         f"{', '.join(f'{x:.3f}' for x in r['5shot_seeds'])} |")
    return lines


def plots(results: dict[str, dict], runs: dict[str, Path], out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellssl.engine.logger import read_metrics

    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ys = [r[f"{k}shot"][0] for k in (1, 5, 10)]
        es = [r[f"{k}shot"][1] for k in (1, 5, 10)]
        ax.errorbar([1, 5, 10], ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel("shots per class (8-way)")
    ax.set_ylabel("accuracy")
    ax.set_xticks([1, 5, 10])
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / f"{stem}_shots.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)
    runs = {k: v for k, v in runs.items() if v.is_dir()}
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for name, run in runs.items():
            rows = read_metrics(run)
            if not rows:
                continue
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
            rk = [r for r in rows if "eff_rank" in r]
            axes[1].plot([r["step"] for r in rk], [r["eff_rank"] for r in rk], label=name)
        axes[0].set_title("training loss")
        axes[1].set_title("effective rank of the embeddings (of 256)")
        for a in axes:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        p = out_dir / f"{stem}_training.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        files.append(p.name)
        msb = runs.get("MSBReg")
        if msb is not None and read_metrics(msb):
            rows = read_metrics(msb)
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for k in ("loss_centroid", "loss_sv", "loss_brownian"):
                ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
            ax.set_xlabel("step")
            ax.set_title("MSBReg loss terms")
            ax.legend()
            ax.grid(alpha=0.3)
            fig.tight_layout()
            p = out_dir / f"{stem}_msbreg_terms.png"
            fig.savefig(p, dpi=120)
            plt.close(fig)
            files.append(p.name)
    return files


def load_grid(path: str) -> dict[str, dict]:
    """Rows from a YAML list of ``{name, method, overlay?, set?: [KEY=VALUE, ...]}``."""
    import yaml

    rows = {}
    for item in yaml.safe_load(Path(path).read_text()):
        spec = {"method": item["method"], "set": list(item.get("set", []))}
        if item.get("overlay"):
            spec["overlay"] = item["overlay"]
        rows[item["name"]] = spec
    return rows


def write_report(store: dict, rows: dict[str, dict], args, out_md: Path, total_min: float) -> None:
    """Tables and plots of every stored row that matches the current settings."""
    import torch

    results, runs = {}, {}
    for name, spec in rows.items():
        entry = store.get(name)
        if not entry or entry["key"] != row_key(name, spec, args) or not entry["seeds"]:
            continue
        seeds = [entry["seeds"][s] for s in sorted(entry["seeds"], key=int)]
        results[name] = summarise(seeds)
        if seeds[0].get("run"):
            runs[name] = Path(seeds[0]["run"])
    main_rows = {k: v for k, v in results.items() if not k.startswith("ablation:")}
    ablation = {k: v for k, v in results.items() if k.startswith("ablation:")}
    if ablation and ABLATION_FULL in results:
        ablation["ablation: centroid + SV + Brownian (= MSBReg)"] = results[ABLATION_FULL]
    files = plots(main_rows, {k: v for k, v in runs.items() if k in main_rows}, out_md.parent, out_md.stem)
    cmd = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    views = args.steps * args.views_per_step
    lines = [
        f"# Quality benchmark{' (quick)' if args.quick else ''}: PBC blood cells",
        "",
        f"- last command: `{cmd.strip()}` ({total_min:.0f} min); rows and seeds finished earlier are kept in "
        f"`{args.store}` and skipped",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, device {args.device}",
        f"- data: PBC (Acevedo et al., Data in Brief 30, 2020, CC BY 4.0), 128 px crops in `{args.data}`; "
        f"split by file-name hash: pretrain 70 % (no labels in pretraining), val 10 %, test 20 %; "
        f"evaluated on **{args.eval_on}**",
        f"- pretraining: `{args.recipe}` recipe, {args.backbone} at {args.image_size} px, "
        f"**{args.steps} steps of {args.views_per_step} image-views = {views:,} image-views per run** for every "
        f"method (batch × views in the table); each method's own settings as tuned on val (`TUNED` in this "
        f"script; MSBReg's are the recipe's)"
        + (f"; extra overrides: {args.set}" if args.set else ""),
        f"- evaluation: 8-way 1/5/10-shot SimpleShot episodes on {args.eval_on} (15 queries, {args.episodes} "
        f"episodes); linear probe (logistic regression on L2-normalised, standardised features, C by "
        f"validation) and kNN (k=20, T=0.07) fitted on the pretrain part"
        + (f" ({args.probe_max} per class)" if args.probe_max else "") + f", tested on {args.eval_on}",
        "- ± is a 95 % interval: Student-t over seeds when there are several, else over few-shot episodes; "
        "`min/run` is wall-clock and depends on what else the machine ran",
        "",
        *table(main_rows),
        "",
    ]
    if ablation:
        lines += ["## Ablation: each force on and off", "", *table(ablation), ""]
    st = seed_table(results)
    if len(st) > 2:
        lines += ["## Per seed", "", *st, ""]
    lines += [*[f"![{f}]({f})" for f in files], ""]
    keep = ""  # a hand-written "## Analysis" section survives re-runs
    if out_md.exists() and "\n## Analysis" in out_md.read_text():
        keep = out_md.read_text()[out_md.read_text().index("\n## Analysis"):]
    out_md.write_text("\n".join(lines) + keep)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget, 1 seed, main rows only (a few minutes)")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pbc128"))
    ap.add_argument("--work", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--out", default=None, help="markdown report (default docs/results.md; quick: WORK/results.md)")
    ap.add_argument("--store", default=None, help="JSON of finished rows (default: the report's name with .json)")
    ap.add_argument("--recipe", default="blood_smear")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--views-per-step", type=int, default=256,
                    help="the equal cost: batch size × views per step of every row (e.g. 128 × 2 or 64 × 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="force this batch for every row (default: each's)")
    ap.add_argument("--n-views", type=int, default=None, help="force this view count for every row (default: each's)")
    ap.add_argument("--steps", type=int, default=400, help="pretraining steps per run (the equal budget)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--probe-max", type=int, default=None, help="at most this many probe images per class")
    ap.add_argument("--rows", default=None, help="comma-separated row names or method names (default all)")
    ap.add_argument("--grid", default=None, help="YAML list of rows to run instead of the built-in ones")
    ap.add_argument("--eval-on", choices=["test", "val"], default="test", help="val for tuning")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every row")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"error: no PBC data at {data}; pass --data (a folder with one sub-folder per class)")
    if args.quick:
        args.steps, args.seeds, args.episodes, args.probe_max = min(args.steps, 20), 1, 200, args.probe_max or 150
    default_md = Path(args.work) / "results.md" if args.quick else REPO / "docs" / "results.md"
    out_md = Path(args.out) if args.out else default_md
    out_md.parent.mkdir(parents=True, exist_ok=True)
    args.store = args.store or str(out_md.with_suffix(".json"))
    store_path = Path(args.store)
    store = json.loads(store_path.read_text()) if store_path.exists() else {}
    rows = load_grid(args.grid) if args.grid else dict(ROWS)
    todo = dict(rows)
    if args.quick:
        todo = {k: v for k, v in todo.items() if not k.startswith("ablation:")}
    if args.rows:
        keep = {m.strip() for m in args.rows.split(",")}
        todo = {k: v for k, v in todo.items() if k in keep or v.get("method") in keep}
    check_equal_cost(todo, args)
    parts = make_split(data, Path(args.work) / "split")
    t_start = time.monotonic()
    print("split: " + ", ".join(f"{k}={sum(1 for _ in v.rglob('*.*'))}" for k, v in parts.items()))
    print("\n".join(table({})[:2]), flush=True)
    for name, spec in todo.items():
        key = row_key(name, spec, args)
        entry = store.get(name)
        if not entry or entry.get("key") != key:
            entry = store[name] = {"key": key, "spec": spec, "seeds": {}}
        n_seeds = 1 if "kind" in spec else args.seeds
        for seed in range(n_seeds):
            if str(seed) in entry["seeds"]:
                continue
            entry["seeds"][str(seed)] = run_seed(name, spec, seed, parts, args, key)
            store_path.write_text(json.dumps(store, indent=1))  # after every run: resumable
        seeds = [entry["seeds"][s] for s in sorted(entry["seeds"], key=int)]
        print("\n".join(table({name: summarise(seeds)})[2:]), flush=True)
    total_min = (time.monotonic() - t_start) / 60
    write_report(store, rows, args, out_md, total_min)
    print(f"\nwrote {out_md} and {store_path} ({total_min:.1f} min)")


if __name__ == "__main__":
    main()
