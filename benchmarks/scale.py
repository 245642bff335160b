"""Scale: the same synthetic cells as a folder of PNGs and as tar shards (issue 22).

For each size N (``--sizes 2000`` or ``--sizes 10000,100000,1000000``):

1. writes N synthetic smear cells (``cellssl.data.synth.generate_smear_image``, ``--image-size``
   px) as a labelled folder; the first ``--unique`` are drawn by the generator, the rest repeat
   their encoded PNG bytes (drawing 1M cells takes hours on 2 cores; the loader cost is the same);
2. shards the folder (``cellssl.data.shards.write_shards``, ``--shard-size``) and times it;
3. disk size of both;
4. for both: time to the first training step and peak RSS of a ``cellssl pretrain`` process
   (resnet18, ``--image-size`` px, batch 64, 2 views, no loader worker, ``--steps`` steps): the
   first step is the first row of ``metrics.jsonl``, the RSS is the child's ``ru_maxrss``;
5. for both: seconds to build the dataset (listing the folder / reading the index) and the Python
   memory it holds per cell (tracemalloc);
6. for both: loader images/s with 0, 1 and 2 workers through the training loader itself
   (``engine.loader``: shuffled, epoch-seeded, 2 augmented views per image);
7. embed throughput from the shards (``random:resnet18``, batch 256).

Prints one table per size; ``--json OUT`` writes every number.

    python -m benchmarks.scale --sizes 2000                     # smoke run (a few minutes on 2 cores)
    python -m benchmarks.scale --sizes 10000,100000 --unique 20000 --work /big/disk/scale
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from benchmarks.common import REPO
from cellssl.config import DataConfig, load_recipe
from cellssl.data.datasets import build_dataset
from cellssl.data.shards import write_shards
from cellssl.data.synth import SYNTH_CLASSES, generate_smear_image
from cellssl.engine.distributed import ResumableSampler
from cellssl.engine.loader import build_training_data, training_loader
from cellssl.eval.features import embed

PROCESS_TIMEOUT_S = 1800


def write_cells(out: Path, n: int, unique: int, size: int, seed: int = 0) -> None:
    """``out/<class>/<class>_<i>.png`` for i < n; cells ≥ ``unique`` repeat cell ``i % unique``'s bytes."""
    pngs = []
    for i in range(min(n, unique)):
        img = generate_smear_image(SYNTH_CLASSES[i % len(SYNTH_CLASSES)], np.random.default_rng([seed, i]), size)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        pngs.append(buf.getvalue())
    for cls in SYNTH_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        cls = SYNTH_CLASSES[(i % len(pngs)) % len(SYNTH_CLASSES)]
        (out / cls / f"{cls}_{i:07d}.png").write_bytes(pngs[i % len(pngs)])


def disk_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks) of every file below ``path``."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def dataset_cost(data: Path) -> dict[str, float]:
    """Seconds to build the dataset of ``data`` (listing / index) and the Python memory it holds per cell."""
    tracemalloc.start()
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(), data)
    seconds = time.perf_counter() - t0
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"build_s": seconds, "bytes_per_cell": held / len(ds)}


def recipe_file(path: Path, size: int, steps: int) -> Path:
    recipe = {
        "name": "scale",
        "data": {"image_size": size, "num_workers": 0},
        "views": {"n_views": 2},
        "model": {"backbone": "resnet18", "stem": "pool", "proj_hidden": 512, "proj_dim": 128, "pred_hidden": 512},
        "method": {"name": "msbreg"},
        "optim": {"name": "adamw", "lr": 0.002},
        "train": {"batch_size": 64, "max_steps": steps, "checkpoint_every": 10**6, "log_every": 1,
                  "monitor_every": 10**6, "progress": False, "threads": 1},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def pretrain_process(recipe: Path, data: Path, out: Path) -> dict[str, float]:
    """Run ``cellssl pretrain`` in a child; seconds to its first logged step, total seconds, peak RSS (MB)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "cellssl", "pretrain", "--recipe", str(recipe), "--data", str(data),
           "--out", str(out), "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics, first, status, usage, pid = out / "metrics.jsonl", None, None, None, 0
    try:
        while time.perf_counter() - t0 < PROCESS_TIMEOUT_S:
            if first is None and metrics.exists() and metrics.stat().st_size > 0:
                first = time.perf_counter() - t0
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"pretrain on {data} ran past {PROCESS_TIMEOUT_S} s")
    finally:
        if usage is None or not pid:
            proc.kill()
            os.waitpid(proc.pid, 0)
    total = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"pretrain on {data} failed: {proc.stderr.read().decode()[-2000:]}")
    return {"first_step_s": first if first is not None else total, "run_s": total,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def loader_rate(recipe_path: Path, data: Path, workers: int, batches: int) -> float:
    """Images/s of the training loader (2 views each) with ``workers`` processes, after one warm-up
    batch, measured in a fresh child process (``--loader-only``): forking loader workers from a
    process that already ran OpenCV augmentations can deadlock (``cv2.setNumThreads`` in the
    worker, engine/loader.py), so every measurement starts clean."""
    cmd = [sys.executable, __file__, "--loader-only", str(recipe_path), str(data), str(workers), str(batches)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    if res.returncode != 0:
        raise RuntimeError(f"loader on {data} with {workers} worker(s) failed: {res.stderr[-2000:]}")
    return float(res.stdout.strip().splitlines()[-1])


def measure_loader(recipe_path: Path, data: Path, workers: int, batches: int) -> float:
    """The measurement of :func:`loader_rate`, in this process."""
    recipe = load_recipe(str(recipe_path), [f"data.path={data}", f"data.num_workers={workers}"])
    base, views = build_training_data(recipe)
    sampler = ResumableSampler(len(base), recipe.train.batch_size, recipe.train.seed)
    batches = min(batches, sampler.batches_per_epoch - 1)
    it = iter(training_loader(recipe, views, sampler, pin_memory=False))
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * recipe.train.batch_size / (time.perf_counter() - t0)
    del it
    return rate


def run_size(n: int, args: argparse.Namespace, work: Path) -> dict:
    row: dict = {"n": n}
    folder, shards = work / f"folder-{n}", work / f"shards-{n}"
    t0 = time.perf_counter()
    write_cells(folder, n, args.unique, args.image_size)
    row["generate_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    write_shards(build_dataset(DataConfig(), folder), shards, args.shard_size)
    row["shard_s"] = time.perf_counter() - t0
    row["disk_mb"] = {"folder": disk_bytes(folder) / 2**20, "shards": disk_bytes(shards) / 2**20}
    recipe = recipe_file(work / "recipe.yaml", args.image_size, args.steps)
    for kind, data in (("folder", folder), ("shards", shards)):
        row[kind] = pretrain_process(recipe, data, work / f"run-{kind}-{n}")
        row[kind].update(dataset_cost(data))
        row[kind]["loader_img_s"] = {w: loader_rate(recipe, data, w, args.batches) for w in args.workers}
    t0 = time.perf_counter()
    embed("random:resnet18", shards, work / f"emb-{n}.npz", image_size=args.image_size, batch_size=256, device="cpu")
    row["embed_img_s"] = n / (time.perf_counter() - t0)
    return row


def print_row(row: dict) -> None:
    print(f"\n{row['n']} cells: generated in {row['generate_s']:.1f} s, sharded in {row['shard_s']:.1f} s; "
          f"disk {row['disk_mb']['folder']:.1f} MB (folder) vs {row['disk_mb']['shards']:.1f} MB (shards); "
          f"embed {row['embed_img_s']:.0f} img/s (shards)")
    workers = list(row["folder"]["loader_img_s"])
    print(f"{'':8} {'first step s':>12} {'peak RSS MB':>12} {'build s':>8} {'B/cell':>7} "
          + " ".join(f"{f'loader w={w}':>12}" for w in workers))
    for kind in ("folder", "shards"):
        r = row[kind]
        print(f"{kind:8} {r['first_step_s']:12.1f} {r['peak_rss_mb']:12.0f} {r['build_s']:8.2f} "
              f"{r['bytes_per_cell']:7.0f} " + " ".join(f"{r['loader_img_s'][w]:12.0f}" for w in workers))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--loader-only":
        recipe, data, workers, batches = sys.argv[2:]
        print(measure_loader(Path(recipe), Path(data), int(workers), int(batches)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="2000", help="comma-separated cell counts")
    ap.add_argument("--unique", type=int, default=20000, help="cells drawn by the generator; the rest repeat them")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=5, help="training steps of the RSS run")
    ap.add_argument("--batches", type=int, default=10, help="loader batches timed (batch 64)")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--work", default=None, help="folder for the data (default: a temporary one, removed)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cellssl-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(run_size(n, args, work))
            print_row(rows[-1])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
