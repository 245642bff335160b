"""The training loop: one flat ``fit`` that reads top to bottom.

views → online/target forward → losses → backward → optimiser → EMA update → log → checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from cellssl.augment.views import build_view_transform
from cellssl.config import Recipe, recipe_to_dict, save_recipe, validate
from cellssl.data.datasets import MultiViewDataset, build_dataset
from cellssl.engine.checkpoint import (
    FORMAT,
    check_new_run,
    load_checkpoint,
    load_state_checked,
    nonfinite_tensors,
    rng_state,
    save_atomic,
    set_rng_state,
)
from cellssl.engine.distributed import (
    DistInfo,
    ResumableSampler,
    broadcast_buffers,
    broadcast_int,
    cleanup_distributed,
    init_distributed,
)
from cellssl.engine.logger import MetricsLogger
from cellssl.engine.optim import build_optimizer, set_lr
from cellssl.errors import CellSSLError, ConfigError, DataError, TrainingError
from cellssl.methods import build_method
from cellssl.methods.base import effective_rank
from cellssl.models import build_backbone, ema_update


@dataclass
class FitResult:
    """What a run produced."""

    out_dir: Path
    checkpoint: Path
    step: int
    total_steps: int
    stopped_early: str | None = None  # "max_minutes", "interrupted", "collapse" or None
    last_metrics: dict = field(default_factory=dict)
    method: nn.Module | None = None  # the trained (unwrapped) method, for programmatic use
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss)


class EpochSeededViews(torch.utils.data.Dataset):
    """Wraps a multi-view dataset so each item's augmentation depends only on (seed, epoch, index).

    The sampler yields ``epoch·n + i``; before producing image i's views the Python, NumPy, torch
    and albumentations generators are seeded from (seed, epoch, i). Data order *and* views are then
    identical in a resumed run and in worker processes, whatever the worker count.
    """
    def __init__(self, views_dataset: torch.utils.data.Dataset, n: int, seed: int) -> None:
        self.ds, self.n, self.seed = views_dataset, n, seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: int):
        epoch, i = divmod(int(key), self.n)
        s = (self.seed * 1_000_003 + epoch * 7_368_787 + i) % (2**31 - 1)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        reseed_transforms(getattr(self.ds, "transform", None), s)
        return self.ds[i]


def reseed_transforms(obj, seed: int, _depth: int = 0) -> None:
    """Seed every albumentations ``Compose`` reachable from ``obj`` (attributes, lists)."""
    if obj is None or _depth > 3:
        return
    if hasattr(obj, "set_seed"):
        obj.set_seed(seed)
        return
    if hasattr(obj, "set_random_seed"):
        obj.set_random_seed(seed)
        return
    children = obj if isinstance(obj, (list, tuple)) else list(getattr(obj, "__dict__", {}).values())
    for j, child in enumerate(children):
        if isinstance(child, (list, tuple)) or hasattr(child, "__dict__"):
            reseed_transforms(child, seed + 101 * (j + 1), _depth + 1)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def build_training_data(recipe: Recipe, dataset=None):
    """(image dataset, multi-view dataset) for the recipe's data and views sections."""
    base = dataset if dataset is not None else build_dataset(recipe.data, labelled=False)
    transform = build_view_transform(recipe.views, recipe.data, base.channels)
    return base, MultiViewDataset(base, transform)


def autocast_for(device: torch.device, precision: str):
    """Autocast context: bf16 on CUDA by default, none (fp32) on CPU unless asked."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return contextlib.nullcontext(), precision
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype), precision


def collapse_stats(z: torch.Tensor) -> dict[str, float]:
    """Effective rank and mean per-dimension std of L2-normalised embeddings ``(B, D)``."""
    zn = torch.nn.functional.normalize(z.float(), dim=-1)
    return {"eff_rank": float(effective_rank(zn)), "emb_std": float(zn.std(dim=0).mean())}


def default_out_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_writable(out: Path) -> None:
    try:
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"output folder {out} is not writable ({exc.strerror}); choose another with --out") from None


def _recipe_values(recipe: Recipe, fields: list[str]) -> str:
    """``"method.sv_weight=0.1, method.sv_eps=0.0001"`` for ``fields`` of ``recipe.method``."""
    return ", ".join(f"method.{f}={getattr(recipe.method, f)}" for f in dict.fromkeys(fields))


def nonfinite_cause(outputs: dict, method: nn.Module, recipe: Recipe) -> tuple[str, str]:
    """(which loss terms are non-finite, the likely cause with the recipe values behind them).

    A method's ``loss_terms`` maps each logged term (``loss_sv``) to the ``method.*`` recipe
    values that scale or shape it; with every term non-finite (or none, only the weighted total)
    the learning rate is named as well.
    """
    terms_cfg: dict = getattr(method, "loss_terms", {}) or {}
    logged = [k for k in outputs if k.startswith("loss_")]
    bad = [k for k in logged if not torch.isfinite(outputs[k]).all()]
    lr = f"optim.lr={recipe.optim.lr:g}"
    if bad and len(bad) < len(logged):
        values = _recipe_values(recipe, [f for t in bad for f in terms_cfg.get(t, ())])
        return ", ".join(bad), f"likely cause: {values or 'the ' + bad[0] + ' term'} or the data"
    values = _recipe_values(recipe, [f for fs in terms_cfg.values() for f in fs])
    what = ", ".join(bad) if bad else "the weighted total (every term is finite)"
    return what, f"likely cause: {values + ' or ' if values else ''}{lr} too high, or the data"


def fit(recipe: Recipe, *, resume: bool = False, init_from: str | Path | None = None, dataset=None,
        log_prefix: str = "pretrain", overwrite: bool = False,
        knn_monitor: Callable[[nn.Module], float] | None = None) -> FitResult:
    """Pretrain ``recipe.method`` on ``recipe.data``; returns where the run and checkpoint are.

    A fresh run (no ``resume``) refuses a ``train.out`` that already holds a checkpoint unless
    ``overwrite``. A checkpoint is never written with non-finite weights; a run whose losses stay
    non-finite (``train.max_nonfinite`` in a row, or every step) stops with a TrainingError that
    names the non-finite term, the recipe values behind it and the last good checkpoint.

    Args:
        recipe: the resolved recipe (``train.out`` is the run folder).
        resume: continue from ``OUT/checkpoints/last.pt`` with the same step, data order, RNG.
        overwrite: start a fresh run even where ``OUT/checkpoints/last.pt`` exists (it is replaced).
        init_from: start the model (online and target) from another checkpoint's weights
            (domain adaptation); the optimiser and schedule start fresh.
        dataset: use this image dataset instead of building one from ``recipe.data``.
        knn_monitor: backbone -> kNN accuracy, logged as ``knn_acc`` every ``eval.knn_every`` steps
            (:func:`cellssl.eval.knn.knn_monitor` builds it from the recipe); required when
            ``eval.knn_every`` is set.
    """
    validate(recipe)
    tc = recipe.train
    if recipe.eval.knn_every and knn_monitor is None:
        raise ConfigError(f"eval.knn_every={recipe.eval.knn_every}: pass the monitor to fit "
                          "(knn_monitor=cellssl.eval.knn.knn_monitor(recipe), as the CLI does) or set eval.knn_every=0")
    dist_info: DistInfo = init_distributed(tc.device)
    device = dist_info.device
    if tc.threads:
        torch.set_num_threads(tc.threads)
    out = Path(tc.out) if tc.out else default_out_dir(recipe)
    tc.out = str(out)
    if not resume:
        check_new_run(out, overwrite=overwrite)
    if dist_info.is_main:
        _check_writable(out)
    ckpt_path = out / "checkpoints" / "last.pt"

    random.seed(tc.seed)
    np.random.seed(tc.seed)
    torch.manual_seed(tc.seed)

    # ---- data -------------------------------------------------------------------------
    base, views_ds = build_training_data(recipe, dataset)
    n = len(base)
    global_batch = tc.batch_size * dist_info.world_size
    if global_batch > n:
        raise DataError(
            f"batch size {tc.batch_size}×{dist_info.world_size} is larger than the dataset ({n} images in "
            f"{getattr(base, 'root', 'the data')}): use --batch-size {max(2, n // (2 * dist_info.world_size))} or more data"
        )
    sampler = ResumableSampler(n, tc.batch_size, tc.seed, dist_info.rank, dist_info.world_size)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = tc.max_steps if tc.max_steps else (tc.epochs or 1) * steps_per_epoch
    loader_kwargs = dict(
        batch_size=tc.batch_size, sampler=sampler, num_workers=recipe.data.num_workers,
        pin_memory=device.type == "cuda", drop_last=False,
        persistent_workers=recipe.data.num_workers > 0, worker_init_fn=_worker_init,
    )
    if recipe.data.num_workers > 0:
        loader_kwargs["prefetch_factor"] = 4
    loader = torch.utils.data.DataLoader(EpochSeededViews(views_ds, n, tc.seed), **loader_kwargs)

    # ---- model ------------------------------------------------------------------------
    in_chans = base.channels
    # model.pretrained: starting weights, unless a checkpoint's weights replace them right after
    backbone = build_backbone(recipe.model, in_chans, recipe.data.image_size,
                              load_pretrained=not resume and init_from is None)
    method = build_method(recipe.method, recipe.model, backbone)
    if recipe.views.local_views and not method.supports_local_views:
        raise ConfigError(
            f"views.local_views={recipe.views.local_views}: method '{recipe.method.name}' does not train on local "
            f"crops (multi-crop is implemented for msbreg); set views.local_views=0"
        )
    if hasattr(method, "seed"):
        method.seed(tc.seed + 1000 * dist_info.rank)
    if init_from is not None:
        src = load_checkpoint(init_from)
        if int(src.get("in_chans", in_chans)) != in_chans:
            raise DataError(f"checkpoint {init_from} expects {src['in_chans']}-channel images, the data has {in_chans}")
        state = src["model"]
        own = method.state_dict()
        # Load what matches (backbone, and heads when the method is the same).
        usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if not any(k.startswith("backbone.") for k in usable):
            raise ConfigError(f"checkpoint {init_from} has no backbone matching {recipe.model.backbone}")
        method.load_state_dict(usable, strict=False)
        if method.uses_target:  # target starts at the loaded online weights

            ema_update(method.target_backbone, method.backbone, 0.0)
            ema_update(method.target_projector, method.projector, 0.0)
    method.to(device)
    if recipe.model.channels_last and device.type == "cuda":
        method.to(memory_format=torch.channels_last)
    model: nn.Module = method
    if dist_info.distributed:
        if recipe.model.sync_bn:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            method = model
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )
    if tc.compile:
        model = torch.compile(model)

    optimizer = build_optimizer(method, recipe.optim, tc.batch_size * dist_info.world_size)
    autocast, precision = autocast_for(device, tc.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")

    # ---- resume -----------------------------------------------------------------------
    start_step = 0
    schedule_fixed = not tc.max_minutes  # a wall-clock budget sizes the schedule after a few steps
    if resume:
        if not ckpt_path.exists():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}; start without --resume")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("method") != recipe.method.name:
            raise ConfigError(
                f"--resume: {ckpt_path} was trained with method '{ckpt.get('method')}', the recipe says "
                f"'{recipe.method.name}'"
            )
        load_state_checked(method, ckpt["model"], f"{recipe.method.name} model", ckpt_path)
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        method.load_extra_state(ckpt.get("extra", {}))
        set_rng_state(ckpt.get("rng", {}))
        start_step = int(ckpt["step"])
        schedule_fixed = bool(ckpt.get("schedule_fixed", False))
        if schedule_fixed or not tc.max_steps:
            total_steps = int(ckpt.get("total_steps", total_steps))
        method.momentum = ckpt.get("momentum", method.momentum)

    if dist_info.is_main:
        save_recipe(recipe, out / "config.yaml")
        if overwrite and not resume:
            ckpt_path.unlink(missing_ok=True)  # the replaced run's checkpoint must not be resumed
    logger = MetricsLogger(out, enabled=dist_info.is_main, resume_step=start_step if resume else None)
    saved_step: int | None = start_step if resume else None  # the last good checkpoint

    def checkpoint_state() -> str:
        if saved_step is None:
            return f"no checkpoint was written (train.checkpoint_every={tc.checkpoint_every})"
        return f"last good checkpoint: {ckpt_path} (step {saved_step}), kept"

    def broken_weights(step: int, bad: list[str]) -> TrainingError:
        return TrainingError(
            f"stopped at step {step + 1}: the model weights became non-finite in the update of step {step} "
            f"(e.g. {bad[0]}); {checkpoint_state()}; likely cause: optim.lr={recipe.optim.lr:g} too high "
            "(lower it or set optim.grad_clip)"
        )

    def save(step: int) -> None:
        nonlocal saved_step
        bad = nonfinite_tensors(method.state_dict())
        if bad:
            raise TrainingError(
                f"step {step}: {len(bad)} weight tensor(s) of the model are non-finite (e.g. {bad[0]}), so no "
                f"checkpoint is written; {checkpoint_state()}; likely cause: optim.lr={recipe.optim.lr:g} too high "
                "(lower it or set optim.grad_clip)"
            )
        saved_step = step
        if not dist_info.is_main:
            return
        save_atomic(
            {
                "format": FORMAT,
                "step": step,
                "epoch": step // max(1, steps_per_epoch),
                "total_steps": total_steps,
                "schedule_fixed": schedule_fixed,
                "method": recipe.method.name,
                "in_chans": in_chans,
                "config": recipe_to_dict(recipe),
                "model": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "extra": method.extra_state(),
                "momentum": float(method.momentum),
                "rng": rng_state(),
            },
            ckpt_path,
        )

    # ---- loop -------------------------------------------------------------------------
    progress = None
    if dist_info.is_main and tc.progress:

        progress = tqdm(total=total_steps, initial=start_step, desc=log_prefix, unit="step", dynamic_ncols=True)
    knn_eval = knn_monitor if recipe.eval.knn_every and dist_info.is_main else None

    method.train()
    start_time = time.monotonic()
    step = start_step
    stopped: str | None = None
    nonfinite = 0
    skipped = 0
    updates = 0
    last_bad: tuple[str, str] = ("", "")
    last: dict = {}
    collapse_warned = False
    t_probe, probe_from = None, start_step
    data_iter = None
    epoch = -1
    try:
        t_data = time.perf_counter()
        while step < total_steps:
            if step // steps_per_epoch != epoch or data_iter is None:
                epoch = step // steps_per_epoch
                sampler.set_epoch(epoch, step % steps_per_epoch)
                data_iter = iter(loader)
            batch = next(data_iter)
            views = batch["views"].to(device, non_blocking=True)
            local = batch["local"].to(device, non_blocking=True) if "local" in batch else None
            if recipe.model.channels_last and device.type == "cuda":
                views = views.contiguous()
            t_step = time.perf_counter()
            data_time = t_step - t_data
            lr = set_lr(optimizer, step, total_steps, recipe.optim)

            try:
                with autocast:
                    outputs = model(views) if local is None else model(views, local)
            except RuntimeError:  # e.g. a linear-algebra op that fails on non-finite embeddings
                bad = nonfinite_tensors(method.state_dict())
                if bad:
                    raise broken_weights(step, bad) from None
                raise
            loss = outputs["loss"]
            if not torch.isfinite(loss):
                # The update is not applied; the step still counts so data order stays tied to steps.
                nonfinite += 1
                skipped += 1
                optimizer.zero_grad(set_to_none=True)
                terms, cause = last_bad = nonfinite_cause(outputs, method, recipe)
                warnings.warn(f"step {step + 1}: non-finite loss (terms: {terms}); update skipped", stacklevel=1)
                bad_weights = nonfinite_tensors(method.state_dict()) if nonfinite == 1 else []
                if bad_weights:  # skipping cannot help: the last update broke the model
                    raise broken_weights(step, bad_weights)
                if nonfinite >= tc.max_nonfinite:
                    raise TrainingError(
                        f"stopped at step {step + 1}: {nonfinite} non-finite losses in a row in {terms} (the model "
                        f"weights are still finite); {checkpoint_state()}; {cause}"
                    )
                step += 1
                if progress is not None:
                    progress.update(1)
                t_data = time.perf_counter()
                continue
            nonfinite = 0
            updates += 1
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.optim.grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(method.parameters(), recipe.optim.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            method.after_step(step + 1, total_steps)
            step += 1
            if device.type == "cuda" and (step % tc.log_every == 0):
                torch.cuda.synchronize(device)
            step_time = time.perf_counter() - t_step

            if step % tc.log_every == 0 or step == total_steps or step == start_step + 1:
                row = {
                    "step": step,
                    "epoch": epoch,
                    "lr": lr,
                    "momentum": float(method.momentum),
                    "step_time_s": step_time,
                    "data_time_s": data_time,
                    "img_per_s": global_batch / max(step_time + data_time, 1e-9),
                }
                row.update({k: float(v.detach()) for k, v in outputs.items() if k.startswith("loss")})
                if step % tc.monitor_every == 0 or step == start_step + 1:
                    stats = collapse_stats(outputs["z"])
                    row.update(stats)
                    d = outputs["z"].shape[-1]
                    collapsed = (stats["eff_rank"] < tc.collapse_rank_fraction * d
                                 or stats["emb_std"] < tc.collapse_std_fraction / math.sqrt(d))
                    row["collapse_warning"] = bool(collapsed)
                    if collapsed and step > start_step + 1:
                        text = (f"step {step}: embeddings are collapsing (effective rank {stats['eff_rank']:.1f} of {d}, "
                                f"per-dim std {stats['emb_std']:.4f})")
                        if not collapse_warned:
                            warnings.warn(text, stacklevel=1)
                            collapse_warned = True
                        if tc.stop_on_collapse:
                            stopped = "collapse"
                            logger.log(row)
                            raise TrainingError(text + "; stopped (train.stop_on_collapse); checkpoint " + str(ckpt_path))
                if knn_eval is not None and step % recipe.eval.knn_every == 0:
                    row["knn_acc"] = knn_eval(method.backbone)
                    method.train()
                logger.log(row)
                last = row
                if progress is not None:
                    post = {"loss": f"{row['loss']:.3f}", "img/s": f"{row['img_per_s']:.0f}"}
                    if "eff_rank" in row:
                        post["rank"] = f"{row['eff_rank']:.0f}"
                    if row.get("collapse_warning"):
                        post["warn"] = "COLLAPSE"
                    progress.set_postfix(post)
            if progress is not None:
                progress.update(1)
            if not schedule_fixed and t_probe is None:
                t_probe, probe_from = time.monotonic(), step  # the first step (allocation) is not typical
            elif not schedule_fixed and step - probe_from >= tc.budget_probe_steps:
                per_step = (time.monotonic() - t_probe) / (step - probe_from)
                total_steps = budget_total_steps(step, total_steps, per_step,
                                                 tc.max_minutes * 60 - (time.monotonic() - start_time))
                total_steps = broadcast_int(total_steps)
                schedule_fixed = True
                if progress is not None:
                    progress.total = total_steps
                    progress.refresh()
            if step % tc.checkpoint_every == 0 and step < total_steps and nonfinite == 0:
                save(step)
            if (tc.max_minutes and step < total_steps
                    and (time.monotonic() - start_time) / 60 >= tc.max_minutes * (1.25 if schedule_fixed else 1.0)):
                stopped = "max_minutes"
                warnings.warn(f"--max-minutes {tc.max_minutes:g}: stopped at step {step} of {total_steps} (the steps "
                              f"took longer than measured); rerun with --resume to finish the schedule", stacklevel=1)
                break
            t_data = time.perf_counter()
    except KeyboardInterrupt:
        stopped = "interrupted"
    except (CellSSLError, RuntimeError):
        if progress is not None:
            progress.close()
        logger.close()
        raise
    if dist_info.distributed:
        broadcast_buffers(method)
    if step > start_step and updates == 0:
        if progress is not None:
            progress.close()
        logger.close()
        terms, cause = last_bad
        raise TrainingError(
            f"no update was made: all {step - start_step} steps had a non-finite loss in {terms}; "
            f"{checkpoint_state()}; {cause}"
        )
    try:
        save(step)
    finally:
        if progress is not None:
            progress.close()
        logger.close()
    if dist_info.distributed:
        cleanup_distributed()
    return FitResult(out, ckpt_path, step, total_steps, stopped, last, method, skipped)


def budget_total_steps(step: int, planned: int, seconds_per_step: float, seconds_left: float,
                       margin: float = 0.97) -> int:
    """Steps a wall-clock budget allows: ``step`` done plus what fits in ``seconds_left`` at the
    measured ``seconds_per_step`` (× ``margin`` for checkpoints and logging), capped at ``planned``
    (the recipe's epochs or max_steps) and at least ``step + 1``."""
    fits = int(max(0.0, seconds_left) * margin / max(seconds_per_step, 1e-9))
    return max(step + 1, min(planned, step + fits))
