"""How a trained checkpoint's features are computed, and what it changes: orientation averaging
(``--tta``) and the input size, on the PBC split and another lab's cells.

One checkpoint (or several: each is a row group), no training: every option re-extracts the
features of the pretrain part (the probes' training set), of the evaluated split (``--eval-on``,
``val`` for a choice) and of the other lab, and runs the quality benchmark's evaluation
(:func:`benchmarks.common.evaluate`: linear probe, kNN, 8-way few-shot, the cross-lab columns).
The checkpoints are those the quality benchmark leaves in its ``--work`` folder
(``runs/<row>/checkpoints/last.pt``).

    python -m benchmarks.feature_options --checkpoint runs/quality/runs/msbreg-...-s0/checkpoints/last.pt \\
        --options 64:none,64:dihedral,80:none --eval-on val --out /tmp/feature_options.md

An option is ``SIZE:TTA``: the network's input side in pixels (the checkpoint's own is its
training size) and ``none`` (one pass per image) or ``dihedral`` (the mean of the image's 8
rotations and flips, :mod:`cellssl.models.orientation`). Prints each row as it finishes and writes
a markdown table with the command and date; ``seconds`` is the wall-clock of that row's three
extractions and its evaluation (run it alone to compare them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

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


def parse_option(text: str) -> tuple[int, str]:
    """``"64:dihedral"`` -> ``(64, "dihedral")``; exits with one line on anything else."""
    size, _, tta = text.strip().partition(":")
    if not size.isdigit() or tta not in ("none", "dihedral"):
        raise SystemExit(f"error: --options item {text!r} is not SIZE:TTA (e.g. 64:dihedral; TTA none or dihedral)")
    return int(size), tta


def option_row(checkpoint: str, size: int, tta: str, parts: dict[str, Path], args) -> dict:
    """The evaluation of one checkpoint's features at input ``size`` with orientation averaging ``tta``."""
    from cellssl.eval.features import FeatureExtractor  # start-up time: torch

    t0 = time.monotonic()
    ex = FeatureExtractor(checkpoint, image_size=size, tta=tta, device=args.device, batch_size=256, progress=False)
    train = ex.features(parts["pretrain"], max_per_class=args.probe_max)
    test = ex.features(parts[args.eval_on])
    target = ex.features(args.cross_lab) if args.cross_lab else None
    row = evaluate(train, test, args.episodes, target)
    row["seconds"] = time.monotonic() - t0
    return row


def table_lines(rows: list[tuple[str, int, str, dict]]) -> list[str]:
    """The markdown table: one line per (checkpoint, size, tta)."""
    head = "| checkpoint | input px | features | " + " | ".join(c for _, c in COLUMNS) + " | seconds |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 4)]
    for ckpt, size, tta, r in rows:
        label = "mean of 8 rotations and flips" if tta == "dihedral" else "one pass"
        vals = " | ".join(f"{r[k]:.3f}" if k in r else "–" for k, _ in COLUMNS)
        lines.append(f"| `{ckpt}` | {size} | {label} | {vals} | {r['seconds']:.0f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="a checkpoint (repeatable)")
    ap.add_argument("--options", default="64:none,64:dihedral", help="comma-separated SIZE:TTA")
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
        for size, tta in args.parsed:
            r = option_row(ckpt, size, tta, parts, args)
            rows.append((ckpt, size, tta, r))
            print(table_lines(rows)[-1], flush=True)
    if args.out:
        lines = ["# Feature options of trained checkpoints", "", *[f"- {h}" for h in header],
                 f"- evaluated on PBC **{args.eval_on}** (probes fitted on the pretrain part); other lab: "
                 f"{args.cross_lab or 'none'}", "", *table_lines(rows), ""]
        print(f"wrote {write_markdown(Path(args.out), lines)}")


if __name__ == "__main__":
    main()
