"""CPU speed of a training step, per setting and per method, at equal image-views (issue 20 §3).

For each setting (precision, memory format, torch.compile, loader workers / compute threads), each
method and each shape (images × views per step, equal image-views: 64 × 4 and 128 × 2), this runs
``cellssl.engine.fit`` itself (the real loader and augmentations on ``--data``, default
``../shared/data/pbc128``, the ``blood_smear`` recipe with each method's own settings from
``benchmarks/common.py``'s TUNED, but the shape given here) for ``--warmup + --steps`` steps and
reads ``RUN/metrics.jsonl`` (one row per step):

- ``step s``: median compute time of a step after the warm-up (forward, backward, optimiser, EMA);
- ``wait s``: median wait for the next batch (loader workers that cannot keep up);
- ``views/s``: image-views per second of wall time, ``B·M / (step + wait)``;
- ``1st s``: the first step (for ``compile`` settings: the compile time);
- ``loss``: the mean loss of the last 5 steps, and ``Δ`` its difference from the ``fp32`` row of
  the same method and shape. Same seed, same data order and same views in every row, so a setting
  that changes only speed gives the same loss up to rounding; a setting that trains worse shows
  here first. This is the "trains as well" screen: a setting that passes it goes on to
  ``python -m benchmarks.quality`` at equal minutes, the check that counts (printed at the end).

Also printed: MSBReg's step time over VICReg's per setting and shape (target: ≤ 1.15×), and the
CPU's native-bf16 flags (``cellssl.engine.hardware``). Run it alone on the machine: other processes
change the timings. The whole grid (11 settings × 5 methods × 2 shapes × 25 steps of ~3 s) takes
about 2 hours on 2 cores; ``--settings`` / ``--methods`` / ``--shapes`` choose a part.

    python -m benchmarks.cpu_speed --json /tmp/cpu_speed.json           # everything
    python -m benchmarks.cpu_speed --settings fp32,bf16,cl,bf16_cl --methods msbreg,vicreg --shapes 64x4
    python -m benchmarks.cpu_speed --steps 2 --warmup 1 --shapes 8x2 --image-size 32   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_PBC, TUNED, child_env, run_alone_notice
from cellssl.config import load_recipe
from cellssl.engine import hardware
from cellssl.engine.fit import fit
from cellssl.engine.logger import read_metrics

# setting -> (what it is, recipe overrides). fp32 first: the reference of the loss column.
SETTINGS: dict[str, tuple[str, list[str]]] = {
    "fp32": ("float32, contiguous, eager (the EMA target's forward in bf16 where the CPU has bf16 dot "
             "products: train.target_precision=auto, the default)", ["train.precision=fp32"]),
    "target_fp32": ("float32 everywhere, the EMA target's forward too (train.target_precision=same): the "
                    "default before", ["train.precision=fp32", "train.target_precision=same"]),
    "bf16": ("bf16 autocast", ["train.precision=bf16"]),
    "fast": ("train.precision=fast: bf16 only on a CPU with AMX/AVX512-BF16", ["train.precision=fast"]),
    "cl": ("channels-last memory format on the CPU", ["train.precision=fp32", "model.channels_last_cpu=true"]),
    "bf16_cl": ("bf16 + channels-last", ["train.precision=bf16", "model.channels_last_cpu=true"]),
    "compile": ("torch.compile (inductor), fp32: blood_smear's default",
                ["train.precision=fp32", "train.compile=true"]),
    "bf16_cl_compile": ("bf16 + channels-last + torch.compile",
                        ["train.precision=bf16", "model.channels_last_cpu=true", "train.compile=true"]),
    "w1": ("1 loader worker (fp32)", ["train.precision=fp32", "data.num_workers=1"]),
    "w0": ("no loader worker: views made in the training process (fp32)", ["train.precision=fp32",
                                                                          "data.num_workers=0"]),
    "t1": ("2 loader workers, 1 compute thread (fp32)", ["train.precision=fp32", "train.threads=1"]),
    # not a speed-only setting: the target is the online network (SimSiam's stop-gradient), so its loss
    # differs from fp32's by design; only quality.py at equal minutes can say whether it trains as well
    "tau0": ("EMA momentum 0 (MSBReg, BYOL): no target forward; a different target, fp32",
             ["train.precision=fp32", "method.momentum_base=0", "method.momentum_end=0"]),
}
METHODS = ("msbreg", "vicreg", "simclr", "barlow", "byol")
SHAPES = ("64x4", "128x2")
LOSS_TAIL = 5  # the loss column averages the last steps
RESULT = "RESULT "  # the line a child measurement prints its result on


def parse_shape(text: str) -> tuple[int, int]:
    """``"64x4"`` -> (64 images, 4 views)."""
    try:
        b, m = (int(v) for v in text.lower().split("x"))
    except ValueError:
        sys.exit(f"error: --shapes: '{text}' must look like IMAGESxVIEWS, e.g. 64x4")
    return b, m


def run_overrides(method: str, shape: str, setting: str, args, out: Path) -> list[str]:
    """The recipe overrides of one measurement: the method's own settings, the shape, the setting."""
    b, m = parse_shape(shape)
    own = [s for s in TUNED.get(method, []) if not s.startswith(("train.batch_size=", "views.n_views="))]
    big = "1000000"
    return [f"method.name={method}", *own, f"data.path={args.data}", f"data.image_size={args.image_size}",
            f"model.backbone={args.backbone}", f"train.batch_size={b}", f"views.n_views={m}",
            f"train.max_steps={args.warmup + args.steps}", f"train.out={out}", "train.log_every=1",
            f"train.monitor_every={big}", f"train.checkpoint_every={big}", "train.progress=false",
            "train.device=cpu", f"train.seed={args.seed}", "train.compile=false", *SETTINGS[setting][1], *args.set]


def measure_in_child(method: str, shape: str, setting: str, args, work: Path) -> dict:
    """:func:`measure` in a fresh interpreter (threads, compiled graphs, allocator and loader workers
    never carry from one measurement to the next); waits at most ``--timeout`` seconds."""
    cmd = [sys.executable, "-m", "benchmarks.cpu_speed", "--one", f"{method},{shape},{setting}", "--work", str(work),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--data", args.data,
           "--image-size", str(args.image_size), "--backbone", args.backbone, "--seed", str(args.seed),
           *[a for s in args.set for a in ("--set", s)]]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, env=child_env())
    except subprocess.TimeoutExpired:
        return {"method": method, "shape": shape, "setting": setting, "error": f"timed out after {args.timeout} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
    return {"method": method, "shape": shape, "setting": setting, "error": f"exit {done.returncode}: {tail}"}


def measure(method: str, shape: str, setting: str, args, work: Path) -> dict:
    """Train ``--warmup + --steps`` steps with ``fit``; the timings and losses of ``metrics.jsonl``."""
    out = work / f"{method}-{shape}-{setting}"
    recipe = load_recipe("blood_smear", run_overrides(method, shape, setting, args, out))
    t0 = time.perf_counter()
    fit(recipe, overwrite=True)
    total = time.perf_counter() - t0
    rows = [r for r in read_metrics(out) if "step_time_s" in r]
    timed = [r for r in rows if r["step"] > args.warmup] or rows[-1:]
    step = statistics.median(r["step_time_s"] for r in timed)
    wait = statistics.median(r["data_time_s"] for r in timed)
    b, m = parse_shape(shape)
    return {"method": method, "shape": shape, "setting": setting, "step_s": step, "wait_s": wait,
            "views_per_s": b * m / max(step + wait, 1e-9), "first_step_s": rows[0]["step_time_s"],
            "loss": statistics.fmean(r["loss"] for r in rows[-LOSS_TAIL:]), "steps": len(rows), "run_s": total}


def report(results: list[dict], settings: list[str], methods: list[str], shapes: list[str]) -> list[str]:
    """Markdown tables: one per shape (settings × methods), then MSBReg / VICReg per setting."""
    by = {(r["method"], r["shape"], r["setting"]): r for r in results if "error" not in r}
    lines = []
    for shape in shapes:
        lines += ["", f"### {shape.replace('x', ' images × ')} views per step", "",
                  "| setting | method | step s | wait s | views/s | 1st s | loss | Δ vs fp32 |",
                  "|---|---|---|---|---|---|---|---|"]
        for setting in settings:
            for method in methods:
                r = by.get((method, shape, setting))
                if r is None:
                    continue
                ref = by.get((method, shape, "fp32"))
                delta = f"{r['loss'] - ref['loss']:+.4f}" if ref and setting != "fp32" else ""
                lines.append(f"| {setting} | {method} | {r['step_s']:.3f} | {r['wait_s']:.3f} | "
                             f"{r['views_per_s']:.1f} | {r['first_step_s']:.2f} | {r['loss']:.4f} | {delta} |")
    if "msbreg" in methods and "vicreg" in methods:
        lines += ["", "MSBReg step / VICReg step (target ≤ 1.15):", ""]
        for shape in shapes:
            for setting in settings:
                a, v = by.get(("msbreg", shape, setting)), by.get(("vicreg", shape, setting))
                if a and v:
                    lines.append(f"- {shape} {setting}: {a['step_s'] / v['step_s']:.2f}×")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated: " + "; ".join(f"{k} = {v[0]}" for k, v in SETTINGS.items()))
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--shapes", default=",".join(SHAPES), help="IMAGESxVIEWS per step (equal image-views)")
    p.add_argument("--steps", type=int, default=20, help="timed steps after the warm-up")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", default=str(DEFAULT_PBC))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    p.add_argument("--work", default=None, help="folder for the runs (default: a temporary folder)")
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one measurement may take")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # METHOD,SHAPE,SETTING: one measurement
    args = p.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    bad = [s for s in args.settings if s not in SETTINGS]
    if bad:
        p.error(f"--settings: unknown {', '.join(bad)}; choose from {', '.join(SETTINGS)}")
    args.methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    for s in args.shapes:
        parse_shape(s)
    if not Path(args.data).is_dir():
        p.error(f"--data {args.data} is not a folder of images")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.one:
        method, shape, setting = args.one.split(",")
        print(RESULT + json.dumps(measure(method, shape, setting, args, Path(args.work))), flush=True)
        return {}
    threads = torch.get_num_threads()
    flags = sorted(f for f in hardware.cpu_flags() if "bf16" in f or f.startswith("amx"))
    head = (f"{platform.processor() or platform.machine()}, {threads} threads, torch {torch.__version__}, "
            f"native-bf16 flags: {', '.join(flags) or 'none'} (train.precision=fast -> "
            f"{hardware.resolve_precision(torch.device('cpu'), 'fast')})")
    print(head, flush=True)
    print(run_alone_notice(), flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        for shape in args.shapes:
            for method in args.methods:
                for setting in args.settings:
                    r = measure_in_child(method, shape, setting, args, work)
                    results.append(r)
                    if "error" in r:
                        print(f"{shape} {method:7s} {setting:16s} failed: {r['error']}", flush=True)
                        continue
                    print(f"{shape} {method:7s} {setting:16s} step {r['step_s']:.3f} s  wait {r['wait_s']:.3f} s  "
                          f"{r['views_per_s']:7.1f} views/s  1st {r['first_step_s']:.2f} s  loss {r['loss']:.4f}",
                          flush=True)
    lines = report(results, args.settings, args.methods, args.shapes)
    print("\n".join(lines))
    print("\nNext, for a setting that is faster with the same loss: the check at equal minutes, e.g.\n"
          "  python -m benchmarks.quality --minutes 20 --seeds 2 --rows MSBReg,VICReg "
          "--variant \"bf16=train.precision=bf16;model.channels_last_cpu=true\"")
    out = {"machine": head, "args": {k: v for k, v in vars(args).items()}, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
