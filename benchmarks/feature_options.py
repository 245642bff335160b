"""How a trained checkpoint's features are computed, and what it changes: orientation averaging
(``--tta``), the input size and a power transform of the features, on the PBC split and another
lab's cells.

One checkpoint (or several: each is a row group), no training: every option re-extracts the
features of the pretrain part (the probes' training set), of the evaluated split (``--eval-on``,
``val`` for a choice) and of the other lab, and runs the quality benchmark's evaluation
(:func:`benchmarks.common.evaluate`: linear probe, kNN, 8-way few-shot, the cross-lab columns).
The checkpoints are those the quality benchmark leaves in its ``--work`` folder
(``runs/<row>/checkpoints/last.pt``).

    python -m benchmarks.feature_options --checkpoint runs/quality/runs/msbreg-...-s0/checkpoints/last.pt \\
        --options 64:none,64:dihedral,80:none,64:dihedral:0.5 --eval-on val --out /tmp/feature_options.md

An option is ``SIZE:TTA[:POWER]``: the network's input side in pixels (the checkpoint's own is its
training size), ``none`` (one pass per image) or ``dihedral`` (the mean of the image's 8
rotations and flips, :mod:`cellssl.models.orientation`), and optionally ``POWER`` ``b`` in (0, 1]:
every feature ``x >= 0`` (the pooled output of a ReLU network) becomes ``x**b`` before every
probe (Tukey's ladder of powers, as in PT-MAP, Hu et al. 2021; default 1 = unchanged). Options
that differ only in ``POWER`` share one extraction. Prints each row as it finishes and writes a
markdown table with the command and date; ``seconds`` is the wall-clock of that row's
extractions (0 when shared) and its evaluation (run it alone to compare them).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    DEFAULT_CROSS_LAB,
    DEFAULT_PBC,
    command_line,
    evaluate,
    machine_line,
    make_split,
    require_folder,
    run_alone_notice,
    write_markdown,
)

COLUMNS = [("linear", "linear acc"), ("knn", "kNN acc"), ("5shot", "8-way 5-shot"), ("xl_5shot", "other lab 5-shot"),
           ("xl_linear_bal", "PBC→other lab bal. acc")]


def parse_option(text: str) -> tuple[int, str, float]:
    """``"64:dihedral"`` -> ``(64, "dihedral", 1.0)``, ``"64:none:0.5"`` -> ``(64, "none", 0.5)``;
    exits with one line on anything else."""
    m = re.fullmatch(r"(\d+):(none|dihedral)(?::(\d*\.?\d+))?", text.strip())
    if m is None or not 0 < float(m[3] or 1) <= 1:
        raise SystemExit(f"error: --options item {text!r} is not SIZE:TTA[:POWER] (e.g. 64:dihedral or "
                         f"64:dihedral:0.5; TTA none or dihedral; POWER in (0, 1])")
    return int(m[1]), m[2], float(m[3] or 1)


def power_transform(fs, power: float):
    """The feature set with every feature ``x`` replaced by ``max(x, 0) ** power`` ((N, F) -> (N, F)
    float32; ``power`` 1: the set itself). Pooled ReLU features are never negative; the clip only
    guards the root."""
    if power == 1:
        return fs
    return dataclasses.replace(fs, features=np.power(np.maximum(fs.features, 0), power).astype(np.float32))


def option_features(checkpoint: str, size: int, tta: str, parts: dict[str, Path], args) -> tuple:
    """(probe features, evaluated split's, other lab's or None) of one checkpoint at input ``size``
    with orientation averaging ``tta``."""
    from cellssl.eval.features import FeatureExtractor  # start-up time: torch

    ex = FeatureExtractor(checkpoint, image_size=size, tta=tta, device=args.device, batch_size=256, progress=False)
    train = ex.features(parts["pretrain"], max_per_class=args.probe_max)
    test = ex.features(parts[args.eval_on])
    target = ex.features(args.cross_lab) if args.cross_lab else None
    return train, test, target


def option_row(sets: tuple, power: float, args) -> dict:
    """The evaluation of one option's features (:func:`option_features`) after :func:`power_transform`."""
    train, test, target = (power_transform(s, power) if s is not None else None for s in sets)
    return evaluate(train, test, args.episodes, target)


def table_lines(rows: list[tuple[str, int, str, float, dict]]) -> list[str]:
    """The markdown table: one line per (checkpoint, size, tta, power)."""
    head = "| checkpoint | input px | features | " + " | ".join(c for _, c in COLUMNS) + " | seconds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for ckpt, size, tta, power, r in rows:
        label = "mean of 8 rotations and flips" if tta == "dihedral" else "one pass"
        label += f", x^{power:g}" if power != 1 else ""
        vals = " | ".join(f"{r[k]:.3f}" if k in r else "–" for k, _ in COLUMNS)
        lines.append(f"| `{ckpt}` | {size} | {label} | {vals} | {r['seconds']:.0f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="a checkpoint (repeatable)")
    ap.add_argument("--options", default="64:none,64:dihedral", help="comma-separated SIZE:TTA[:POWER]")
    ap.add_argument("--data", default=str(DEFAULT_PBC))
    ap.add_argument("--cross-lab", default=str(DEFAULT_CROSS_LAB), help="another lab's labelled folder, or none")
    ap.add_argument("--work", default="runs/quality", help="where the PBC split is (made if missing)")
    ap.add_argument("--eval-on", choices=["val", "test"], default="val")
    ap.add_argument("--episodes", type=int, default=600)
    ap.add_argument("--probe-max", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", default=None, help="markdown table (default: only printed)")
    args = ap.parse_args(argv)
    args.cross_lab = None if str(args.cross_lab).lower() == "none" else args.cross_lab
    args.parsed = [parse_option(o) for o in args.options.split(",") if o.strip()]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_folder(args.data, "PBC data")
    if args.cross_lab:
        require_folder(args.cross_lab, "cross-lab data", "pass --cross-lab DIR or --cross-lab none")
    for c in args.checkpoint:
        if not Path(c).is_file():
            raise SystemExit(f"error: no checkpoint at {c}; pass a last.pt from a pretrain or quality run")
    parts = make_split(Path(args.data), Path(args.work) / "split")
    header = [f"{command_line('feature_options', argv)}", machine_line(), run_alone_notice()]
    print("\n".join(header), flush=True)
    rows = []
    for ckpt in args.checkpoint:
        extracted: dict[tuple[int, str], tuple] = {}  # options differing only in POWER share the features
        for size, tta, power in args.parsed:
            t0 = time.monotonic()
            if (size, tta) not in extracted:
                extracted[size, tta] = option_features(ckpt, size, tta, parts, args)
            r = option_row(extracted[size, tta], power, args)
            r["seconds"] = time.monotonic() - t0
            rows.append((ckpt, size, tta, power, r))
            print(table_lines(rows)[-1], flush=True)
    if args.out:
        lines = ["# Feature options of trained checkpoints", "", *[f"- {h}" for h in header],
                 f"- evaluated on PBC **{args.eval_on}** (probes fitted on the pretrain part); other lab: "
                 f"{args.cross_lab or 'none'}", "", *table_lines(rows), ""]
        print(f"wrote {write_markdown(Path(args.out), lines)}")


if __name__ == "__main__":
    main()
