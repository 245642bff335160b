"""What more than one benchmark uses, in one place.

- where things are: :data:`REPO`, the shared real data (:data:`DEFAULT_PBC`, :data:`DEFAULT_CROSS_LAB`),
  :func:`require_folder` (a one-line error naming the folder and the option that sets it);
- the fixed PBC split (:func:`make_split`: ``pretrain`` 70 % / ``val`` 10 % / ``test`` 20 %, by file-name
  hash) that the quality, selection and prediction benchmarks share;
- the frozen-feature evaluation of one extractor (:func:`evaluate`: few-shot, linear probe, kNN and,
  with another lab's features, the cross-lab columns of :mod:`benchmarks.crosslab`) and the raw-pixel
  reference (:data:`RAW_PIXELS`);
- each method's tuned settings (:data:`TUNED`: the quality benchmark's rows and the CPU speed grid);
- a report's provenance and files: :func:`command_line`, :func:`machine_line`, :func:`write_markdown`
  (keeps a hand-written ``## Analysis`` section across re-runs);
- :func:`run_alone_notice` for the benchmarks that time something.

The 95 % intervals are cellssl's own (:func:`cellssl.eval.metrics.mean_ci95`: Student-t), the
markdown tables :func:`cellssl.eval.report.markdown_table` and the figures
:func:`cellssl.plots.save_figure`. Importing this module loads neither torch nor scikit-learn, so a
benchmark's ``--help`` stays fast.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEFAULT_PBC = SHARED_DATA / "pbc128"  # PBC blood cells (Acevedo et al., Data in Brief 30, 2020), 128 px
DEFAULT_CROSS_LAB = SHARED_DATA / "jtsc128"  # another lab's white cells (Zheng et al., Micron 107, 2018)
RAW_PIXELS = "pixels:16"  # the raw-pixel reference: images area-averaged to 16×16 (cellssl's baseline spec)
SPLIT_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")  # the files make_split assigns (fixed: the split)

# the cross-lab columns (benchmarks/crosslab.py) and the adaptations of a trained row
XL_METRICS = ["xl_1shot", "xl_5shot", "xl_linear", "xl_linear_bal"]
METRICS = ["linear", "knn", "1shot", "5shot", "10shot"]  # the PBC columns of a row
ADAPT_LABELS = {"adabn": "AdaBN (`adapt --bn-only`)", "continued": "continued SSL (`adapt`)"}
ADAPT_KINDS = ("adabn", "continued")

# Each method's own settings, chosen on the val split (docs/tuning.md, with the number of tuning
# runs each method had). MSBReg's live in recipes/blood_smear.yaml (what users get).
TUNED: dict[str, list[str]] = {
    "msbreg": [],  # the blood_smear recipe is MSBReg's tuned setting (4 views x 64 images, strong colour)
    # the baselines keep their own 2 views x 128 images (what their papers and cellssl's recipes use,
    # recipes/blood_smear_vicreg.yaml too); blood_smear's views (docs/tuning.md phase C) are shared by all
    "byol": ["train.batch_size=128", "views.n_views=2"],
    "simclr": ["train.batch_size=128", "views.n_views=2"],
    "vicreg": ["train.batch_size=128", "views.n_views=2"],
    "barlow": ["train.batch_size=128", "views.n_views=2"],
}


def require_folder(path: str | Path, what: str, fix: str = "pass --data (a folder with one sub-folder per class)"
                   ) -> Path:
    """``path`` as a Path when it is a folder; otherwise exit with one line naming it and the ``fix``."""
    p = Path(path)
    if not p.is_dir():
        sys.exit(f"error: no {what} at {p}; {fix}")
    return p


def make_split(src: Path, work: Path, fractions=(0.7, 0.1, 0.2), seed: int = 0) -> dict[str, Path]:
    """Symlink a stratified split of a class-folder dataset into ``work/{pretrain,val,test}``.

    Assignment is by a hash of (seed, file name), so it is fixed, and independent of file order.
    A finished split (``work/.complete``) is reused as it is.
    """
    parts = {name: work / name for name in ("pretrain", "val", "test")}
    marker = work / ".complete"
    if marker.exists():
        return parts
    cuts = np.cumsum(fractions)
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        files = sorted(f for f in cls.iterdir() if f.suffix.lower() in SPLIT_SUFFIXES)
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


def evaluate(train_fs, test_fs, episodes: int, target_fs=None) -> dict:
    """Few-shot (8-way 1/5/10-shot on ``test_fs``), linear probe and kNN (k=20, T=0.07; fitted on
    ``train_fs``, tested on ``test_fs``) of one feature extractor; with ``target_fs`` (another lab)
    also the cross-lab columns (:func:`benchmarks.crosslab.crosslab_metrics`)."""
    from benchmarks.crosslab import crosslab_metrics  # start-up time: torch
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
    if target_fs is not None:
        row.update(crosslab_metrics(train_fs, target_fs, episodes))
    return row


def extractor_for(spec_str: str, args):
    """The feature extractor of a checkpoint or baseline spec (a checkpoint is read at its own image size;
    ``args``: ``image_size``, ``device`` and, when it has one, ``tta``: the orientation averaging,
    None / ``auto`` = each checkpoint recipe's ``eval.tta``, raw pixels plain)."""
    from cellssl.eval.features import FeatureExtractor  # start-up time: torch

    size = args.image_size if spec_str.startswith(("random:", "pixels:")) else None
    return FeatureExtractor(spec_str, image_size=size, device=args.device, batch_size=256, progress=False,
                            tta=getattr(args, "tta", None))


def features_for(spec_str: str, parts: dict[str, Path], args):
    """(probe features: the pretrain part, evaluation features: ``args.eval_on``, cross-lab features or None);
    ``args`` also gives ``probe_max`` and ``cross_lab``."""
    ex = extractor_for(spec_str, args)
    train = ex.features(parts["pretrain"], max_per_class=args.probe_max)
    test = ex.features(parts[args.eval_on])
    target = ex.features(args.cross_lab) if args.cross_lab else None
    return train, test, target


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """The command that reruns this benchmark: ``python -m benchmarks.<module> ARGS`` (``argv``,
    default this process's arguments), each argument quoted for a shell."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", f"benchmarks.{module}", *(shlex.quote(a) for a in args)])


def machine_line(extra: str = "") -> str:
    """``date: …; machine: x86_64, 2 CPU cores, torch 2.5.1`` (+ ``extra``) for a report's header;
    the torch version is read from its package metadata (torch is not imported for it)."""
    line = (f"date: {time.strftime('%Y-%m-%d %H:%M')}; machine: {platform.machine()}, {os.cpu_count()} CPU cores, "
            f"torch {metadata.version('torch')}")
    return f"{line}, {extra}" if extra else line


def write_markdown(path: Path, lines: Sequence[str]) -> Path:
    """Write a report's ``lines`` to ``path``; a hand-written ``## Analysis`` section already in the
    file there (from its heading to the end) is kept after them, so a re-run keeps the analysis."""
    keep = ""
    if path.exists():
        old = path.read_text()
        if "\n## Analysis" in old:
            keep = old[old.index("\n## Analysis"):]
    path.write_text("\n".join(lines) + keep)
    return path


def run_alone_notice() -> str:
    """A line for a benchmark that times something: the load average of the last minute against the
    CPU cores, and, when other processes are running (load ≥ 0.5), that they change the timings."""
    n = os.cpu_count() or 1
    if not hasattr(os, "getloadavg"):  # not on Windows
        return f"{n} CPU cores; run this alone on the machine: other processes change the timings"
    load = os.getloadavg()[0]
    line = f"load average {load:.2f} on {n} CPU cores before the run"
    if load >= 0.5:
        line += ": other processes are running and will slow and scatter the timings; run this alone"
    return line


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH`` (the child finds the
    ``benchmarks`` package from any working directory; relative ``--data`` / ``--work`` stay valid),
    plus ``extra`` variables (e.g. ``OMP_NUM_THREADS="1"``)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), path] if path else [str(REPO)]), **extra}


# ---- a row's summary over seeds and the main table (quality and lightly_vicreg) -------------------
def mean_interval(rows: list[dict], k: str) -> tuple[float, float]:
    """Mean over seeds of metric ``k`` and its 95 % interval: Student-t over seeds when there are
    several (:func:`cellssl.eval.metrics.mean_ci95`), else the stored episode interval ``<k>_ci``
    (few-shot) or 0."""
    from cellssl.eval.metrics import mean_ci95  # start-up time: scikit-learn (--help without it)

    if len(rows) > 1:
        return mean_ci95([r[k] for r in rows])
    return float(rows[0][k]), float(rows[0].get(f"{k}_ci", 0.0))


def summarise(rows: list[dict]) -> dict:
    """Mean and 95 % interval per metric (:func:`mean_interval`), per-seed values, budget figures,
    the cross-lab columns when every seed has them, and each adaptation's summary."""
    out: dict = {}
    keys = METRICS + [k for k in XL_METRICS if all(k in r for r in rows)]
    for k in keys:
        out[k] = mean_interval(rows, k)
        out[f"{k}_seeds"] = [float(r[k]) for r in rows]
    if "5shot" in out and "xl_5shot" in out:
        from benchmarks.crosslab import objective  # start-up time: torch

        out["objective"] = mean_interval([{"v": objective(r)} for r in rows], "v")
    out["n_seeds"] = len(rows)
    out["minutes"] = float(np.mean([r.get("minutes", 0.0) for r in rows]))
    out["steps"] = int(np.mean([r.get("steps", 0) for r in rows]))
    out["views_per_s"] = float(np.mean([r.get("views_per_s", 0.0) for r in rows]))
    out["shape"] = f"{rows[0]['batch']}×{rows[0]['n_views']}" if "batch" in rows[0] else ""
    for kind in ADAPT_KINDS:
        done = [r[kind] for r in rows if kind in r]
        if done and len(done) == len(rows):
            ad = {k: mean_interval(done, k) for k in XL_METRICS}
            ad.update(n_seeds=len(done), adapt_steps=int(np.mean([d.get("adapt_steps", 0) for d in done])),
                      adapt_minutes=float(np.mean([d.get("adapt_minutes", 0.0) for d in done])), tag=done[0]["tag"])
            out[kind] = ad
    return out


def fmt(v: tuple[float, float] | None) -> str:
    if v is None:
        return "–"
    return f"{v[0]:.3f} ± {v[1]:.3f}" if v[1] else f"{v[0]:.3f}"


def table(results: dict[str, dict], objective_column: bool = False) -> list[str]:
    """The main table: PBC columns, the cross-lab columns, (the tuning objective), budget figures."""
    head = ("| features | linear acc | kNN acc | 8-way 1-shot | 8-way 5-shot | 8-way 10-shot | other lab 1-shot | "
            "other lab 5-shot | PBC→other lab acc | PBC→other lab bal. acc |")
    head += " objective |" if objective_column else ""
    head += " seeds | steps | images×views | image-views/s | min/run |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        cells = [name, *[fmt(r.get(k)) for k in METRICS + XL_METRICS]]
        if objective_column:
            cells.append(f"**{fmt(r['objective'])}**" if "objective" in r else "–")
        cells += [str(r["n_seeds"]), str(r.get("steps") or "–"), r.get("shape") or "–",
                  f"{r['views_per_s']:.0f}" if r.get("views_per_s") else "–", f"{r.get('minutes', 0):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def seed_table(results: dict[str, dict]) -> list[str]:
    lines = ["| features | linear per seed | 5-shot per seed | other lab 5-shot per seed |", "|---|---|---|---|"]
    for name, r in results.items():
        if r["n_seeds"] > 1:
            xl = ", ".join(f"{x:.3f}" for x in r.get("xl_5shot_seeds", [])) or "–"
            lines.append(f"| {name} | {', '.join(f'{x:.3f}' for x in r['linear_seeds'])} | "
                         f"{', '.join(f'{x:.3f}' for x in r['5shot_seeds'])} | {xl} |")
    return lines
