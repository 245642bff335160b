"""Quality benchmark: MSBReg against BYOL, SimCLR, VICReg, Barlow Twins and the ablation of its
three forces, on real blood cells (PBC, ``../shared/data/pbc128``) and on another lab's cells
(``../shared/data/jtsc128``), at equal wall-clock or equal image-views, over seeds.

Protocol
--------
* A fixed, stratified split of PBC by file-name hash (seed 0): ``pretrain`` 70 % (used *without
  labels* for pretraining, and with labels only to fit the linear / kNN probes), ``val`` 10 %
  (tuning: ``--eval-on val``), ``test`` 20 % (never seen in pretraining or tuning; reported).
* Every row: the ``blood_smear`` recipe (resnet18 at 64 px), the same views and optimiser; only the
  method and its own settings (``TUNED`` in ``benchmarks/common.py``, chosen on ``val``;
  docs/tuning.md says how many tuning runs each method had) differ. A row ``recipe:
  blood_smear_<method>`` (every ``recipes/blood_smear_*.yaml`` shipped beside MSBReg's) trains with
  that recipe as it is.
* The budget, one of two per invocation (both are kept in ``--store``; the report prints both tables):
  ``--minutes M``, the headline: every row gets the same wall-clock (the recipe's ``train.max_minutes``
  schedule: the first steps are timed, then warm-up, cosine LR and EMA are sized to the steps that
  fit); each row reports the steps it ran, image-views/s and minutes. ``--steps N`` (default): the same
  image-views per row (``--steps`` × ``--views-per-step``; each row's batch × views must equal it,
  checked for every row before any training).
* Frozen features, cellssl's own evaluation code: 8-way 1/5/10-shot SimpleShot episodes (15
  queries) on the evaluated split; a logistic-regression linear probe and a kNN (k=20, T=0.07)
  probe fitted on ``pretrain`` and tested on the evaluated split. Reference rows: raw pixels
  (16×16×3) and random-init resnet18. The features are averaged over each image's 8 rotations and
  flips (``--tta``, default ``auto``: the checkpoint recipe's ``eval.tta``; raw pixels stay plain);
  ``--tta none`` gives the plain features that results before 2026-12-02 used (their stored rows
  match it).
* Cross-lab columns (``--cross-lab``, default ``../shared/data/jtsc128``: 284 white cells, 4 of PBC's
  classes, another lab, microscope and stain; ``benchmarks/crosslab.py``): 4-way 1/5-shot within it
  (95 % interval over episodes), and zero-label transfer: a linear probe fitted on the pretrain part's
  images of the 4 matching classes, tested on all of jtsc128 (accuracy and balanced accuracy). The
  same after ``cellssl adapt`` on jtsc128's unlabelled images (``--adapt``): ``--bn-only`` (AdaBN) and
  continued SSL (``--adapt-steps`` / ``--adapt-minutes``).
* ``--eval-on val`` adds, and ``--grid`` ranks rows by, the tuning objective: the mean of PBC val
  8-way 5-shot and jtsc128 4-way 5-shot. jtsc128 is the only cross-lab set in ``../shared/data``, so the
  cross-lab half of the objective is measured on the set that is also reported; PBC test never tunes.
* ``--seeds N``: N pretraining seeds per row; mean ± 95 % t-interval over seeds.
* Resumable per row, budget and seed: finished results live in ``--store`` (default docs/results.json)
  under a key of every setting that matters; a re-run skips them, so a long benchmark can be
  completed in pieces (``--rows`` picks rows), and an interrupted pretraining run resumes from
  its checkpoint. Adaptation results are added to stored seeds when missing.

    python -m benchmarks.quality --quick                    # a few minutes: 1 seed, tiny budget
    python -m benchmarks.quality --minutes 20               # the headline: 20 min per run, 2 seeds
    python -m benchmarks.quality                            # the second table: 400 steps, 2 seeds
    python -m benchmarks.quality --rows MSBReg,VICReg --seeds 3 \\
        --variant "strong colour=recipes/ablation/strong_colour.yaml"   # each row and its variant
    python -m benchmarks.quality --grid benchmarks/tuning_C_views.yaml --eval-on val --minutes 10 --seeds 1 \\
        --store docs/tuning/tuning_C.json --out /tmp/tuning_C.md   # tuning on val + jtsc128, ranked

Writes ``--out`` (default docs/results.md) with the tables, commands, machine and date, plots
next to it, and keeps a hand-written ``## Analysis`` section across re-runs. Cite PBC: Acevedo
et al., Data in Brief 30 (2020), CC BY 4.0; jtsc128: Zheng et al., Micron 107 (2018), images from
Jiangxi Tecom Science Corporation (GPL-3.0).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

from benchmarks.common import (
    ADAPT_KINDS,
    ADAPT_LABELS,
    DEFAULT_CROSS_LAB,
    DEFAULT_PBC,
    RAW_PIXELS,
    REPO,
    TUNED,
    XL_METRICS,
    command_line,
    evaluate,
    extractor_for,
    features_for,
    fmt,
    machine_line,
    make_split,
    require_folder,
    run_alone_notice,
    seed_table,
    summarise,
    table,
    write_markdown,
)
from cellssl.config import TTA_CHOICES
from cellssl.engine.logger import read_metrics
from cellssl.plots import pyplot, save_figure

# row name -> what to train ("raw"/"random" are the untrained references). A row may name its own
# ``recipe`` (trained as it is, without TUNED), ``overlays`` (YAML files merged over the recipe) and
# ``set`` (recipe overrides).
ROWS: dict[str, dict] = {
    "raw pixels (16×16×3)": {"kind": "raw"},
    "random-init resnet18": {"kind": "random"},
    "MSBReg": {"method": "msbreg"},
    "MSBReg, old forms (same-view centroid, stacked SV)": {"method": "msbreg",
                                                            "overlays": ["recipes/ablation/old_forms.yaml"]},
    "BYOL": {"method": "byol"},
    "SimCLR": {"method": "simclr"},
    "VICReg": {"method": "vicreg"},
    "Barlow Twins": {"method": "barlow"},
    "ablation: centroid only (= BYOL, M views)": {"method": "msbreg",
                                                   "overlays": ["recipes/ablation/centroid.yaml"]},
    "ablation: centroid + SV": {"method": "msbreg", "overlays": ["recipes/ablation/centroid_sv.yaml"]},
    "ablation: centroid + Brownian": {"method": "msbreg", "overlays": ["recipes/ablation/centroid_bd.yaml"]},
}
# how the report names the features' orientation averaging (--tta; cellssl.models.orientation)
TTA_LINES = {
    "auto": "features averaged over each image's 8 rotations and flips (`eval.tta: auto`: every trained row's "
            "views rotate and flip; raw pixels plain)",
    "dihedral": "features averaged over each image's 8 rotations and flips (`--tta dihedral`, raw pixels too)",
    "none": "plain features, one pass per image (`--tta none`)",
}
ABLATION_FULL = "MSBReg"  # the ablation's "all three forces" row is the MSBReg row


# ---- budgets: equal minutes (headline) or equal image-views ---------------------------------------
def run_budget(args) -> dict:
    """This invocation's budget per run: ``{"minutes": M}`` (``--minutes``) or ``{"steps": N}``."""
    return {"minutes": float(args.minutes)} if args.minutes else {"steps": int(args.steps)}


def budget_label(budget: dict) -> str:
    """``"20 min"`` or ``"400 steps"``: the budget's name in the store and the report."""
    return f"{budget['minutes']:g} min" if "minutes" in budget else f"{budget['steps']} steps"


def budget_overrides(budget: dict) -> list[str]:
    """Recipe overrides of a budget: a wall-clock budget sizes the schedule (``train.max_minutes``,
    capped at the recipe's epochs); an image-view budget fixes ``train.max_steps``."""
    if "minutes" in budget:
        return [f"train.max_minutes={budget['minutes']:g}", "train.max_steps=null"]
    return [f"train.max_steps={budget['steps']}", "train.max_minutes=null"]


def store_name(name: str, budget: dict | None) -> str:
    """Key of a row's results under one budget in ``--store``: ``"<row> @ <budget label>"``
    (``"<row> @ untrained"`` for the rows without training, shown in every budget's table)."""
    return f"{name} @ {budget_label(budget) if budget else 'untrained'}"


def budget_order(label: str) -> tuple[int, float]:
    """Sort key: minute budgets (the headline) first, then step budgets, each by size."""
    value, unit = label.split(" ", 1)
    return (0 if unit == "min" else 1, float(value))


# ---- rows ---------------------------------------------------------------------------------------------
def spec_overlays(spec: dict, args) -> list[str]:
    """A row's overlay files (its own, then ``--recipe-overlay``), relative to the repository or absolute."""
    own = spec.get("overlays") or ([spec["overlay"]] if spec.get("overlay") else [])
    return [*own, *getattr(args, "recipe_overlay", [])]


def recipe_rows(recipes_dir: Path = REPO / "recipes", base: str = "blood_smear") -> dict[str, dict]:
    """A row per shipped baseline recipe ``<base>_<method>.yaml`` (trained as it is, no TUNED)."""
    import yaml

    rows = {}
    for path in sorted(recipes_dir.glob(f"{base}_*.yaml")):
        method = (yaml.safe_load(path.read_text()) or {}).get("method", {}).get("name")
        if method:
            rows[f"`{path.stem}` recipe"] = {"method": method, "recipe": path.stem}
    return rows


def parse_variant(text: str) -> tuple[str, dict]:
    """``--variant``: ``"LABEL=FILE.yaml"`` (an overlay) or ``"LABEL=key=value;key=value"`` (overrides)
    -> (label, ``{"overlays": [...]}`` or ``{"set": [...]}``)."""
    label, sep, rest = text.partition("=")
    if not sep or not label.strip() or not rest.strip():
        sys.exit(f"error: --variant '{text}' must look like LABEL=FILE.yaml or "
                 "LABEL=section.key=value;section.key=value")
    rest = rest.strip()
    if rest.endswith((".yaml", ".yml")):
        if not (REPO / rest).is_file():
            sys.exit(f"error: --variant '{text}': no overlay file {rest}")
        return label.strip(), {"overlays": [rest]}
    return label.strip(), {"set": [s.strip() for s in rest.split(";") if s.strip()]}


def with_variants(rows: dict[str, dict], variants: list[str]) -> dict[str, dict]:
    """``rows`` and, after each trained row, one copy per ``--variant`` named ``"<row> + <label>"``
    with the variant's overlay or overrides added last (so they win)."""
    parsed = [parse_variant(v) for v in variants]
    out: dict[str, dict] = {}
    for name, spec in rows.items():
        out[name] = spec
        if "method" not in spec:
            continue
        for label, extra in parsed:
            new = dict(spec)
            new["overlays"] = [*spec_overlays(spec, argparse.Namespace()), *extra.get("overlays", [])]
            new.pop("overlay", None)
            new["set"] = [*spec.get("set", []), *extra.get("set", [])]
            out[f"{name} + {label}"] = new
    return out


def row_overrides(spec: dict, args) -> list[str]:
    """The recipe overrides of one row: the method's tuned settings (not for a row with its own recipe),
    the row's own, then what the command forces."""
    method = spec["method"]
    shared = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    shared += [f"views.n_views={args.n_views}"] if args.n_views else []
    own = [] if spec.get("recipe") else [f"method.name={method}", *TUNED.get(method, [])]
    return [f"data.image_size={args.image_size}", f"model.backbone={args.backbone}", *own,
            *spec.get("set", []), *shared, *args.set]


def row_recipe(spec: dict, args, run_overrides: tuple[str, ...] = ()):
    """The recipe one row trains with: its recipe (``--recipe`` unless the row names one), the run's
    own overrides, the row's, its overlays."""
    import cellssl.methods  # noqa: F401  (start-up time; registers the methods' settings, which recipes are built from)
    from cellssl.config import load_recipe  # start-up time: --help without torch

    return load_recipe(spec.get("recipe", args.recipe), [*run_overrides, *row_overrides(spec, args)],
                       [str(REPO / o) for o in spec_overlays(spec, args)])


def check_equal_cost(rows: dict[str, dict], args) -> None:
    """Exit before any training if a row's batch × views differs from ``--views-per-step``
    (equal image-views only: at equal minutes each row keeps its own shape)."""
    if args.minutes:
        return
    for name, spec in rows.items():
        if "method" not in spec:
            continue
        recipe = row_recipe(spec, args)
        per_step = recipe.train.batch_size * recipe.views.n_views
        if per_step != args.views_per_step:
            sys.exit(f"error: row '{name}' trains on {recipe.train.batch_size} images x {recipe.views.n_views} views "
                     f"= {per_step} image-views per step, not the budget's {args.views_per_step} (--views-per-step)")


def recipe_text(name: str) -> str:
    """The YAML text of a shipped recipe name (or a path)."""
    path = REPO / "recipes" / f"{name}.yaml"
    return path.read_text() if path.is_file() else Path(name).read_text()


def row_key(name: str, spec: dict, args, features: bool = True) -> str:
    """Hash of everything that changes a row's numbers (not the seed, not the budget: the store keeps
    each budget under its own name); ``features=False``: of what changes its trained model (the
    training folder's name), without how its features are computed (``--tta``), so that another
    evaluation of the same runs reuses their checkpoints."""
    texts = [(REPO / o).read_text() for o in spec_overlays(spec, args)] if "method" in spec else []
    untrained = [args.image_size, args.backbone] + ([RAW_PIXELS] if spec.get("kind") == "raw" else [])
    recipe = spec.get("recipe", args.recipe)
    blob = [spec.get("kind", "ssl"), row_overrides(spec, args) if "method" in spec else untrained,
            texts, recipe, recipe_text(recipe) if "method" in spec else "",
            args.eval_on, args.episodes, args.probe_max, str(args.cross_lab)]
    if features and args.tta != "none":  # the features' orientation averaging; rows stored before it were plain
        blob.append(f"tta={args.tta}")
    return hashlib.sha1(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:12]


# ---- one row, one seed ------------------------------------------------------------------------------
def pretrain(spec: dict, seed: int, parts: dict[str, Path], args, key: str) -> tuple[Path, dict]:
    """Pretrain one row's model for one seed under this run's budget (resumes an interrupted run);
    returns (checkpoint, info: steps run, minutes, image-views and image-views per second)."""
    from cellssl.engine.fit import fit  # start-up time: torch

    budget = run_budget(args)
    tag = f"{budget['minutes']:g}min" if "minutes" in budget else f"{budget['steps']}st"
    out = Path(args.work) / "runs" / f"{spec['method']}-{key}-{tag}-s{seed}"
    ckpt = out / "checkpoints" / "last.pt"
    done_file = out / "done.json"
    if done_file.exists() and ckpt.exists():
        return ckpt, json.loads(done_file.read_text())
    recipe = row_recipe(spec, args, (
        f"data.path={parts['pretrain']}", *budget_overrides(budget), f"train.seed={seed}", f"train.out={out}",
        f"train.device={args.device}", "train.checkpoint_every=50", f"train.progress={str(args.progress).lower()}",
        f"data.num_workers={args.workers}",
    ))
    per_step = recipe.train.batch_size * recipe.views.n_views
    t0 = time.monotonic()
    res = fit(recipe, resume=ckpt.exists())
    seconds = time.monotonic() - t0
    if res.stopped_early in ("interrupted", "terminated"):  # Ctrl-C / SIGTERM: the run is not done; rerun resumes
        raise SystemExit(f"{res.stopped_early} at step {res.step}: checkpoint {ckpt}; rerun the command to continue")
    info = {"steps": res.step, "minutes": seconds / 60, "stopped": res.stopped_early,
            "batch": recipe.train.batch_size, "n_views": recipe.views.n_views, "image_views": res.step * per_step,
            "views_per_s": res.step * per_step / max(seconds, 1e-9)}
    done_file.write_text(json.dumps(info))
    return ckpt, info


def adapt_tag(kind: str, args) -> str:
    """What an adaptation result depends on (re-run when it changes): its kind and budget."""
    if kind == "adabn":
        return "adabn"
    budget = f"{args.adapt_minutes:g}min" if args.adapt_minutes else f"{args.adapt_steps}st"
    return f"continued-{budget}-src{args.adapt_source_fraction:g}"


def adapt_seed(row: dict, parts: dict[str, Path], args) -> bool:
    """Add the adaptation results ``--adapt`` asks for (``row["adabn"]``, ``row["continued"]``) to one
    trained row's seed result, from its checkpoint; True when anything was added."""
    from benchmarks.crosslab import adapted_metrics  # start-up time: torch

    ckpt = Path(row["run"]) / "checkpoints" / "last.pt"
    todo = [k for k in args.adapt if row.get(k, {}).get("tag") != adapt_tag(k, args)]
    if not todo or not args.cross_lab or not ckpt.exists():
        return False
    # AdaBN keeps the PBC model's probe features; continued SSL recomputes them with the adapted model
    source_fs = (extractor_for(str(ckpt), args).features(parts["pretrain"], max_per_class=args.probe_max)
                 if "adabn" in todo else None)
    overrides = [f"data.num_workers={args.workers}", f"train.progress={str(args.progress).lower()}",
                 "train.checkpoint_every=50"]
    # a minutes budget sizes the schedule itself (no step cap); a step budget drops the source run's minutes
    overrides += [f"train.max_steps={10**6}"] if args.adapt_minutes else ["train.max_minutes=null"]
    for kind in todo:
        out = Path(args.work) / "adapt" / f"{Path(row['run']).name}-{adapt_tag(kind, args)}"
        res = adapted_metrics(ckpt, parts["pretrain"], args.cross_lab, source_fs, kind, out,
                              episodes=args.episodes, probe_max=args.probe_max, device=args.device,
                              steps=None if args.adapt_minutes else args.adapt_steps, minutes=args.adapt_minutes,
                              source_fraction=args.adapt_source_fraction, overrides=overrides, tta=args.tta)
        row[kind] = {**res, "tag": adapt_tag(kind, args)}
    return True


def run_seed(name: str, spec: dict, seed: int, parts, args, key: str) -> dict:
    """Train (if needed) and evaluate one row for one seed."""
    if spec.get("kind") == "raw":  # the pixels:16 baseline spec of every evaluation command
        tr, te, tg = features_for(RAW_PIXELS, parts, args)
        return evaluate(tr, te, args.episodes, tg)
    if spec.get("kind") == "random":
        tr, te, tg = features_for(f"random:{args.backbone}", parts, args)
        return evaluate(tr, te, args.episodes, tg)
    ckpt, info = pretrain(spec, seed, parts, args, key)
    tr, te, tg = features_for(str(ckpt), parts, args)
    row = evaluate(tr, te, args.episodes, tg)
    row.update(info, run=str(ckpt.parent.parent))
    return row


# ---- summaries and tables ---------------------------------------------------------------------------
def adapt_table(results: dict[str, dict]) -> list[str]:
    """The cross-lab columns of each trained row without adaptation and after each adaptation."""
    lines = ["| features | adaptation to the other lab | other lab 1-shot | other lab 5-shot | PBC→other lab acc | "
             "PBC→other lab bal. acc | adapt steps | adapt min |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        if not any(k in r for k in ADAPT_KINDS):
            continue
        lines.append(f"| {name} | none | " + " | ".join(fmt(r.get(k)) for k in XL_METRICS) + " | – | – |")
        for kind in ADAPT_KINDS:
            if kind in r:
                a = r[kind]
                lines.append(f"| {name} | {ADAPT_LABELS[kind]} | " + " | ".join(fmt(a[k]) for k in XL_METRICS)
                             + f" | {a['adapt_steps'] or '–'} | {a['adapt_minutes']:.1f} |")
    return lines


def ranked(results: dict[str, dict]) -> dict[str, dict]:
    """Rows with the tuning objective first, best first; the others after them in their order."""
    scored = sorted((k for k in results if "objective" in results[k]), key=lambda k: -results[k]["objective"][0])
    return {**{k: results[k] for k in scored}, **{k: v for k, v in results.items() if k not in scored}}


def plots(results: dict[str, dict], runs: dict[str, Path], out_dir: Path, stem: str) -> list[str]:
    """The report's figures next to it (their file names): accuracy vs shots of every row; with run
    folders, the training loss and effective rank of each run, and MSBReg's three loss terms."""
    files = [shots_plot(results, out_dir / f"{stem}_shots.png").name]
    runs = {k: v for k, v in runs.items() if v.is_dir()}
    if runs:
        files.append(training_plot(runs, out_dir / f"{stem}_training.png").name)
        msb = runs.get("MSBReg")
        if msb is not None and terms_plot(msb, out_dir / f"{stem}_msbreg_terms.png"):
            files.append(f"{stem}_msbreg_terms.png")
    return files


def shots_plot(results: dict[str, dict], path: Path) -> Path:
    """8-way accuracy vs shots per class (1, 5, 10) of every row, with its 95 % interval."""
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name, r in results.items():
        ys = [r[f"{k}shot"][0] for k in (1, 5, 10)]
        es = [r[f"{k}shot"][1] for k in (1, 5, 10)]
        ax.errorbar([1, 5, 10], ys, yerr=es, marker="o", capsize=3, label=name)
    ax.set_xlabel("shots per class (8-way)")
    ax.set_ylabel("accuracy")
    ax.set_xticks([1, 5, 10])
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def training_plot(runs: dict[str, Path], path: Path) -> Path:
    """Training loss and effective rank of the embeddings vs step, one line per run folder."""
    fig, axes = pyplot().subplots(1, 2, figsize=(11, 4))
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
    return save_figure(fig, path)


def terms_plot(run: Path, path: Path) -> Path | None:
    """MSBReg's three loss terms vs step of one run (None when the run logged nothing)."""
    rows = read_metrics(run)
    if not rows:
        return None
    fig, ax = pyplot().subplots(figsize=(6, 3.5))
    for k in ("loss_centroid", "loss_sv", "loss_brownian"):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], label=k)
    ax.set_xlabel("step")
    ax.set_title("MSBReg loss terms")
    ax.legend()
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def load_grid(path: str) -> dict[str, dict]:
    """Rows from a YAML list of ``{name, method, recipe?, overlay?: FILE or [FILE, ...], set?: [KEY=VALUE, ...]}``."""
    import yaml

    rows = {}
    for item in yaml.safe_load(Path(path).read_text()):
        spec = {"method": item["method"], "set": list(item.get("set", []))}
        overlay = item.get("overlay") or []
        if overlay:
            spec["overlays"] = [overlay] if isinstance(overlay, str) else list(overlay)
        if item.get("recipe"):
            spec["recipe"] = item["recipe"]
        rows[item["name"]] = spec
    return rows


def collect(store: dict, rows: dict[str, dict], args) -> dict[str, dict]:
    """``{budget label: {"results": {row: summary}, "runs": {row: run folder}, "commands": [...]}}`` of
    every stored row that matches the current settings; minute budgets (the headline) first. The
    untrained rows (raw pixels, random init: no budget) appear in every table, first."""
    tables: dict[str, dict] = {}
    untrained: dict[str, dict] = {}
    untrained_cmds: list[dict] = []
    for name, spec in rows.items():
        key = row_key(name, spec, args)
        for entry in store.values():
            if entry.get("row") != name or entry.get("key") != key or not entry.get("seeds"):
                continue
            seeds = [entry["seeds"][s] for s in sorted(entry["seeds"], key=int)]
            if entry.get("budget") is None:
                untrained[name] = summarise(seeds)
                untrained_cmds += [c for c in entry.get("commands", []) if c not in untrained_cmds]
                continue
            t = tables.setdefault(budget_label(entry["budget"]), {"results": {}, "runs": {}, "commands": []})
            t["results"][name] = summarise(seeds)
            if seeds[0].get("run"):
                t["runs"][name] = Path(seeds[0]["run"])
            for c in entry.get("commands", []):
                if c not in t["commands"]:
                    t["commands"].append(c)
    if untrained and not tables:
        tables[budget_label(run_budget(args))] = {"results": {}, "runs": {}, "commands": []}
    for t in tables.values():
        t["results"] = {**untrained, **t["results"]}
        t["commands"] += [c for c in untrained_cmds if c not in t["commands"]]
    return dict(sorted(tables.items(), key=lambda kv: budget_order(kv[0])))


def budget_section(label: str, t: dict, args) -> list[str]:
    """One budget's tables: main (ranked by the objective for a grid), ablation, adaptation, per seed."""
    results = t["results"]
    if args.grid and args.eval_on == "val":
        results = ranked(results)
    main_rows = {k: v for k, v in results.items() if not k.startswith("ablation:")}
    ablation = {k: v for k, v in results.items() if k.startswith("ablation:")}
    if ablation and ABLATION_FULL in results:
        ablation["ablation: centroid + SV + Brownian (= MSBReg)"] = results[ABLATION_FULL]
    minutes = label.endswith(" min")
    title = (f"## Equal minutes: {label} of wall-clock per run (the headline)" if minutes else
             f"## Equal image-views: {label} of {args.views_per_step} image-views per run")
    lines = [title, ""]
    lines += [f"- `{c['command']}` ({c['date']})" for c in t["commands"]]
    lines += ["", *table(main_rows, objective_column=args.eval_on == "val"), ""]
    if ablation:
        lines += [f"### Ablation ({label}): each force on and off", "", *table(ablation), ""]
    at = adapt_table(main_rows)
    if len(at) > 2:
        lines += [f"### Adaptation to the other lab ({label})", "", *at, ""]
    st = seed_table(results)
    if len(st) > 2:
        lines += [f"### Per seed ({label})", "", *st, ""]
    return lines


def write_report(store: dict, rows: dict[str, dict], args, out_md: Path, total_min: float) -> None:
    """Tables and plots of every stored row that matches the current settings: the equal-minutes
    tables first (the headline), then the equal-image-views ones."""
    tables = collect(store, rows, args)
    files: list[str] = []
    if tables:
        head = next(iter(tables.values()))
        main_rows = {k: v for k, v in head["results"].items() if not k.startswith("ablation:")}
        files = plots(main_rows, {k: v for k, v in head["runs"].items() if k in main_rows}, out_md.parent,
                      out_md.stem)
    xl = (f"`{args.cross_lab}` (another lab's white cells: jtsc128, Zheng et al., Micron 107, 2018; images from "
          "Jiangxi Tecom Science Corporation, GPL-3.0)") if args.cross_lab else "none (`--cross-lab none`)"
    lines = [
        f"# Quality benchmark{' (quick)' if args.quick else ''}: PBC blood cells and another lab's",
        "",
        f"- last command: `{command_line('quality')}` ({total_min:.0f} min); rows and seeds finished earlier are "
        f"kept in `{args.store}` and skipped; each table lists the commands and dates that produced it",
        f"- {machine_line(f'device {args.device}')}",
        f"- data: PBC (Acevedo et al., Data in Brief 30, 2020, CC BY 4.0), 128 px crops in `{args.data}`; "
        f"split by file-name hash: pretrain 70 % (no labels in pretraining), val 10 %, test 20 %; "
        f"evaluated on **{args.eval_on}**. Other lab: {xl}",
        f"- pretraining: `{args.recipe}` recipe, {args.backbone} at {args.image_size} px; each method's own "
        "settings as tuned on val (`TUNED` in `benchmarks/common.py`; MSBReg's are the recipe's; a "
        "`blood_smear_<method>` row trains with that shipped recipe as it is)"
        + (f"; extra overrides: {args.set}" if args.set else "")
        + (f"; overlays on every row: {args.recipe_overlay}" if args.recipe_overlay else ""),
        "- budgets: **equal minutes** (`--minutes M`, the headline): every row gets the same wall-clock, "
        "the recipe's `train.max_minutes` schedule (the first steps are timed, then warm-up, cosine LR and "
        "EMA are sized to the steps that fit; capped at the recipe's epochs); `steps` is what each row "
        "actually ran and `image-views/s` its speed, both depend on the machine and its load (rows compare only "
        "when run on the same machine and day, each alone). **Equal image-views** (`--steps N`): N steps of "
        f"{args.views_per_step} image-views (batch × views) for every row",
        f"- evaluation: 8-way 1/5/10-shot SimpleShot episodes on {args.eval_on} (15 queries, {args.episodes} "
        f"episodes); linear probe (logistic regression on L2-normalised, standardised features, C by "
        f"validation) and kNN (k=20, T=0.07) fitted on the pretrain part"
        + (f" ({args.probe_max} per class)" if args.probe_max else "") + f", tested on {args.eval_on}; "
        + TTA_LINES[args.tta],
        "- other lab (`benchmarks/crosslab.py`): all-way (4-way for jtsc128) 1- and 5-shot SimpleShot "
        f"episodes within it (15 queries, {args.episodes} episodes; ± over episodes); zero-label transfer "
        "`PBC→other lab`: the linear probe fitted on the pretrain part's images of the other lab's classes "
        "only, tested on every image of the other lab: accuracy and balanced accuracy (mean per-class "
        "recall; jtsc128 is 61 % neutrophils)",
        "- adaptation (trained rows): `cellssl adapt` on the other lab's unlabelled images: `--bn-only` "
        "(AdaBN; the probe keeps the PBC model's features) and continued SSL ("
        + (f"{args.adapt_minutes:g} min" if args.adapt_minutes else f"{args.adapt_steps} steps")
        + (f", {args.adapt_source_fraction:g} PBC images mixed in" if args.adapt_source_fraction else "")
        + "; the probe is refit on the adapted model's PBC features)"
        + (f"; this run: {', '.join(args.adapt) or 'none'}" if args.cross_lab else ""),
        "- objective (with `--eval-on val`; a `--grid` is ranked by it): mean of PBC val 8-way 5-shot and "
        "the other lab's 5-shot. jtsc128 is the only cross-lab set in `../shared/data`, so the cross-lab "
        "half of the objective is measured on the same set that is reported; PBC test is never used for tuning",
        "- ± is a 95 % interval: Student-t over seeds when there are several, else over few-shot episodes; "
        "`min/run` is wall-clock",
        "",
    ]
    for label, t in tables.items():
        lines += budget_section(label, t, args)
    lines += [*[f"![{f}]({f})" for f in files], ""]
    write_markdown(out_md, lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny budget, 1 seed, main rows only (a few minutes)")
    ap.add_argument("--data", default=str(DEFAULT_PBC))
    ap.add_argument("--cross-lab", default=str(DEFAULT_CROSS_LAB),
                    help="another lab's labelled folder, its classes among PBC's (default jtsc128); 'none' to skip")
    ap.add_argument("--work", default=str(REPO / "runs" / "quality"))
    ap.add_argument("--out", default=None, help="markdown report (default docs/results.md; quick: WORK/results.md)")
    ap.add_argument("--store", default=None, help="JSON of finished rows (default: the report's name with .json)")
    ap.add_argument("--recipe", default="blood_smear")
    ap.add_argument("--backbone", default="resnet18")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--minutes", type=float, default=None,
                    help="equal wall-clock per run (the headline table); without it: --steps (equal image-views)")
    ap.add_argument("--views-per-step", type=int, default=256,
                    help="the equal cost of --steps: batch size × views per step of every row (e.g. 128 × 2 or 64 × 4)")
    ap.add_argument("--batch-size", type=int, default=None, help="force this batch for every row (default: each's)")
    ap.add_argument("--n-views", type=int, default=None, help="force this view count for every row (default: each's)")
    ap.add_argument("--steps", type=int, default=400, help="pretraining steps per run (the equal image-view budget)")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--probe-max", type=int, default=None, help="at most this many probe images per class")
    ap.add_argument("--rows", default=None, help="comma-separated row names or method names (default all)")
    ap.add_argument("--grid", default=None, help="YAML list of rows to run instead of the built-in ones")
    ap.add_argument("--eval-on", choices=["test", "val"], default="test", help="val for tuning")
    ap.add_argument("--adapt", default=None,
                    help="adaptations to the other lab per trained row: comma list of adabn, continued, or none "
                         "(default adabn,continued; with --grid none)")
    ap.add_argument("--adapt-steps", type=int, default=50, help="continued SSL steps on the other lab's images")
    ap.add_argument("--adapt-minutes", type=float, default=None, help="continued SSL budget in minutes instead")
    ap.add_argument("--adapt-source-fraction", type=float, default=0.0,
                    help="share of PBC pretrain images mixed into continued SSL (cellssl adapt --source-fraction)")
    ap.add_argument("--tta", choices=TTA_CHOICES, default="auto",
                    help="features averaged over each image's 8 rotations and flips: auto = each checkpoint "
                         "recipe's eval.tta (dihedral for blood_smear; raw pixels stay plain); none = plain features")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--set", action="append", default=[], help="extra recipe override for every row")
    ap.add_argument("--recipe-overlay", action="append", default=[], help="YAML overlay merged into every trained row")
    ap.add_argument("--variant", action="append", default=[],
                    help="also run every selected trained row with an overlay or overrides: 'LABEL=FILE.yaml' or "
                         "'LABEL=section.key=value;section.key=value' (row '<row> + LABEL')")
    args = ap.parse_args(argv)
    adapt = args.adapt if args.adapt is not None else ("none" if args.grid else "adabn,continued")
    args.adapt = [] if adapt.strip() == "none" else [a.strip() for a in adapt.split(",") if a.strip()]
    bad = [a for a in args.adapt if a not in ADAPT_KINDS]
    if bad:
        ap.error(f"--adapt {bad}: use a comma list of {', '.join(ADAPT_KINDS)}, or none")
    args.cross_lab = None if str(args.cross_lab).lower() == "none" else Path(args.cross_lab)
    if args.minutes is not None and args.minutes <= 0:
        ap.error("--minutes must be positive")
    for o in args.recipe_overlay:
        if not (REPO / o).is_file():
            ap.error(f"--recipe-overlay {o}: no such file")
    return args


def select_rows(args) -> tuple[dict[str, dict], dict[str, dict]]:
    """(every row the report may show, the rows to run now): the grid's or the built-in rows with the
    shipped ``blood_smear_<method>`` recipes, each with its ``--variant`` copies; ``--rows`` filters."""
    rows = load_grid(args.grid) if args.grid else {**ROWS, **recipe_rows(base=args.recipe)}
    rows = with_variants(rows, args.variant)
    todo = dict(rows)
    if args.quick:
        todo = {k: v for k, v in todo.items() if not k.startswith("ablation:")}
    if args.rows:
        keep = {m.strip() for m in args.rows.split(",")}
        todo = {k: v for k, v in todo.items()
                if k in keep or v.get("method") in keep or k.split(" + ")[0] in keep}
    return rows, todo


def prepare(args) -> tuple[Path, Path, dict]:
    """Check the data folders, apply ``--quick`` and resolve the report and store paths:
    (report ``.md``, store ``.json``, the store's finished rows)."""
    require_folder(args.data, "PBC data")
    if args.cross_lab:
        require_folder(args.cross_lab, "cross-lab data", "pass --cross-lab DIR (a folder with one sub-folder per "
                       "class, named as in --data) or --cross-lab none")
    if args.quick:
        args.steps, args.seeds, args.episodes, args.probe_max = min(args.steps, 20), 1, 200, args.probe_max or 150
        args.adapt_steps = min(args.adapt_steps, 10)
    default_md = Path(args.work) / "results.md" if args.quick else REPO / "docs" / "results.md"
    out_md = Path(args.out) if args.out else default_md
    out_md.parent.mkdir(parents=True, exist_ok=True)
    args.store = args.store or str(out_md.with_suffix(".json"))
    store_path = Path(args.store)
    return out_md, store_path, json.loads(store_path.read_text()) if store_path.exists() else {}


def run_row(name: str, spec: dict, store: dict, store_path: Path, parts: dict[str, Path], args, stamp: dict) -> list:
    """Every missing seed of one row under this run's budget (trained, evaluated, adapted), the store
    written after each one (resumable); returns the row's seed results."""
    key = row_key(name, spec, args)
    row_budget = run_budget(args) if "method" in spec else None
    sname = store_name(name, row_budget)
    entry = store.get(sname)
    if not entry or entry.get("key") != key:
        entry = store[sname] = {"row": name, "key": key, "spec": spec, "budget": row_budget, "seeds": {},
                                "commands": []}
    for seed in range(1 if "kind" in spec else args.seeds):
        res = entry["seeds"].get(str(seed))
        changed = res is None
        if res is None:
            res = entry["seeds"][str(seed)] = run_seed(name, spec, seed, parts, args,
                                                       row_key(name, spec, args, features=False))
        if "method" in spec:
            changed = adapt_seed(res, parts, args) or changed
        if changed:
            if stamp not in entry["commands"]:
                entry["commands"].append(stamp)
            store_path.write_text(json.dumps(store, indent=1))  # after every run: resumable
    return [entry["seeds"][s] for s in sorted(entry["seeds"], key=int)]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_md, store_path, store = prepare(args)
    rows, todo = select_rows(args)
    check_equal_cost(todo, args)
    parts = make_split(Path(args.data), Path(args.work) / "split")
    stamp = {"command": command_line("quality", argv), "date": time.strftime("%Y-%m-%d %H:%M")}
    t_start = time.monotonic()
    print("split: " + ", ".join(f"{k}={sum(1 for _ in v.rglob('*.*'))}" for k, v in parts.items())
          + f"; budget per run: {budget_label(run_budget(args))}")
    if args.minutes:  # equal wall-clock: another process on the machine costs a row steps
        print(run_alone_notice())
    print("\n".join(table({})[:2]), flush=True)
    for name, spec in todo.items():
        seeds = run_row(name, spec, store, store_path, parts, args, stamp)
        print("\n".join(table({name: summarise(seeds)})[2:]), flush=True)
    total_min = (time.monotonic() - t_start) / 60
    write_report(store, rows, args, out_md, total_min)
    print(f"\nwrote {out_md} and {store_path} ({total_min:.1f} min)")


if __name__ == "__main__":
    main()
