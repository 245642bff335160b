"""Quality benchmark: MSBReg against BYOL, SimCLR, VICReg, Barlow Twins and the paper's ablation,
on real blood cells (PBC, ``../shared/data/pbc128``), under the same budget.

Protocol
--------
* A fixed, stratified split of PBC by file name (seed 0): ``pretrain`` 70 % (used *without labels*
  for pretraining, and with labels only to fit the linear / kNN probes), ``val`` 10 % (for tuning:
  ``--eval-on val``), ``test`` 20 % (never seen in pretraining; the reported numbers).
* Every method: the ``blood_smear`` recipe (resnet18, 64 px by default), the same views, the
  same optimiser and schedule, the same number of image-views (``--views-budget``) and the same
  wall-clock cap (``--minutes``); only ``method.*`` differs.
* Frozen features are evaluated with cellssl's own evaluation code: 8-way 1/5/10-shot SimpleShot
  episodes (15 queries) on ``test``, a logistic-regression linear probe (pretrain → test) and a
  kNN (k=20, T=0.07) probe. Reference rows: raw pixels (16×16×3) and random-init resnet18.
* Several seeds: mean ± 95 % CI over seeds (t-interval); one seed: the episode CI.

    python benchmarks/quality.py --quick            # < 10 min on 2 CPU cores
    python benchmarks/quality.py                    # full CPU run (about 2 h), writes docs/results.md
    python benchmarks/quality.py --device cuda --image-size 96 --minutes 10 --seeds 3

Writes ``--out`` (default ``docs/results.md``) with the tables, the command, the machine and the
date, and plots next to it (accuracy vs shots per method; loss terms and effective rank over
training). Cite PBC: Acevedo et al., Data in Brief 30 (2020), CC BY 4.0.
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

METHODS = {
    # row name: (method name, overlay or None, extra overrides)
    "MSBReg": ("msbreg", None, []),
    "BYOL": ("byol", None, []),
    "SimCLR": ("simclr", None, []),
    "VICReg": ("vicreg", None, []),
    "Barlow Twins": ("barlow", None, []),
}
ABLATION = {
    "BYOL, M views (per-view targets)": ("msbreg", "recipes/ablation/byol_mviews.yaml", []),
    "+ centroid": ("msbreg", "recipes/ablation/centroid.yaml", []),
    "+ centroid + singular value": ("msbreg", "recipes/ablation/centroid_sv.yaml", []),
    # the full method is the MSBReg row's run (same settings as recipes/ablation/centroid_sv_bd.yaml)
    "+ centroid + SV + Brownian (= MSBReg)": ("msbreg", None, []),
}


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


def raw_pixel_features(folder: Path, size: int = 16):
    """Raw pixels, resized to ``size``×``size``×3 and flattened: a FeatureSet."""
    from PIL import Image

    from cellssl.eval.features import FeatureSet

    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    feats, labels, paths = [], [], []
    for c, name in enumerate(classes):
        for f in sorted((folder / name).iterdir()):
            img = Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR)
            feats.append(np.asarray(img, dtype=np.float32).reshape(-1) / 255.0)
            labels.append(c)
            paths.append(str(f))
    return FeatureSet(np.stack(feats), np.asarray(labels), paths, classes, {"spec": "raw pixels"}, str(folder))


def evaluate(train_fs, test_fs, args) -> dict:
    """Few-shot (on test), linear probe and kNN (train → test) for one feature extractor."""
    from cellssl.eval.fewshot import run_fewshot
    from cellssl.eval.knn import knn_eval
    from cellssl.eval.linear import linear_probe

    fs = run_fewshot(test_fs, ways=8, shots=(1, 5, 10), queries=15, episodes=args.episodes, seed=0)
    lin = linear_probe(train_fs, test_fs, seed=0)
    kn = knn_eval(train_fs, test_fs, k=20, temperature=0.07)
    row = {"linear": lin["accuracy"], "knn": kn["accuracy"]}
    for k in ("1", "5", "10"):
        row[f"{k}shot"] = fs["results"][k]["mean"]
        row[f"{k}shot_ci"] = fs["results"][k]["ci95"]
    return row


def features_for(spec: str, parts: dict[str, Path], args, probe_max: int | None):
    from cellssl.eval.features import load_features

    kw = dict(image_size=args.image_size, device=args.device, batch_size=256, progress=False)
    train = load_features(spec, parts["pretrain"], max_per_class=probe_max, **kw)
    test = load_features(spec, parts[args.eval_on], **kw)
    return train, test


def pretrain(name: str, method: str, overlay: str | None, extra: list[str], seed: int, parts, args) -> Path:
    from cellssl.config import load_recipe
    from cellssl.engine.fit import fit

    key = hashlib.sha1(json.dumps([method, overlay, extra, args.set]).encode()).hexdigest()[:8]
    out = Path(args.work) / "runs" / f"{method}-{key}-s{seed}"
    ckpt = out / "checkpoints" / "last.pt"
    steps = max(1, args.views_budget // (args.batch_size * args.n_views))
    overrides = [
        f"data.path={parts['pretrain']}", f"data.image_size={args.image_size}", f"method.name={method}",
        f"train.batch_size={args.batch_size}", f"views.n_views={args.n_views}", f"train.max_steps={steps}",
        f"train.max_minutes={args.minutes}", f"train.seed={seed}", f"train.out={out}",
        f"train.device={args.device}", "train.checkpoint_every=200", f"train.progress={str(args.progress).lower()}",
        f"data.num_workers={args.workers}", f"model.backbone={args.backbone}",
    ] + extra + list(args.set)
    recipe = load_recipe(args.recipe, overrides, [str(REPO / overlay)] if overlay else [])
    done = ckpt.exists() and json.loads((out / "done.json").read_text()) if (out / "done.json").exists() else False
    if not done:
        t0 = time.monotonic()
        res = fit(recipe, resume=ckpt.exists())
        (out / "done.json").write_text(json.dumps({"steps": res.step, "minutes": (time.monotonic() - t0) / 60,
                                                   "stopped": res.stopped_early}))
    return ckpt


def summarise(rows: list[dict]) -> dict:
    """Mean and 95 % t-interval over seeds; with one seed, the episode CI for few-shot."""
    keys = ["linear", "knn", "1shot", "5shot", "10shot"]
    out = {}
    for k in keys:
        v = np.array([r[k] for r in rows], dtype=float)
        if len(v) > 1:
            t = {2: 12.706, 3: 4.303, 4: 3.182, 5: 2.776}.get(len(v), 2.0)
            out[k] = (float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v))))
        else:
            out[k] = (float(v[0]), float(rows[0].get(f"{k}_ci", 0.0)) if "shot" in k else 0.0)
    out["n_seeds"] = len(rows)
    out["minutes"] = float(np.mean([r.get("minutes", 0.0) for r in rows]))
    out["steps"] = int(np.mean([r.get("steps", 0) for r in rows]))
    return out


def fmt(v: tuple[float, float]) -> str:
    return f"{v[0]:.3f} ± {v[1]:.3f}" if v[1] else f"{v[0]:.3f}"


def table(results: dict[str, dict]) -> list[str]:
    lines = ["| features | linear acc | kNN acc | 8-way 1-shot | 8-way 5-shot | 8-way 10-shot | steps | min |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {fmt(r['linear'])} | {fmt(r['knn'])} | {fmt(r['1shot'])} | {fmt(r['5shot'])} | "
                     f"{fmt(r['10shot'])} | {r.get('steps', '')} | {r.get('minutes', 0):.1f} |")
    return lines


def plots(results: dict[str, dict], runs: dict[str, Path], out_dir: Path, stem: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cellssl.engine.logger import read_metrics

    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in results.items():
        ys = [r[f"{k}shot"][0] for k in (1, 5, 10)]
        es = [r[f"{k}shot"][1] for k in (1, 5, 10)]
        ax.errorbar([1, 5, 10], ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel("shots per class (8-way)")
    ax.set_ylabel("accuracy")
    ax.set_xticks([1, 5, 10])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    p = out_dir / f"{stem}_shots.png"
    fig.savefig(p, dpi=120)
    plt.close(fig)
    files.append(p.name)
    if runs:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for name, run in runs.items():
            rows = read_metrics(run)
            if not rows:
                continue
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
            rk = [r for r in rows if "eff_rank" in r]
            axes[1].plot([r["step"] for r in rk], [r["eff_rank"] for r in rk], label=name)
        axes[0].set_title("training loss")
        axes[1].set_title("effective rank of embeddings")
        for a in axes:
            a.set_xlabel("step")
            a.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        p = out_dir / f"{stem}_training.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        files.append(p.name)
        msb = [run for name, run in runs.items() if name.startswith("MSBReg")]
        if msb:
            rows = read_metrics(msb[0])
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small budget: < 10 min on 2 CPU cores")
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "pbc128"))
    ap.add_argument("--work", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--out", default=None, help="markdown report (default docs/results.md; quick: runs/quality/results.md)")
    ap.add_argument("--recipe", default="blood_smear")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--n-views", type=int, default=2)
    ap.add_argument("--views-budget", type=int, default=None, help="image-views per method (default: full 8 epochs)")
    ap.add_argument("--minutes", type=float, default=None, help="wall-clock cap per pretraining run")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--methods", default=None, help="comma-separated row names to run (default all)")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--no-reference", action="store_true", help="skip the raw-pixel and random-init rows")
    ap.add_argument("--eval-on", choices=["test", "val"], default="test", help="val for tuning")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every method")
    args = ap.parse_args()
    data = Path(args.data)
    if not data.is_dir():
        sys.exit(f"error: no PBC data at {data}; pass --data (a folder with one sub-folder per class)")
    if args.quick:
        args.views_budget = args.views_budget or 24_000
        args.minutes = args.minutes or 0.9
        args.episodes = min(args.episodes, 200)
        args.no_ablation = True
        probe_max = 150
    else:
        args.views_budget = args.views_budget or 8 * 9_570 * 2
        args.minutes = args.minutes or 12.0
        probe_max = None
    out_md = Path(args.out) if args.out else (Path(args.work) / "results.md" if args.quick else REPO / "docs" / "results.md")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    parts = make_split(data, Path(args.work) / "split")
    rows_all: dict[str, dict] = {}
    runs: dict[str, Path] = {}
    t_start = time.monotonic()

    def record(name: str, rows: list[dict]) -> None:
        rows_all[name] = summarise(rows)
        print("\n".join(table({name: rows_all[name]})[2:]), flush=True)

    # Reference rows: same evaluation code, no training.
    print(f"split: {', '.join(f'{k}={sum(1 for _ in v.rglob(chr(42) + chr(46) + chr(42)))}' for k, v in parts.items())}")
    print("\n".join(table({})[:2]))
    from cellssl.eval.features import subsample_per_class
    if not args.no_reference:
        tr_px = raw_pixel_features(parts["pretrain"])
        te_px = raw_pixel_features(parts[args.eval_on])
        if probe_max:
            tr_px = tr_px.subset(subsample_per_class(tr_px.labels, probe_max))
        record("raw pixels (16×16×3)", [evaluate(tr_px, te_px, args)])
        tr, te = features_for(f"random:{args.backbone}", parts, args, probe_max)
        record(f"random-init {args.backbone}", [evaluate(tr, te, args)])

    todo = dict(METHODS)
    if not args.no_ablation:
        todo.update({f"ablation: {k}": v for k, v in ABLATION.items()})
    if args.methods:
        keep = {m.strip() for m in args.methods.split(",")}
        todo = {k: v for k, v in todo.items() if k in keep or v[0] in keep}
    for name, (method, overlay, extra) in todo.items():
        rows = []
        for seed in range(args.seeds):
            ckpt = pretrain(name, method, overlay, extra, seed, parts, args)
            done = json.loads((ckpt.parent.parent / "done.json").read_text())
            tr, te = features_for(str(ckpt), parts, args, probe_max)
            row = evaluate(tr, te, args)
            row.update(minutes=done["minutes"], steps=done["steps"])
            rows.append(row)
            if seed == 0:
                runs[name] = ckpt.parent.parent
        record(name, rows)
    total_min = (time.monotonic() - t_start) / 60
    files = plots(rows_all, runs, out_md.parent, out_md.stem)
    cmd = "python benchmarks/quality.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    import torch

    lines = [
        f"# Quality benchmark{' (quick)' if args.quick else ''}: PBC blood cells",
        "",
        f"- command: `{cmd.strip()}`",
        f"- date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
        f"torch {torch.__version__}, device {args.device}; total {total_min:.0f} min",
        f"- data: PBC (Acevedo et al., Data in Brief 30, 2020, CC BY 4.0), 128 px crops in `{args.data}`; "
        f"split by file-name hash: pretrain 70 % (no labels in pretraining), val 10 %, test 20 %; "
        f"evaluated on **{args.eval_on}**",
        f"- pretraining: {args.recipe} recipe, {args.backbone} at {args.image_size} px, batch {args.batch_size}, "
        f"{args.n_views} views, budget {args.views_budget:,} image-views or {args.minutes} min per method "
        f"(whichever comes first), {args.seeds} seed(s); overrides: {args.set or 'none'}",
        f"- evaluation: 8-way 1/5/10-shot SimpleShot episodes on {args.eval_on} (15 queries, {args.episodes} "
        f"episodes); linear probe (logistic regression on L2-normalised, standardised features, C by "
        f"validation) and kNN (k=20, T=0.07) trained on the pretrain part"
        + (f" ({probe_max} per class)" if probe_max else "") + f", tested on {args.eval_on}",
        "- ± is a 95 % interval: over seeds when there are several, else over few-shot episodes",
        "",
        *table(rows_all),
        "",
        *[f"![{f}]({f})" for f in files],
        "",
    ]
    keep = ""  # a hand-written "## Analysis" section survives re-runs
    if out_md.exists() and "\n## Analysis" in out_md.read_text():
        keep = out_md.read_text()[out_md.read_text().index("\n## Analysis"):]
    out_md.write_text("\n".join(lines) + keep)
    (out_md.with_suffix(".json")).write_text(json.dumps(rows_all, indent=2))
    print(f"\nwrote {out_md} ({total_min:.1f} min)")


if __name__ == "__main__":
    main()
