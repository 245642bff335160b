"""Throughput of the data pipeline: decoded + augmented views per second.

MultiViewDataset over ../shared/data/pbc128 (bright-field defaults, 2 views) through a
torch DataLoader, for num_workers 0/1/2 and image_size 64/128, batch 128, a fixed number of
batches after one warm-up batch. Usage::

    python -m benchmarks.data_pipeline [--batches 8] [--json out.json] [--data DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from benchmarks.common import DEFAULT_PBC, require_folder, run_alone_notice
from cellssl.augment.views import build_view_transform
from cellssl.config import DataConfig, ViewsConfig
from cellssl.data.datasets import MultiViewDataset, build_dataset


def measure(data_dir: Path, image_size: int, workers: int, batch: int, batches: int) -> dict[str, float]:
    """Views per second (and images per second) for one configuration."""
    data = DataConfig(path=str(data_dir), image_size=image_size)
    views = ViewsConfig(n_views=2)
    ds = build_dataset(data)
    mv = MultiViewDataset(ds, build_view_transform(views, data, ds.channels, seed=0))
    sampler = torch.utils.data.RandomSampler(mv, generator=torch.Generator().manual_seed(0))
    loader = torch.utils.data.DataLoader(
        mv, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
        persistent_workers=False, prefetch_factor=4 if workers else None,
    )
    it = iter(loader)
    next(it)  # warm-up: worker start, first decode
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        b = next(it)
        n += b["views"].shape[0]
    dt = time.perf_counter() - t0
    del it
    return {"image_size": image_size, "num_workers": workers, "images_per_s": n / dt,
            "views_per_s": n * views.n_views / dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_PBC)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args()
    require_folder(args.data, "image folder", "pass --data DIR")
    torch.set_num_threads(1)
    print(run_alone_notice())
    rows = []
    print(f"data pipeline: {args.data}, batch {args.batch_size}, {args.batches} batches, {os.cpu_count()} CPUs")
    print(f"{'size':>5} {'workers':>7} {'images/s':>9} {'views/s':>9}")
    for size in args.sizes:
        for w in args.workers:
            r = measure(args.data, size, w, args.batch_size, args.batches)
            rows.append(r)
            print(f"{size:>5} {w:>7} {r['images_per_s']:>9.0f} {r['views_per_s']:>9.0f}", flush=True)
    if args.json:
        meta = {"cpus": os.cpu_count(), "platform": platform.platform(), "batch_size": args.batch_size,
                "batches": args.batches}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
