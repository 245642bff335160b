"""Cross-lab columns of the quality benchmark: how frozen features carry to another lab's cells.

The target lab is a labelled folder whose classes are a subset of the source lab's (by folder name),
e.g. ``../shared/data/jtsc128`` (4 white-cell types from another lab, microscope and stain) against
PBC (``../shared/data/pbc128``). Three numbers per feature extractor, all with cellssl's own code:

* **within the target lab**: N-way K-shot SimpleShot episodes on the target images
  (:func:`cellssl.eval.fewshot.run_fewshot`, all target classes, 95 % interval over episodes);
* **zero-label transfer**: a linear probe (:func:`cellssl.eval.linear.fit_probe`) trained on the
  source lab's images of the target's classes only, tested on every target image: accuracy and
  balanced accuracy (the mean per-class recall; the target is imbalanced);
* the same after **adaptation** to the target's unlabelled images with ``cellssl adapt``
  (:func:`cellssl.adapt.continued.adapt`): ``--bn-only`` (AdaBN: the source probe's features keep the
  source BatchNorm statistics, the target's are re-estimated) or continued SSL (the weights change,
  so the probe is refit on the adapted model's source features).

:func:`objective` is the tuning objective: the mean of in-domain and cross-lab 5-shot accuracy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from benchmarks.common import ADAPT_KINDS
from cellssl.adapt.continued import adapt
from cellssl.engine.checkpoint import load_checkpoint
from cellssl.errors import DataError
from cellssl.eval.features import FeatureExtractor, FeatureSet
from cellssl.eval.fewshot import run_fewshot
from cellssl.eval.linear import fit_probe, linear_probe

XL_SHOTS = (1, 5)  # the columns are benchmarks.common.XL_METRICS


def restrict_classes(fs: FeatureSet, names: Sequence[str]) -> FeatureSet:
    """The rows of ``fs`` whose class is in ``names``, relabelled ``0..K-1`` in the order of ``names``.

    (N, F) -> (M, F). DataError naming the classes of ``names`` that ``fs`` lacks (the probe could
    never predict them)."""
    missing = [n for n in names if n not in fs.classes]
    if missing:
        raise DataError(f"the source data {fs.root} has no class {missing}; the target's classes must be "
                        f"among the source's {list(fs.classes)} (same folder names)")
    lut = np.array([list(names).index(c) if c in names else -1 for c in fs.classes], dtype=np.int64)
    new = lut[fs.labels]
    keep = np.flatnonzero(new >= 0)
    out = fs.subset(keep)
    out.labels = new[keep]
    out.classes = list(names)
    return out


def used_classes(fs: FeatureSet) -> list[str]:
    """The class names that have at least one image in ``fs`` (folder order)."""
    present = set(np.unique(fs.labels[fs.labels >= 0]).tolist())
    return [c for i, c in enumerate(fs.classes) if i in present]


def fewshot_within(target: FeatureSet, episodes: int, shots: Sequence[int] = XL_SHOTS, queries: int = 15,
                   seed: int = 0) -> dict:
    """All-way K-shot SimpleShot accuracy inside the target lab: ``{xl_<K>shot: mean, xl_<K>shot_ci: 95 %}``."""
    report = run_fewshot(target, ways=None, shots=tuple(shots), queries=queries, episodes=episodes, seed=seed)
    out: dict = {"xl_ways": report["results"][str(shots[0])]["ways"]}
    for k in shots:
        res = report["results"][str(k)]
        out[f"xl_{k}shot"], out[f"xl_{k}shot_ci"] = res["mean"], res["ci95"]
    return out


def transfer_probe(source: FeatureSet, target: FeatureSet, seed: int = 0) -> dict:
    """Zero-label transfer: a linear probe fitted on ``source``'s images of the target's classes, tested
    on all of ``target``: ``{xl_linear: accuracy, xl_linear_bal: balanced accuracy}``, plus the classes
    used and the number of target images."""
    names = used_classes(target)
    src = restrict_classes(source, names)
    tgt = restrict_classes(target, names)
    report = linear_probe(src, tgt, seed=seed, fit=fit_probe(src, seed=seed, hold_out=False))
    return {"xl_linear": report["accuracy"], "xl_linear_bal": report["balanced_accuracy"],
            "xl_classes": names, "xl_n": int(len(tgt))}


def crosslab_metrics(source: FeatureSet, target: FeatureSet, episodes: int, seed: int = 0) -> dict:
    """Few-shot within the target lab and zero-label transfer from ``source`` (both frozen features)."""
    return {**fewshot_within(target, episodes, seed=seed), **transfer_probe(source, target, seed=seed)}


def objective(row: dict) -> float:
    """The tuning objective: mean of in-domain 8-way 5-shot (``5shot``) and cross-lab 5-shot (``xl_5shot``)."""
    return float((row["5shot"] + row["xl_5shot"]) / 2.0)


def adapted_checkpoint(checkpoint: str | Path, target: str | Path, out: str | Path, kind: str, *,
                       steps: int | None = None, minutes: float | None = None, device: str | None = None,
                       source: str | Path | None = None, source_fraction: float | None = None,
                       overrides: Sequence[str] = ()) -> tuple[Path, dict]:
    """``cellssl adapt`` of ``checkpoint`` to the images of ``target`` (labels ignored) into ``out``:
    ``kind`` ``adabn`` (``--bn-only``) or ``continued`` (``steps`` / ``minutes`` of continued SSL).

    A finished run in ``out`` (``done.json``) is reused; an unfinished one is replaced. Returns
    (checkpoint, info: kind, steps, minutes)."""
    out = Path(out)
    done = out / "done.json"
    last = out / "checkpoints" / "last.pt"
    if done.exists() and last.exists():
        return last, json.loads(done.read_text())
    t0 = time.monotonic()
    if kind == "adabn":
        path = adapt(checkpoint, target, out, bn_only=True, device=device, overwrite=True)
    elif kind == "continued":
        path = adapt(checkpoint, target, out, max_steps=steps, max_minutes=minutes, device=device, source=source,
                     source_fraction=source_fraction, overrides=list(overrides), overwrite=True)
    else:
        raise ValueError(f"unknown adaptation '{kind}': use one of {ADAPT_KINDS}")
    step = int(load_checkpoint(path).get("step", 0))
    info = {"kind": kind, "adapt_steps": step if kind == "continued" else 0,
            "adapt_minutes": (time.monotonic() - t0) / 60}
    done.write_text(json.dumps(info))
    return path, info


def adapted_metrics(checkpoint: str | Path, source_dir: str | Path, target_dir: str | Path,
                    source_fs: FeatureSet | None, kind: str, out: str | Path, *, episodes: int, seed: int = 0,
                    probe_max: int | None = None, device: str = "auto", steps: int | None = None,
                    minutes: float | None = None, source_fraction: float | None = None,
                    overrides: Sequence[str] = (), tta: str | None = None) -> dict:
    """Cross-lab metrics of ``checkpoint`` after adaptation ``kind`` to ``target_dir``.

    AdaBN: the probe stays the source model's (``source_fs``, source BatchNorm statistics); only the
    target features come from the adapted checkpoint. Continued SSL: the weights changed, so the
    source features (``source_dir``, at most ``probe_max`` per class) are recomputed with the adapted
    model and the probe refit on them. ``source_fs``: the source model's features of ``source_dir``
    (computed here when None; unused by continued SSL). ``tta``: the orientation averaging of the
    features (None: the checkpoint recipe's ``eval.tta``)."""
    source, fraction = (source_dir, source_fraction) if source_fraction else (None, None)
    ckpt, info = adapted_checkpoint(checkpoint, target_dir, out, kind, steps=steps, minutes=minutes, device=device,
                                    source=source, source_fraction=fraction, overrides=overrides)
    opts = {"device": device, "batch_size": 256, "progress": False, "seed": seed, "tta": tta}
    ex = FeatureExtractor(ckpt, **opts)
    target = ex.features(target_dir)
    if kind == "continued":
        src = ex.features(source_dir, max_per_class=probe_max)
    else:
        src = source_fs if source_fs is not None else FeatureExtractor(checkpoint, **opts).features(
            source_dir, max_per_class=probe_max)
    return {**crosslab_metrics(src, target, episodes, seed=seed), **info}
