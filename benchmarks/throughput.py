"""Throughput of one MSBReg training step against its bound (issue: speed).

Measures, in one process, for a backbone / image size / batch / M views:

1. bound — bare PyTorch: forward+backward of the online backbone+projector+predictor on the
   M·B views, forward of the target backbone+projector, optimiser step; pre-made tensors,
   same dtype and memory format;
2. step — the full cellssl step (``MSBReg.forward`` with all three losses, backward, optimiser,
   EMA update), views already on the device;
3. loop — ``cellssl.engine.fit`` with the real data loader and augmentations on PBC images
   (``../shared/data/pbc128``), median step wall-time (data wait + step) after warm-up;
4. each loss term alone (centroid, singular value by Cholesky and by SVD, Brownian) and the
   EMA update, in ms and as a share of the step;
5. host syncs per training step of ``fit`` (a step that neither logs nor checkpoints), with the
   non-finite check on the device (the CUDA default with bf16/fp32) and on the host (the CPU
   default, and fp16 on CUDA): counted with ``torch.cuda.set_sync_debug_mode`` on a GPU, and on the
   CPU by counting every tensor read back to the host (bool/float/int/item/tolist/numpy/cpu) —
   what makes a GPU stream wait.

Prints a table; ``--json OUT`` writes ``bound_img_per_s``, ``step_img_per_s``,
``loop_img_per_s``, ``step_over_bound`` (time ratio 2/1), ``loop_over_step`` (time ratio 3/2)
and the rest.

    python -m benchmarks.throughput                      # CPU: resnet18, 64 px, batch 128, 2 views
    python -m benchmarks.throughput --device cuda --backbone resnet50 --image-size 224 --compile
    python -m benchmarks.throughput --syncs-only      # only 5 (seconds)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cellssl.engine.fit as fit_mod
from benchmarks.common import DEFAULT_PBC, run_alone_notice
from cellssl.config import ModelConfig, load_recipe, method_config
from cellssl.engine.fit import autocast_for, fit
from cellssl.engine.logger import read_metrics
from cellssl.engine.optim import build_optimizer
from cellssl.methods import build_method
from cellssl.methods.msbreg import brownian_loss, centroid_loss, sample_brownian_directions, singular_value_loss
from cellssl.models import build_backbone, ema_update, make_target, mlp


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def make_model_cfg(args) -> ModelConfig:
    return ModelConfig(backbone=args.backbone, stem=args.stem, proj_hidden=args.proj_hidden, proj_dim=256,
                       pred_hidden=args.proj_hidden)


def bench_bound(args, device, views, autocast) -> float:
    """Bare PyTorch: online fwd+bwd on M·B images, target fwd, AdamW step."""
    torch.manual_seed(0)
    mc = make_model_cfg(args)
    backbone = build_backbone(mc, 3, args.image_size)
    online = torch.nn.Sequential(backbone, mlp(backbone.num_features, mc.proj_hidden, 256),
                                 mlp(256, mc.pred_hidden, 256)).to(device)
    target = make_target(torch.nn.Sequential(online[0], online[1])).to(device)
    if device.type == "cuda":
        online.to(memory_format=torch.channels_last)
        target.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(online.parameters(), lr=1e-4)
    x = views.transpose(0, 1).reshape(-1, *views.shape[2:])
    step_fn = online
    if args.compile:
        step_fn = torch.compile(online)

    def step():
        with autocast:
            loss = step_fn(x).float().pow(2).mean()
            with torch.no_grad():
                target(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timeit(step, device, args.warmup, args.iters)


def bench_step(args, device, views, autocast):
    """The full cellssl step; returns (seconds, method) for the per-term timings."""
    torch.manual_seed(0)
    mc = make_model_cfg(args)
    backbone = build_backbone(mc, 3, args.image_size)
    method = build_method(method_config("msbreg"), mc, backbone).to(device)
    if device.type == "cuda":
        method.to(memory_format=torch.channels_last)
    recipe = load_recipe("blood_smear")
    recipe.optim.name = "adamw"
    opt = build_optimizer(method, recipe.optim, args.batch_size)
    model = torch.compile(method) if args.compile else method
    state = {"i": 0}

    def step():
        with autocast:
            out = model(views)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        state["i"] += 1
        method.after_step(state["i"], 10_000)

    return timeit(step, device, args.warmup, args.iters), method


def bench_terms(args, device, method, views) -> dict[str, float]:
    """Median ms of each loss term (forward+backward on embeddings) and of the EMA update."""
    b, m = args.batch_size, args.views
    d = 256
    z = torch.randn(b, m, d, device=device, requires_grad=True)
    zt = torch.randn(b, m, d, device=device)
    gen = torch.Generator().manual_seed(0)

    def term(fn):
        def run():
            loss = fn()
            loss.backward()
        return timeit(run, device, 3, max(5, args.iters)) * 1000

    out = {
        "centroid_ms": term(lambda: centroid_loss(z, zt)),
        "sv_cholesky_ms": term(lambda: singular_value_loss(z.flatten(0, 1))),
        "sv_svd_ms": term(lambda: singular_value_loss(z.flatten(0, 1), method="svd")),
        "brownian_ms": term(lambda: brownian_loss(z, sample_brownian_directions(b, d, gen, device))),
    }

    def ema():
        ema_update(method.target_backbone, method.backbone, 0.99)
        ema_update(method.target_projector, method.projector, 0.99)

    out["ema_ms"] = timeit(ema, device, 3, max(5, args.iters)) * 1000
    return out


def bench_loop(args, device) -> float | None:
    """Median (data wait + step) seconds of ``fit`` on PBC with the recipe's loader."""
    data = Path(args.data) if args.data else DEFAULT_PBC
    if not data.is_dir():
        print(f"loop: skipped, no data at {data}")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            f"data.path={data}", f"data.image_size={args.image_size}", f"train.batch_size={args.batch_size}",
            f"views.n_views={args.views}", f"model.backbone={args.backbone}", f"model.stem={args.stem}",
            f"model.proj_hidden={args.proj_hidden}", f"model.pred_hidden={args.proj_hidden}",
            f"train.max_steps={args.warmup + args.loop_iters}", f"train.out={tmp}/run", "train.log_every=1",
            "train.monitor_every=1000000", "train.checkpoint_every=1000000", "train.progress=false",
            f"train.device={device}", f"train.compile={str(args.compile).lower()}", "optim.name=adamw",
        ]
        if args.workers is not None:
            overrides.append(f"data.num_workers={args.workers}")
        recipe = load_recipe("blood_smear", overrides)
        fit(recipe)
        rows = read_metrics(Path(tmp) / "run")
    rows = [r for r in rows if r["step"] > args.warmup]
    return statistics.median(r["step_time_s"] + r["data_time_s"] for r in rows)


class HostSyncs:
    """Counts host syncs while active: on CUDA the warnings of ``torch.cuda.set_sync_debug_mode``;
    on the CPU every tensor read back to the host, except the reads torch.optim (its step counters)
    and torch.utils.data (the loader's seed) make of tensors that live on the CPU in a CUDA run too."""

    CPU_RESIDENT = ("torch/optim/", "torch/utils/data/")

    READS = ("__bool__", "__float__", "__int__", "item", "tolist", "numpy", "cpu")

    def __init__(self, device: torch.device) -> None:
        self.device, self.count, self._saved = device, 0, {}

    def _counted(self, name):
        original = getattr(torch.Tensor, name)

        def read(t, *a, **k):
            caller = sys._getframe(1).f_code.co_filename
            if not any(part in caller for part in self.CPU_RESIDENT):
                self.count += 1
            return original(t, *a, **k)

        return read

    def __enter__(self):
        if self.device.type == "cuda":
            self._records = warnings.catch_warnings(record=True)
            self._log = self._records.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        else:
            for name in self.READS:
                self._saved[name] = getattr(torch.Tensor, name)
                setattr(torch.Tensor, name, self._counted(name))
        return self

    def update(self) -> int:
        if self.device.type == "cuda":
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
        return self.count

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            self._records.__exit__(*exc)
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


def syncs_per_step(args, device: torch.device, on_device: bool, steps: int = 6, batch: int = 8, size: int = 32) -> int:
    """Host syncs of one ``fit`` step that neither logs nor checkpoints (the most over steps 3..N),
    with the non-finite check on the device (``on_device``) or on the host: ``args.backbone`` on
    random ``size`` px images, ``batch`` per step (what runs per step does not depend on the sizes)."""
    counter, marks = HostSyncs(device), {}
    next_step, checked = fit_mod.Training.next_step, fit_mod.DEVICE_CHECKED

    def marked(self):
        next_step(self)
        marks[self.step] = counter.update()

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        for i in range(batch * (steps + 1)):  # one epoch: the loader starts once
            img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(img).save(Path(tmp) / f"{i}.png")
        big = "1000000"
        recipe = load_recipe("blood_smear", [
            f"data.path={tmp}", f"data.image_size={size}", f"train.batch_size={batch}",
            f"views.n_views={args.views}", f"model.backbone={args.backbone}", f"model.stem={args.stem}",
            f"train.max_steps={steps}", f"train.out={tmp}/run", f"train.log_every={big}", f"train.monitor_every={big}",
            f"train.checkpoint_every={big}", "train.progress=false", f"train.device={device}", "optim.name=adamw",
            f"train.precision={args.precision}", "data.num_workers=0"])
        fit_mod.Training.next_step, fit_mod.DEVICE_CHECKED = marked, ((device.type,) if on_device else ())
        try:
            with counter:
                fit(recipe)
        finally:
            fit_mod.Training.next_step, fit_mod.DEVICE_CHECKED = next_step, checked
    return max(marks[k + 1] - marks[k] for k in range(2, steps))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--stem", default="default")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--views", type=int, default=2)
    p.add_argument("--proj-hidden", type=int, default=1024)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--loop-iters", type=int, default=12)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: the recipe's)")
    p.add_argument("--data", default=None, help="image folder for the loop (default ../shared/data/pbc128)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--syncs-only", action="store_true", help="only count the host syncs of a training step")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    autocast, precision = autocast_for(device, args.precision)
    print(run_alone_notice(), flush=True)
    syncs = {"syncs_per_step_device_check": syncs_per_step(args, device, on_device=True),
             "syncs_per_step_host_check": syncs_per_step(args, device, on_device=False)}
    print(f"host syncs per training step on {device}: {syncs['syncs_per_step_device_check']} with the non-finite "
          f"check on the device (the CUDA default, bf16/fp32), {syncs['syncs_per_step_host_check']} with it on the "
          "host (the CPU default; fp16 adds the GradScaler's own read); log and checkpoint steps read their numbers "
          "on top")
    if args.syncs_only:
        return
    views = torch.randn(args.batch_size, args.views, 3, args.image_size, args.image_size, device=device)
    n_img = args.batch_size  # images (each seen in M views) per step

    bound = bench_bound(args, device, views, autocast)
    step, method = bench_step(args, device, views, autocast)
    terms = bench_terms(args, device, method, views)
    loop = bench_loop(args, device)
    res = {
        "device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "backbone": args.backbone, "image_size": args.image_size, "batch_size": args.batch_size,
        "views": args.views, "precision": precision, "compile": args.compile,
        "bound_s": bound, "step_s": step, "loop_s": loop,
        "bound_img_per_s": n_img / bound, "step_img_per_s": n_img / step,
        "loop_img_per_s": n_img / loop if loop else None,
        "step_over_bound": step / bound, "loop_over_step": loop / step if loop else None,
        **terms, **syncs,
        "sv_plus_ema_share_of_step": (terms["sv_cholesky_ms"] + terms["ema_ms"]) / 1000 / step,
    }
    print(f"\n{args.backbone} {args.image_size}px batch {args.batch_size} x {args.views} views on {device} "
          f"({precision}{', compiled' if args.compile else ''}, {res['threads']} threads)")
    print(f"{'what':34s} {'ms/step':>10s} {'img/s':>10s}")
    print(f"{'1 bound (bare PyTorch)':34s} {bound * 1000:10.1f} {res['bound_img_per_s']:10.1f}")
    print(f"{'2 cellssl step':34s} {step * 1000:10.1f} {res['step_img_per_s']:10.1f}")
    if loop:
        print(f"{'3 full loop (loader + augment)':34s} {loop * 1000:10.1f} {res['loop_img_per_s']:10.1f}")
    print(f"ratio 2/1 (step/bound): {res['step_over_bound']:.3f}   target <= 1.10")
    if loop:
        print(f"ratio 3/2 (loop/step):  {res['loop_over_step']:.3f}   target <= 1.05")
    for k in ("centroid_ms", "sv_cholesky_ms", "sv_svd_ms", "brownian_ms", "ema_ms"):
        print(f"  {k:22s} {terms[k]:8.2f} ms  ({terms[k] / 1000 / step:6.2%} of a step)")
    print(f"  SV (Cholesky) + EMA: {res['sv_plus_ema_share_of_step']:.2%} of a step   target < 3%")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
