"""End-to-end transfer benchmark: PBC (source lab) -> simulated scanner shift of PBC (target lab).

1. Fixed, disjoint subsets of the PBC folder (``--data``, default ../shared/data/pbc128): N images
   per class as the source lab, M others per class as the target lab (before shifting). The
   images are symlinked into the work folder, never copied into the repository.
2. The target lab = ``shift_folder(target, preset=scanner_b)`` (stain, blur, resolution, JPEG,
   illumination gradient).
3. Pretrain on the source lab (blood_smear recipe, short CPU run) unless ``--checkpoint`` is given.
4. ``adapt``: continued SSL on the target lab's (unlabelled) images.
5. ``transfer_report``: source model, + AdaBN, + stain normalisation, + continued SSL.

    .venv/bin/python benchmarks/transfer.py --quick          # < 10 minutes on 2 CPU cores
    .venv/bin/python benchmarks/transfer.py                  # 150/100 per class, 64 px, 300+150 steps

Prints the table and writes WORK/report/transfer.{md,json,png} and WORK/benchmark.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pbc128"

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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
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
    for k in cfg:
        v = getattr(args, k)
        if v is not None:
            cfg[k] = v
    if not args.data.is_dir():
        raise SystemExit(f"PBC data not found at {args.data} (see ../shared/data/README.md); pass --data")

    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    from cellssl.adapt.continued import adapt
    from cellssl.adapt.report import format_table, transfer_report
    from cellssl.adapt.shift import shift_folder
    from cellssl.config import load_recipe
    from cellssl.engine.fit import fit

    work = args.work or Path(tempfile.mkdtemp(prefix="cellssl-transfer-"))
    work.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    source, target_raw = make_labs(args.data, work, cfg["source_per_class"], cfg["target_per_class"], args.seed)
    target = work / "target"
    if not target.exists():
        shift_folder(target_raw, target, preset=args.preset, seed=args.seed)
    times["data_s"] = time.perf_counter() - t0
    device = None if args.device == "auto" else args.device

    t0 = time.perf_counter()
    if args.checkpoint:
        ckpt = Path(args.checkpoint)
    else:
        overrides = [f"data.path={source}", f"train.out={work / 'pretrain'}",
                     f"train.max_steps={cfg['pretrain_steps']}",
                     f"data.image_size={cfg['image_size']}", f"train.batch_size={cfg['batch_size']}",
                     "data.num_workers=1", "train.progress=false", "train.checkpoint_every=100",
                     f"train.seed={args.seed}", f"train.device={args.device}"]
        if cfg["image_size"] <= 32:
            overrides += ["model.stem=pool", "model.proj_hidden=512", "model.pred_hidden=512", "model.proj_dim=128"]
        ckpt = fit(load_recipe("blood_smear", overrides)).checkpoint
    times["pretrain_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    adapted_dir = work / "adapt"
    last = adapted_dir / "checkpoints" / "last.pt"
    if last.exists():
        import shutil

        shutil.rmtree(adapted_dir)
    adapted = adapt(ckpt, target, adapted_dir, max_steps=cfg["adapt_steps"], device=device,
                    overrides=["train.progress=false", "data.num_workers=1"])
    times["adapt_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = transfer_report(ckpt, source, target, work / "report", adapted=adapted, episodes=cfg["episodes"],
                             device=args.device, seed=args.seed)
    times["report_s"] = time.perf_counter() - t0
    report = json.loads((md.parent / "transfer.json").read_text())
    result = {"settings": {**cfg, "preset": args.preset, "seed": args.seed, "data": str(args.data),
                           "checkpoint": str(ckpt), "adapted": str(adapted), "quick": args.quick},
              "times": times, "report": str(md)}
    (work / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(report))
    print()
    print("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in times.items()) + f" (total {sum(times.values()):.0f}s)")
    print(f"report: {md}")
    return result


if __name__ == "__main__":
    main()
