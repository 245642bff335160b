"""End-to-end transfer benchmark: PBC (source lab) -> simulated scanner shift of PBC (target lab).

1. Fixed, disjoint subsets of the PBC folder (``--data``, default ../shared/data/pbc128): N images
   per class as the source lab, M others per class as the target lab (before shifting). The
   images are symlinked into the work folder, never copied into the repository.
2. The target lab = ``shift_folder(target, preset=scanner_b)`` (stain, blur, resolution, JPEG,
   illumination gradient).
3. Pretrain on the source lab (blood_smear recipe, short CPU run) unless ``--checkpoint`` is given.
4. ``adapt``: continued SSL on the target lab's (unlabelled) images.
5. ``transfer_report``: source model, + AdaBN, + stain normalisation, + continued SSL.

    .venv/bin/python -m benchmarks.transfer --quick          # < 10 minutes on 2 CPU cores
    .venv/bin/python -m benchmarks.transfer                  # 150/100 per class, 64 px, 300+150 steps

Prints the table and writes WORK/report/transfer.{md,json,png} and WORK/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from benchmarks.common import DEFAULT_PBC, require_folder

FULL = {"source_per_class": 150, "target_per_class": 100, "image_size": 64, "pretrain_steps": 300,
        "adapt_steps": 150, "batch_size": 64, "episodes": 300}
QUICK = {"source_per_class": 50, "target_per_class": 40, "image_size": 32, "pretrain_steps": 100,
         "adapt_steps": 50, "batch_size": 32, "episodes": 100}


def make_labs(data: Path, work: Path, n_source: int, n_target: int, seed: int) -> tuple[Path, Path]:
    """Symlinked source-lab and (unshifted) target-lab folders with disjoint images per class."""
    from cellssl.data.io import is_image_file

    src_root, tgt_root = work / "source", work / "target_raw"
    rng = np.random.default_rng(seed)
    classes = sorted(d for d in data.iterdir() if d.is_dir() and not d.name.startswith("."))
    for d in classes:
        files = sorted(p for p in d.iterdir() if p.is_file() and is_image_file(p))
        pick = rng.permutation(len(files))
        if len(files) < n_source + n_target:
            raise SystemExit(f"{d} has {len(files)} images, fewer than {n_source}+{n_target}")
        for root, idx in ((src_root, pick[:n_source]), (tgt_root, pick[n_source:n_source + n_target])):
            (root / d.name).mkdir(parents=True, exist_ok=True)
            for i in idx:
                link = root / d.name / files[i].name
                if not link.exists():
                    os.symlink(files[i].resolve(), link)
    return src_root, tgt_root


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """(the options, the settings: ``--quick``'s or the full ones, each overridden by its option)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_PBC)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a new temp folder)")
    ap.add_argument("--checkpoint", default=None, help="source checkpoint (skip pretraining)")
    ap.add_argument("--quick", action="store_true", help="small, 32 px, short runs: < 10 min on 2 CPU cores")
    ap.add_argument("--preset", default="scanner_b")
    ap.add_argument("--source-per-class", type=int)
    ap.add_argument("--target-per-class", type=int)
    ap.add_argument("--image-size", type=int)
    ap.add_argument("--pretrain-steps", type=int)
    ap.add_argument("--adapt-steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--episodes", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    cfg.update({k: getattr(args, k) for k in cfg if getattr(args, k) is not None})
    return args, cfg


def pretrain_source(source: Path, work: Path, cfg: dict, args) -> Path:
    """The source model: ``--checkpoint``, else a short ``blood_smear`` pretraining on the source lab
    (32 px and smaller: a pooled stem and smaller heads); returns its checkpoint."""
    from cellssl.config import load_recipe  # start-up time: torch
    from cellssl.engine.fit import fit

    if args.checkpoint:
        return Path(args.checkpoint)
    overrides = [f"data.path={source}", f"train.out={work / 'pretrain'}", f"train.max_steps={cfg['pretrain_steps']}",
                 f"data.image_size={cfg['image_size']}", f"train.batch_size={cfg['batch_size']}",
                 "data.num_workers=1", "train.progress=false", "train.checkpoint_every=100",
                 f"train.seed={args.seed}", f"train.device={args.device}"]
    if cfg["image_size"] <= 32:
        overrides += ["model.stem=pool", "model.proj_hidden=512", "model.pred_hidden=512", "model.proj_dim=128"]
    return fit(load_recipe("blood_smear", overrides)).checkpoint


def adapt_target(ckpt: Path, target: Path, work: Path, cfg: dict, args) -> Path:
    """``cellssl adapt`` (continued SSL) of ``ckpt`` on the target lab's images into WORK/adapt
    (a finished earlier run there is replaced)."""
    from cellssl.adapt.continued import adapt  # start-up time: torch

    adapted_dir = work / "adapt"
    if (adapted_dir / "checkpoints" / "last.pt").exists():
        shutil.rmtree(adapted_dir)
    return adapt(ckpt, target, adapted_dir, max_steps=cfg["adapt_steps"],
                 device=None if args.device == "auto" else args.device,
                 overrides=["train.progress=false", "data.num_workers=1"])


def timed(times: dict[str, float], name: str, fn, *a):
    """``fn(*a)``, its wall-clock seconds stored as ``times[name]``."""
    t0 = time.perf_counter()
    out = fn(*a)
    times[name] = time.perf_counter() - t0
    return out


def make_target(data: Path, work: Path, cfg: dict, args) -> tuple[Path, Path]:
    """(source lab, target lab): the symlinked subsets, the target shifted by ``--preset`` once."""
    from cellssl.adapt.shift import shift_folder  # start-up time: torch

    source, target_raw = make_labs(data, work, cfg["source_per_class"], cfg["target_per_class"], args.seed)
    target = work / "target"
    if not target.exists():
        shift_folder(target_raw, target, preset=args.preset, seed=args.seed)
    return source, target


def report(ckpt: Path, adapted: Path, source: Path, target: Path, work: Path, cfg: dict, args) -> Path:
    """``transfer_report`` of the source model and its adaptations on the target lab: WORK/report."""
    from cellssl.adapt.report import transfer_report  # start-up time: torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transfer_report(ckpt, source, target, work / "report", adapted=adapted, episodes=cfg["episodes"],
                               device=args.device, seed=args.seed)


def main(argv: list[str] | None = None) -> dict:
    args, cfg = parse_args(argv)
    data = require_folder(args.data, "PBC data", "pass --data (see ../shared/data/README.md)")
    import torch  # start-up time

    from cellssl.adapt.report import format_table

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = args.work or Path(tempfile.mkdtemp(prefix="cellssl-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    source, target = timed(times, "data_s", make_target, data, work, cfg, args)
    ckpt = timed(times, "pretrain_s", pretrain_source, source, work, cfg, args)
    adapted = timed(times, "adapt_s", adapt_target, ckpt, target, work, cfg, args)
    md = timed(times, "report_s", report, ckpt, adapted, source, target, work, cfg, args)
    result = {"settings": {**cfg, "preset": args.preset, "seed": args.seed, "data": str(args.data),
                           "checkpoint": str(ckpt), "adapted": str(adapted), "quick": args.quick},
              "times": times, "report": str(md)}
    (work / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(json.loads((md.parent / "transfer.json").read_text())))
    print()
    print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f" (total {sum(times.values()):.0f}s)")
    print(f"report: {md}")
    return result


if __name__ == "__main__":
    main()
