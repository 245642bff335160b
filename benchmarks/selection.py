"""Which cells to label first: does choosing (TypiClust, ProbCover, CoreSet) beat a random sample
at a few labels? On real blood cells (PBC), with a pretrained cellssl model.

Protocol
--------
* The quality benchmark's fixed PBC split (``benchmarks.common.make_split``: by file-name
  hash; ``pretrain`` 70 %, ``val`` 10 %, ``test`` 20 %). The ``pretrain`` part is the unlabelled
  pool the strategies choose from (its labels are only looked up for the chosen cells, as an
  expert would provide them); ``test`` is never seen by the selection or the probe.
* Features: the ``--checkpoint`` (frozen backbone, its own image size), a random-init resnet18 at
  the same size, and raw pixels (the ``pixels:16`` baseline spec: 16×16×3), to show how much the
  embedding matters. Features are cached in ``--work`` (a re-run only re-selects).
* For budgets 8, 16, 40, 80 (8 classes) and ``--seeds`` seeds, each strategy selects from the
  pool (``cellssl.apply.select.select_indices``, the code behind ``cellssl select``); a linear probe
  (``cellssl.eval.linear.linear_probe``: L2-normalise, standardise, logistic regression) with a
  **fixed C** (``--C``, default 1: there are too few labels to choose C by validation, the same C
  for every strategy) is trained on the chosen, labelled cells and tested on ``test``. A selection
  with one class only predicts that class. Reported: test accuracy, mean ± 95 % t-interval over
  seeds, and the number of classes among the chosen cells.
* ProbCover, CoreSet and random are sequential: the first b cells of an 80-cell selection are the
  b-cell selection (``tests/test_select.py`` checks it), so they run once per seed; TypiClust
  re-clusters for every budget. Reference: the same probe with all pool labels (C by validation;
  ``benchmarks.common.evaluate``). Timing: 80 cells from 10,000 (pool + test features of the checkpoint).

    python -m benchmarks.selection --checkpoint RUN/checkpoints/last.pt            # ~15 min on 2 cores
    python -m benchmarks.selection --checkpoint RUN/checkpoints/last.pt --rows checkpoint --seeds 2

Writes ``--out`` (default docs/selection.md) with the tables, a plot (accuracy vs budget, one line
per strategy) and the raw per-seed numbers (``.json``); a hand-written ``## Analysis`` section is
kept across re-runs. PBC: Acevedo et al., Data in Brief 30 (2020), CC BY 4.0.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import (
    DEFAULT_PBC,
    RAW_PIXELS,
    REPO,
    command_line,
    evaluate,
    machine_line,
    make_split,
    require_folder,
    write_markdown,
)
from cellssl.eval.metrics import mean_ci95
from cellssl.eval.report import markdown_table, write_json
from cellssl.plots import pyplot, save_figure

STRATEGIES = ["typiclust", "probcover", "coreset", "random"]
SEQUENTIAL = {"probcover", "coreset", "random"}  # prefix-consistent: one run per seed
ROWS = ["checkpoint", "random", "raw"]


# --- features ------------------------------------------------------------------------------------
def _cache_key(*parts) -> str:
    return hashlib.sha1(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:12]


def _file_stamp(path: str) -> str:
    p = Path(path)
    return f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" if p.is_file() else path


def row_features(row: str, args, parts: dict[str, Path]):
    """(pool FeatureSet, test FeatureSet, row name) of one feature extractor, cached in --work."""
    from cellssl.eval.features import FeatureExtractor, FeatureSet

    cache = Path(args.work) / "features"
    cache.mkdir(parents=True, exist_ok=True)
    if row == "raw":
        spec, name = RAW_PIXELS, "raw pixels (16×16×3)"
    elif row == "random":
        spec, name = f"random:{args.backbone}", None
    else:
        spec, name = args.checkpoint, None
    key = _cache_key(row, _file_stamp(spec), args.image_size if row in ("random", "raw") else "", parts["pretrain"],
                     parts["test"], "v1")
    f = cache / f"{row}-{key}.npz"
    if f.exists():
        z = np.load(f)
        classes, name = [str(c) for c in z["classes"]], str(z["name"])
        pool = FeatureSet(z["pool"], z["pool_y"], [""] * len(z["pool_y"]), classes, {"spec": spec},
                          str(parts["pretrain"]))
        test = FeatureSet(z["test"], z["test_y"], [""] * len(z["test_y"]), classes, {"spec": spec}, str(parts["test"]))
        return pool, test, name
    t0 = time.monotonic()
    ex = FeatureExtractor(spec, image_size=args.image_size if row in ("random", "raw") else None, device=args.device,
                          batch_size=256, progress=False)
    pool, test = ex.features(parts["pretrain"]), ex.features(parts["test"])
    if row != "raw":
        desc = ex.describe()["description"]
        name = f"random-init {args.backbone} ({ex.data_cfg.image_size} px)" if row == "random" else desc
    if list(pool.classes) != list(test.classes):
        sys.exit(f"error: class folders differ between {parts['pretrain']} and {parts['test']}")
    np.savez(f, pool=pool.features, pool_y=pool.labels, test=test.features, test_y=test.labels,
             classes=np.asarray(pool.classes), name=np.asarray(name))
    print(f"  features of {name}: pool {pool.features.shape}, test {test.features.shape} "
          f"({time.monotonic() - t0:.0f} s, cached in {f})", flush=True)
    return pool, test, name


# --- one selection + probe -------------------------------------------------------------------------
def probe_accuracy(pool, test, idx: np.ndarray, C: float) -> float:
    """Test accuracy of the fixed-C linear probe trained on the pool rows ``idx`` (true labels)."""
    from cellssl.eval.linear import linear_probe

    labels = pool.labels[idx]
    if len(np.unique(labels)) < 2:  # one class chosen: the classifier can only predict it
        return float(np.mean(test.labels == labels[0]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(linear_probe(pool.subset(idx), test, seed=0, Cs=(C,))["accuracy"])


def run_row(pool, test, args) -> dict:
    """{strategy: {budget: [{"acc", "classes", "seconds"} per seed]}} for one feature set."""
    from cellssl.apply.select import select_indices

    budgets = sorted(args.budgets)
    out: dict = {}
    for strategy in args.strategies:
        res: dict[str, list] = {str(b): [] for b in budgets}
        t0 = time.monotonic()
        for seed in range(args.seeds):
            if strategy in SEQUENTIAL:
                sel = select_indices(pool.features, budgets[-1], strategy, seed=seed, n_classes=len(pool.classes))
                picks = {b: (sel.indices[:b], sel.seconds) for b in budgets}
            else:
                picks = {}
                for b in budgets:
                    sel = select_indices(pool.features, b, strategy, seed=seed, n_classes=len(pool.classes))
                    picks[b] = (sel.indices, sel.seconds)
            for b, (idx, secs) in picks.items():
                res[str(b)].append({"acc": probe_accuracy(pool, test, idx, args.C),
                                    "classes": int(len(np.unique(pool.labels[idx]))), "seconds": secs})
        out[strategy] = res
        print("  " + line(strategy, res, budgets, len(pool.classes)) + f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    return out


# --- summaries --------------------------------------------------------------------------------------
def cell(runs: list[dict], n_classes: int) -> str:
    m, ci = mean_ci95([r["acc"] for r in runs])
    cls = np.mean([r["classes"] for r in runs])
    full = sum(r["classes"] == n_classes for r in runs)
    return f"{100 * m:.1f} ± {100 * ci:.1f} ({cls:.1f}; {full}/{len(runs)})"


def line(strategy: str, res: dict, budgets, n_classes: int) -> str:
    return f"| {strategy} | " + " | ".join(cell(res[str(b)], n_classes) for b in budgets) + " |"


def table(rows: dict, budgets, n_classes: int) -> list[str]:
    lines = []
    for name, r in rows.items():
        ref = r.get("reference")
        lines += [f"### {name}", ""]
        if ref:
            lines.append(f"All {r['pool_size']:,} pool labels: linear probe {100 * ref['linear']:.1f} %, "
                         f"kNN {100 * ref['knn']:.1f} % (the ceiling).")
            lines.append("")
        lines += ["| strategy | " + " | ".join(f"{b} labels" for b in budgets) + " |",
                  "|---|" + "---|" * len(budgets)]
        lines += [line(s, res, budgets, n_classes) for s, res in r["results"].items()]
        lines.append("")
    return lines


def target_lines(rows: dict, n_classes: int) -> list[str]:
    out = []
    for name, r in rows.items():
        res = r["results"]
        if "typiclust" in res and "random" in res and "16" in res["typiclust"]:
            t, rnd = res["typiclust"]["16"], res["random"]["16"]
            diff = [a["acc"] - b["acc"] for a, b in zip(t, rnd)]
            m, ci = mean_ci95(diff)
            full = sum(x["classes"] == n_classes for x in t)
            out.append(f"- {name}: at 16 labels TypiClust − random = **{100 * m:+.1f} ± {100 * ci:.1f} points** "
                       f"(paired by seed; target ≥ +10); TypiClust covers all {n_classes} classes in {full}/{len(t)} "
                       f"seeds, random in {sum(x['classes'] == n_classes for x in rnd)}/{len(rnd)}")
    return out


def plot(rows: dict, budgets, path: Path) -> Path:
    """Accuracy vs budget, one panel per feature extractor, one line per strategy (95 % intervals)."""
    fig, axes = pyplot().subplots(1, len(rows), figsize=(5.2 * len(rows), 4.2), squeeze=False)
    for ax, (name, r) in zip(axes[0], rows.items()):
        for s, res in r["results"].items():
            ms = [mean_ci95([x["acc"] for x in res[str(b)]]) for b in budgets]
            ax.errorbar(budgets, [100 * m for m, _ in ms], yerr=[100 * c for _, c in ms], marker="o", capsize=3,
                        label=s)
        if r.get("reference"):
            ax.axhline(100 * r["reference"]["linear"], ls="--", color="0.5", lw=1, label="all labels")
        ax.set_ylim(0, 100)
        ax.set_xscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("labelled cells (budget)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# --- timing ---------------------------------------------------------------------------------------------
def _skactiveml_probcover(x: np.ndarray, budget: int, n_classes: int) -> None:
    """scikit-activeml's dense ProbCover (its own δ search), as `cellssl select` would run it."""
    from skactiveml.pool import ProbCover
    from threadpoolctl import threadpool_limits

    from cellssl.eval.metrics import l2_normalize

    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ProbCover(n_classes=n_classes, random_state=0).query(l2_normalize(x), np.full(len(x), np.nan),
                                                               batch_size=budget)


def timing(features: np.ndarray, n_classes: int, budget: int = 80, n: int = 10_000) -> list[dict]:
    """Seconds to select ``budget`` of ``n`` rows (after embedding: features given) per strategy,
    and of scikit-activeml's dense ProbCover; then, in a second (traced, slower) run, the peak
    memory of the two ProbCover implementations (tracemalloc counts numpy's arrays)."""
    from cellssl.apply.select import select_indices

    x = np.ascontiguousarray(features[:n], dtype=np.float32)
    dense = "probcover (scikit-activeml, dense)"
    runs = {s: (lambda s=s: select_indices(x, budget, s, seed=0, n_classes=n_classes)) for s in STRATEGIES}
    runs[dense] = lambda: _skactiveml_probcover(x, budget, n_classes)
    out = []
    for s, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        secs = time.perf_counter() - t0
        peak = None
        if s in ("probcover", dense):
            tracemalloc.start()
            fn()
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
        out.append({"strategy": s, "seconds": secs, "peak_mb": peak, "n": len(x), "dim": x.shape[1],
                    "budget": budget})
        mem = f", peak {peak:5.0f} MB" if peak is not None else ""
        print(f"  {budget} from {len(x):,}: {s:36s} {secs:6.1f} s{mem}", flush=True)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True, help="a cellssl pretraining checkpoint (last.pt)")
    ap.add_argument("--data", default=str(DEFAULT_PBC))
    ap.add_argument("--work", default=str(REPO / "runs" / "selection"), help="split and feature cache")
    ap.add_argument("--out", default=str(REPO / "docs" / "selection.md"))
    ap.add_argument("--budgets", default="8,16,40,80")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--rows", default=",".join(ROWS), help="checkpoint,random,raw")
    ap.add_argument("--C", type=float, default=1.0, help="the probe's fixed inverse regularisation")
    ap.add_argument("--backbone", default="resnet18", help="random-init baseline")
    ap.add_argument("--image-size", type=int, default=64, help="random-init baseline's input size")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--episodes", type=int, default=100, help="few-shot episodes of the all-labels reference")
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--no-timing", action="store_true")
    args = ap.parse_args(argv)
    args.budgets = sorted(int(b) for b in args.budgets.split(","))
    args.strategies = [s.strip() for s in args.strategies.split(",")]
    args.rows = [r.strip() for r in args.rows.split(",")]
    return args


def evaluate_row(row: str, args, parts: dict[str, Path]) -> tuple[str, dict, int]:
    """One feature extractor: every strategy at every budget and seed, and the all-labels reference:
    (its name, ``{"pool_size", "test_size", "results", "reference"?}``, the number of classes)."""
    pool, test, name = row_features(row, args, parts)
    n_classes = len(pool.classes)
    print(f"\n{name}: pool {len(pool):,}, test {len(test):,}; accuracy % ± 95 % CI (classes chosen; seeds "
          f"covering all {n_classes})", flush=True)
    print("| strategy | " + " | ".join(f"{b} labels" for b in args.budgets) + " |", flush=True)
    entry = {"pool_size": len(pool), "test_size": len(test), "results": run_row(pool, test, args)}
    if not args.no_reference:
        t0 = time.monotonic()
        ref = evaluate(pool, test, args.episodes)
        entry["reference"] = {k: ref[k] for k in ("linear", "knn", "1shot", "5shot")}
        print(f"  all {len(pool):,} labels: linear {100 * ref['linear']:.1f} %, kNN {100 * ref['knn']:.1f} % "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    if row == "checkpoint" and not args.no_timing:
        entry["timing"] = timing(np.concatenate([pool.features, test.features]), n_classes)
    return name, entry, n_classes


def timing_lines(timings: list[dict]) -> list[str]:
    """The speed section: seconds and traced peak memory of each strategy (empty without timings)."""
    if not timings:
        return []
    rows = [[t["strategy"], f"{t['seconds']:.1f}", "–" if t["peak_mb"] is None else format(t["peak_mb"], ".0f")]
            for t in timings]
    return ["## Speed: selecting 80 cells from 10,000 (after embedding)", "",
            *markdown_table(["strategy", "seconds", "peak memory (MB, traced)"], rows),
            "", f"{timings[0]['n']:,} × {timings[0]['dim']} checkpoint features (pool + test), one thread "
            "(sklearn and BLAS limited to 1, as `cellssl select` runs them), wall-clock on a machine shared "
            "with other jobs; peak memory of the two ProbCover implementations from a second, traced run "
            "(tracemalloc, numpy arrays included).", ""]


def report_lines(rows: dict, timings: list[dict], args, n_classes: int, total: float, plot_name: str) -> list[str]:
    """The markdown report: provenance, protocol, the target, the accuracy tables, the speed."""
    return [
        "# Which cells to label first: selection strategies on PBC blood cells",
        "",
        f"- command: `{command_line('selection')}` ({total:.0f} min, features cached in `{args.work}`)",
        f"- {machine_line()}",
        f"- data: PBC (Acevedo et al., Data in Brief 30, 2020, CC BY 4.0), `{args.data}`, the quality benchmark's "
        "split by file-name hash: the **pretrain part (70 %) is the unlabelled pool** the strategies choose from, "
        "the **test part (20 %)** measures accuracy",
        f"- per budget and seed ({args.seeds} seeds): select with `cellssl.apply.select` (as `cellssl select`), "
        f"label the chosen cells with their true class, train the linear probe (L2-normalise, standardise, "
        f"logistic regression, **fixed C = {args.C:g}** for every strategy and budget: too few labels to choose C "
        "by validation), test on the test part",
        "- cells: test accuracy (%) mean ± 95 % t-interval over seeds (number of classes among the chosen cells; "
        f"seeds whose cells cover all {n_classes} classes); a one-class selection predicts that class",
        "",
        "## Target: TypiClust vs random at 16 labels",
        "",
        *target_lines(rows, n_classes),
        "",
        "## Accuracy vs budget",
        "",
        *table(rows, args.budgets, n_classes),
        f"![accuracy vs budget]({plot_name})",
        "",
        *timing_lines(timings),
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    data = require_folder(args.data, "PBC data")
    if not Path(args.checkpoint).is_file():
        sys.exit(f"error: checkpoint {args.checkpoint} not found")
    t_start = time.monotonic()
    parts = make_split(data, Path(args.work) / "split")
    rows: dict[str, dict] = {}
    timings: list[dict] = []
    n_classes = 8
    for row in args.rows:
        name, entry, n_classes = evaluate_row(row, args, parts)
        timings = entry.pop("timing", timings)
        rows[name] = entry
    total = (time.monotonic() - t_start) / 60

    out_md = Path(args.out)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    plot_path = plot(rows, args.budgets, out_md.with_suffix(".png"))
    write_json({"args": vars(args), "rows": rows, "timing": timings}, out_md.with_suffix(".json"))
    write_markdown(out_md, report_lines(rows, timings, args, n_classes, total, plot_path.name))
    print("\n" + "\n".join(target_lines(rows, n_classes)))
    print(f"\nwrote {out_md}, {plot_path.name}, {out_md.with_suffix('.json').name} ({total:.1f} min)")


if __name__ == "__main__":
    main()
