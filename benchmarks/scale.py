"""Scale: synthetic cells as tar shards (and, up to ``--folder-max``, as a folder of PNGs), issue 22.

For each size N (``--cells 2000`` or ``--cells 10000,100000,1000000``):

1. writes N synthetic smear cells (``cellssl.data.synth.generate_smear_image``, ``--image-size``
   px) straight into shards with :class:`cellssl.data.shards.ShardWriter` (streaming: what is held
   is 20 bytes a cell and the ``--unique`` cells drawn by the generator; cells >= ``--unique``
   repeat them, as drawing 1M cells takes hours on 2 cores and the loader cost is the same), timed;
   for N <= ``--folder-max`` the same cells also as a labelled folder of PNGs (a million files is
   ~4 GB of inodes and blocks, and the folder's start-up cost is linear in N: measured up to 100k
   it tells the 1M cost without writing a million files);
2. disk size of both;
3. for both: time to the first training step and peak RSS of a ``cellssl pretrain`` process
   (resnet18, ``--image-size`` px, batch 64, 2 views, ``--train-workers`` loader workers, ``--steps``
   steps): the first step is the first row of ``metrics.jsonl``, the RSS is the child's ``ru_maxrss``
   (the largest of it and its loader workers); loop/step is (step + data wait) / step time over the
   steps after the first (1.00: the loader is never waited for);
4. for both: seconds to build the dataset (listing the folder / reading the index) and the Python
   memory it holds per cell (tracemalloc);
5. for both: loader images/s with 0, 1 and 2 workers through the training loader itself
   (``engine.loader``: shuffled, epoch-seeded, 2 augmented views per image);
6. ``cellssl embed`` of the shards in a child process (``random:resnet18``, batch 256; sets above
   65,536 cells in parts): cells/s and peak RSS.

Prints one table per size; ``--json OUT`` writes every number.

    python -m benchmarks.scale --cells 2000 --shard-size 500     # smoke run (minutes on 2 cores)
    python -m benchmarks.scale --cells 10000,100000,1000000 --work /big/disk/scale --json scale.json
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

import cellssl.methods  # noqa: F401 (registers each method's settings, which load_recipe reads)
from benchmarks.common import REPO, child_env
from cellssl.config import DataConfig, load_recipe
from cellssl.data.datasets import build_dataset
from cellssl.data.shards import ShardWriter
from cellssl.data.synth import SYNTH_CLASSES, generate_smear_image
from cellssl.engine.distributed import ResumableSampler
from cellssl.engine.loader import build_training_data, training_loader
from cellssl.engine.logger import read_metrics

PROCESS_TIMEOUT_S = 1800


class SyntheticCells:
    """Cell i of the synthetic set: (uint8 RGB (size, size, 3), class index); cells >= ``unique``
    repeat cell ``i % unique`` (drawn once, kept: ``unique`` cells are held, never N)."""

    def __init__(self, unique: int, size: int, seed: int = 0):
        self.unique, self.size, self.seed = unique, size, seed
        self._drawn: list[np.ndarray] = []

    def __call__(self, i: int) -> tuple[np.ndarray, int]:
        j = i % self.unique
        while len(self._drawn) <= j:
            k = len(self._drawn)
            self._drawn.append(generate_smear_image(SYNTH_CLASSES[k % len(SYNTH_CLASSES)],
                                                    np.random.default_rng([self.seed, k]), self.size))
        return self._drawn[j], j % len(SYNTH_CLASSES)


def cell_path(i: int, label: int) -> str:
    cls = SYNTH_CLASSES[label]
    return f"{cls}/{cls}_{i:07d}.png"


def write_shard_cells(out: Path, n: int, cells: SyntheticCells, shard_size: int) -> None:
    """N synthetic cells straight into shards (no folder in between)."""
    with ShardWriter(out, shard_size, classes=list(SYNTH_CLASSES), source="synthetic") as writer:
        for i in range(n):
            img, label = cells(i)
            writer.add(img, label, cell_path(i, label))


def write_folder_cells(out: Path, n: int, cells: SyntheticCells) -> None:
    """The same N cells as ``out/<class>/<class>_<i>.png`` (each unique cell encoded once)."""
    pngs: dict[int, bytes] = {}
    for cls in SYNTH_CLASSES:
        (out / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        j = i % cells.unique
        img, label = cells(i)
        if j not in pngs:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="PNG")
            pngs[j] = buf.getvalue()
        (out / cell_path(i, label)).write_bytes(pngs[j])


def disk_bytes(path: Path) -> int:
    """Bytes on disk (allocated blocks) of every file below ``path``."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def dataset_cost(data: Path) -> dict[str, float]:
    """Seconds to build the dataset of ``data`` (listing / index) and the Python memory it holds per cell
    (a first build, not counted, takes the one-off costs: imports, caches)."""
    build_dataset(DataConfig(), data)
    tracemalloc.start()
    t0 = time.perf_counter()
    ds = build_dataset(DataConfig(), data)
    seconds = time.perf_counter() - t0
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {"build_s": seconds, "bytes_per_cell": held / len(ds)}


def recipe_file(path: Path, size: int, steps: int, workers: int = 0) -> Path:
    recipe = {
        "name": "scale",
        "data": {"image_size": size, "num_workers": workers},
        "views": {"n_views": 2},
        "model": {"backbone": "resnet18", "stem": "pool", "proj_hidden": 512, "proj_dim": 128, "pred_hidden": 512},
        "method": {"name": "msbreg"},
        "optim": {"name": "adamw", "lr": 0.002},
        "train": {"batch_size": 64, "max_steps": steps, "checkpoint_every": 10**6, "log_every": 1,
                  "monitor_every": 10**6, "progress": False, "threads": 1},
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def child_process(cmd: list[str], what: str, first_file: Path | None = None) -> dict[str, float]:
    """Run ``cmd`` in a child (killed after PROCESS_TIMEOUT_S); seconds until ``first_file`` is not
    empty (when given), total seconds, peak RSS in MB (``ru_maxrss`` of the child and its waited-for
    children: the largest, not the sum)."""
    t0 = time.perf_counter()
    # stderr to a file, not a pipe: this loop only polls, and a child writing more than a pipe holds
    # (progress bars, warnings) would block until the timeout
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL, stderr=err)
    first, status, usage, pid = None, None, None, 0
    try:
        while time.perf_counter() - t0 < PROCESS_TIMEOUT_S:
            if first is None and first_file is not None and first_file.exists() and first_file.stat().st_size > 0:
                first = time.perf_counter() - t0
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"{what} ran past {PROCESS_TIMEOUT_S} s")
    finally:
        if usage is None or not pid:
            proc.kill()
            os.waitpid(proc.pid, 0)
    total = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        err.seek(0)
        raise RuntimeError(f"{what} failed: {err.read().decode(errors='replace')[-2000:]}")
    err.close()
    return {"first_s": first if first is not None else total, "run_s": total, "peak_rss_mb": usage.ru_maxrss / 1024}


def pretrain_process(recipe: Path, data: Path, out: Path) -> dict[str, float]:
    """``cellssl pretrain`` in a child: seconds to its first logged step, total seconds, peak RSS (MB),
    loop/step (mean (step + data wait) over mean step time, steps after the first)."""
    cmd = [sys.executable, "-m", "cellssl", "pretrain", "--recipe", str(recipe), "--data", str(data),
           "--out", str(out), "--device", "cpu"]
    res = child_process(cmd, f"pretrain on {data}", out / "metrics.jsonl")
    rows = read_metrics(out)[1:]
    step = sum(r["step_time_s"] for r in rows)
    loop = step + sum(r["data_time_s"] for r in rows)
    return {"first_step_s": res["first_s"], "run_s": res["run_s"], "peak_rss_mb": res["peak_rss_mb"],
            "loop_over_step": loop / step if rows and step > 0 else float("nan")}


def embed_process(data: Path, out: Path, size: int, n: int) -> dict[str, float]:
    """``cellssl embed`` of ``data`` in a child (``random:resnet18``, batch 256): cells/s, peak RSS (MB)."""
    cmd = [sys.executable, "-m", "cellssl", "embed", "--checkpoint", "random:resnet18", "--data", str(data),
           "--out", str(out), "--image-size", str(size), "--batch-size", "256", "--device", "cpu"]
    res = child_process(cmd, f"embed of {data}")
    return {"cells_s": n / res["run_s"], "peak_rss_mb": res["peak_rss_mb"], "run_s": res["run_s"]}


def loader_rate(recipe_path: Path, data: Path, workers: int, batches: int) -> float:
    """Images/s of the training loader (2 views each) with ``workers`` processes, after one warm-up
    batch, measured in a fresh child process (``--loader-only``): forking loader workers from a
    process that already ran OpenCV augmentations can deadlock (``cv2.setNumThreads`` in the
    worker, engine/loader.py), so every measurement starts clean."""
    cmd = [sys.executable, __file__, "--loader-only", str(recipe_path), str(data), str(workers), str(batches)]
    res = subprocess.run(cmd, cwd=REPO, env=child_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=PROCESS_TIMEOUT_S)
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
    cells = SyntheticCells(args.unique, args.image_size)
    t0 = time.perf_counter()
    write_shard_cells(shards, n, cells, args.shard_size)
    row["shard_s"] = time.perf_counter() - t0
    kinds = {"shards": shards}
    if n <= args.folder_max:
        t0 = time.perf_counter()
        write_folder_cells(folder, n, cells)
        row["folder_s"] = time.perf_counter() - t0
        kinds = {"folder": folder, **kinds}
    del cells
    row["disk_mb"] = {kind: disk_bytes(data) / 2**20 for kind, data in kinds.items()}
    recipe = recipe_file(work / "recipe.yaml", args.image_size, args.steps, args.train_workers)
    for kind, data in kinds.items():
        row[kind] = pretrain_process(recipe, data, work / f"run-{kind}-{n}")
        row[kind].update(dataset_cost(data))
        row[kind]["loader_img_s"] = {w: loader_rate(recipe, data, w, args.batches) for w in args.workers}
    if n <= args.embed_max:
        row["embed"] = embed_process(shards, work / f"emb-{n}.npz", args.image_size, n)
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(shards, ignore_errors=True)
    return row


def print_row(row: dict) -> None:
    kinds = [k for k in ("folder", "shards") if k in row]
    made = f"sharded in {row['shard_s']:.1f} s"
    if "folder_s" in row:
        made += f", folder written in {row['folder_s']:.1f} s"
    disk = ", ".join(f"{row['disk_mb'][k]:.1f} MB ({k})" for k in kinds)
    emb = row.get("embed")
    emb = f"{emb['cells_s']:.0f} cells/s (peak RSS {emb['peak_rss_mb']:.0f} MB)" if emb else "not run (--embed-max)"
    print(f"\n{row['n']} cells: {made}; disk {disk}; embed {emb}")
    workers = list(row[kinds[0]]["loader_img_s"])
    print(f"{'':8} {'first step s':>12} {'peak RSS MB':>12} {'loop/step':>9} {'build s':>8} {'B/cell':>7} "
          + " ".join(f"{f'loader w={w}':>12}" for w in workers))
    for kind in kinds:
        r = row[kind]
        print(f"{kind:8} {r['first_step_s']:12.1f} {r['peak_rss_mb']:12.0f} {r['loop_over_step']:9.2f} "
              f"{r['build_s']:8.2f} {r['bytes_per_cell']:7.0f} "
              + " ".join(f"{r['loader_img_s'][w]:12.0f}" for w in workers))


def main() -> None:
    if len(sys.argv) == 6 and sys.argv[1] == "--loader-only":
        recipe, data, workers, batches = sys.argv[2:]
        print(measure_loader(Path(recipe), Path(data), int(workers), int(batches)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", "--sizes", dest="cells", default="2000", help="comma-separated cell counts")
    ap.add_argument("--unique", type=int, default=20000, help="cells drawn by the generator; the rest repeat them")
    ap.add_argument("--folder-max", type=int, default=100_000, help="largest N also written as a folder of PNGs")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--shard-size", type=int, default=10000)
    ap.add_argument("--steps", type=int, default=20, help="training steps of the first-step/RSS run")
    ap.add_argument("--train-workers", type=int, default=2, help="loader workers of that run")
    ap.add_argument("--batches", type=int, default=10, help="loader batches timed (batch 64)")
    ap.add_argument("--workers", default="0,1,2")
    ap.add_argument("--embed-max", type=int, default=10**9,
                    help="largest N also embedded (its cells/s is flat in N; 1M cells take ~10-20 min on 2 cores)")
    ap.add_argument("--work", default=None, help="folder for the data (default: a temporary one, removed)")
    ap.add_argument("--keep", action="store_true", help="keep each size's data (default: removed after its row)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="cellssl-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for n in (int(s) for s in args.cells.split(",")):
            rows.append(run_size(n, args, work))
            print_row(rows[-1])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
