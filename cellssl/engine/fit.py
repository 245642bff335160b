"""The training loop of every method: :func:`fit`.

:class:`Training` builds a run (data, model, optimiser, resume) and holds its state; its
:meth:`~Training.loop` reads top to bottom in one screen:

    batch → forward (online, target, losses) → non-finite guard → backward, optimiser, EMA
          → log (metrics, collapse and kNN monitors) → schedule for --max-minutes → checkpoint
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cellssl.config import Recipe, save_recipe, validate
from cellssl.engine.checkpoint import (
    check_new_run,
    init_weights_from,
    nonfinite_tensors,
    restore_training,
    rng_state,
    save_atomic,
    set_rng_state,
    training_checkpoint,
)
from cellssl.engine.distributed import (
    agree_max,
    broadcast_buffers,
    broadcast_int,
    cleanup_distributed,
    control_group,
    gather_objects,
    init_distributed,
)
from cellssl.engine.guard import NonFiniteGuard
from cellssl.engine.hardware import resolve_precision, target_autocast_dtype, use_channels_last
from cellssl.engine.loader import (
    StreamViews,
    build_training_data,
    step_batches,
    stream_resume_note,
    training_loader,
    training_sampler,
    worker_pids,
)
from cellssl.engine.logger import MetricsLogger
from cellssl.engine.optim import build_optimizer, lr_at, set_lr, warmup_steps_for
from cellssl.engine.watchdog import STOP_SIGNALS, StallWatchdog, StopRequest, deferred_stop_signals
from cellssl.errors import ConfigError, DataError, TrainingError
from cellssl.methods import build_method
from cellssl.methods.base import effective_rank
from cellssl.models import build_backbone

DEVICE_CHECKED = ("cuda",)  # device types whose non-finite check stays on the device (engine.guard)
STOP_BY_CODE = {code: (name, why) for name, why, code in STOP_SIGNALS.values()}  # 130: SIGINT, 143: SIGTERM


@dataclass
class FitResult:
    """What a run produced."""

    out_dir: Path
    checkpoint: Path
    step: int
    total_steps: int
    stopped_early: str | None = None  # "max_minutes", "interrupted" (SIGINT), "terminated" (SIGTERM) or None
    last_metrics: dict = field(default_factory=dict)
    method: nn.Module | None = None  # the trained (unwrapped) method, for programmatic use
    skipped_steps: int = 0  # steps whose update was skipped (non-finite loss)


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
    run = Training(recipe, resume=resume, init_from=init_from, dataset=dataset, log_prefix=log_prefix,
                   overwrite=overwrite, knn_monitor=knn_monitor)
    try:
        stopped = run.loop()
        run.finish()
    finally:
        run.close()
    if run.dist.distributed:
        cleanup_distributed()
    return FitResult(run.out, run.ckpt_path, run.step, run.total_steps, stopped, run.last, run.method,
                     run.guard.skipped)


class Training:
    """One training run: everything :func:`fit` builds, and the loop over its steps."""

    def __init__(self, recipe: Recipe, *, resume: bool, init_from: str | Path | None, dataset, log_prefix: str,
                 overwrite: bool, knn_monitor: Callable[[nn.Module], float] | None):
        validate(recipe)
        self.recipe = recipe
        tc = self.tc = recipe.train
        if recipe.eval.knn_every and knn_monitor is None:
            raise ConfigError(f"eval.knn_every={recipe.eval.knn_every}: pass the monitor to fit "
                              "(knn_monitor=cellssl.eval.knn.knn_monitor(recipe), as the CLI does) or set "
                              "eval.knn_every=0")
        self.dist = init_distributed(tc.device)
        self.device = self.dist.device
        self.control = control_group() if self.dist.distributed else None  # stop agreement, per-rank state
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.out = Path(tc.out) if tc.out else default_out_dir(recipe)
        tc.out = str(self.out)
        if not resume:
            check_new_run(self.out, overwrite=overwrite)
        if self.dist.is_main:
            _check_writable(self.out)
        self.ckpt_path = self.out / "checkpoints" / "last.pt"
        # the workers' stack dumps on a stall (engine.watchdog): an unnamed file, nothing is left behind
        self.worker_stacks = tempfile.TemporaryFile() if recipe.data.num_workers > 0 else None
        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self._build_data(dataset)
        self._build_model(load_pretrained=not resume and init_from is None, init_from=init_from)
        self.autocast, precision = autocast_for(self.device, tc.precision)
        self.method.use_target_dtype(target_autocast_dtype(self.device, precision, tc.target_precision))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        on_device = self.device.type in DEVICE_CHECKED and not self.scaler.is_enabled()
        self.optimizer = build_optimizer(self.method, recipe.optim, self.global_batch, fused=on_device)
        self.step = self.start_step = 0
        self.schedule_fixed = not tc.max_minutes  # a wall-clock budget sizes the schedule after a few steps
        if resume:
            self._resume()
        if self.dist.is_main:
            save_recipe(recipe, self.out / "config.yaml")
            if overwrite and not resume:
                self.ckpt_path.unlink(missing_ok=True)  # the replaced run's checkpoint must not be resumed
        self.logger = MetricsLogger(self.out, enabled=self.dist.is_main,
                                    resume_step=self.start_step if resume else None)
        self.saved_step: int | None = self.start_step if resume else None  # the last good checkpoint
        self.guard = NonFiniteGuard(self.method, recipe, self.checkpoint_state, on_device)
        self.progress = (tqdm(total=self.total_steps, initial=self.start_step, desc=log_prefix, unit="step",
                              dynamic_ncols=True) if self.dist.is_main and tc.progress else None)
        self.knn = knn_monitor if recipe.eval.knn_every and self.dist.is_main else None
        self.last: dict = {}
        self.epoch, self.data_time, self.collapse_warned = -1, 0.0, False
        self.start_time, self.t_probe, self.probe_from = 0.0, None, self.start_step
        # a budget's cap (the recipe's epochs or max_steps, set when it first sizes the schedule) and the
        # steps at which it re-sizes the schedule (fit_schedule_to_budget)
        self.planned_steps, self.replan_steps = self.total_steps, []
        self.watch = StallWatchdog(tc.stall_timeout_s, self.out, lambda: worker_pids(self.loader), self.worker_stacks)
        self.stop = StopRequest()

    # ---- the loop -------------------------------------------------------------------------
    def loop(self) -> str | None:
        """Train to the end of the schedule; returns why it stopped early (``"max_minutes"``,
        ``"interrupted"`` by SIGINT or ``"terminated"`` by SIGTERM: at the end of the step the signal
        came in, engine.watchdog) or None. A stage that stalls is a TrainingError (engine.watchdog)."""
        tc, watch = self.tc, self.watch
        self.method.train()
        self.start_time = time.monotonic()
        try:
            with watch, deferred_stop_signals(lambda: watch.fired is not None) as self.stop, self.end_workers_on_stop():
                for views, local in self.batches():
                    t_step = time.perf_counter()
                    lr = set_lr(self.optimizer, self.step, self.total_steps, self.recipe.optim)
                    first_compiled = tc.compile and self.step == self.start_step  # torch.compile builds the graph
                    watch.stage("forward", self.step, factor=3.0 if first_compiled else 1.0)
                    if first_compiled and self.progress is not None:
                        self.progress.set_postfix_str("compiling the step (torch.compile: about a minute on a CPU)")
                    outputs = self.forward(views, local)
                    if first_compiled and not outputs["loss"].requires_grad:
                        raise TrainingError(
                            "the compiled step's loss has no gradient (a torch.compile fault of this torch "
                            f"{torch.__version__} with this method's settings): rerun with --set train.compile=false")
                    skip = self.guard.skip(self.step, outputs)  # a non-finite loss is never applied (engine.guard)
                    if skip is True:
                        self.next_step()
                        continue
                    watch.stage("backward and update", self.step)
                    self.update(outputs["loss"], found_inf=skip if isinstance(skip, Tensor) else None)
                    self.next_step()
                    if self.step % tc.log_every == 0 or self.step in (self.total_steps, self.start_step + 1):
                        watch.stage("logging and monitors", self.step - 1)
                        self.log(outputs, lr, t_step)
                    self.fit_schedule_to_budget()
                    if self.step % tc.checkpoint_every == 0 and self.step < self.total_steps and self.applied():
                        watch.stage("checkpoint", self.step - 1)
                        self.save()
                    if self.out_of_time():
                        return "max_minutes"
        except KeyboardInterrupt:
            if watch.fired is not None:
                raise TrainingError(f"{watch.message()}; {self.checkpoint_state()}") from None
            return self.stop.reason or "interrupted"
        return self.stop.reason

    # ---- the pieces of a step --------------------------------------------------------------
    def batches(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """(global views, local crops or None) on the device for every step left, until a stop signal;
        ``data_time`` is the wait for each (the loader's order is tied to the step: engine.loader).
        A batch the workers do not deliver within ``train.stall_timeout_s`` is a TrainingError."""
        stream = step_batches(self.loader, self.sampler, self.step)
        workers = self.recipe.data.num_workers
        while self.step < self.total_steps and not self.stop_requested():
            t_data = time.perf_counter()
            # with workers the DataLoader's own timeout comes first (its message names the cause)
            self.watch.stage("waiting for a batch" + (f" from the {workers} loader workers" if workers else ""),
                             self.step, factor=2.0 if workers else 1.0)
            try:
                self.epoch, batch = next(stream)
            except RuntimeError as exc:
                if self.stop.signal is not None and "DataLoader worker" in str(exc):
                    return  # the workers got the same stop signal
                if "DataLoader timed out" in str(exc):
                    raise self.loader_timeout() from None
                raise
            views = batch["views"].to(self.device, non_blocking=True)
            local = batch["local"].to(self.device, non_blocking=True) if "local" in batch else None
            self.data_time = time.perf_counter() - t_data
            yield views, local

    def stop_requested(self) -> bool:
        """Whether a stop signal came (SIGINT/SIGTERM, engine.watchdog). Under DDP the ranks agree
        before every step (one host-side all-reduce): a signal seen by any rank stops every rank after
        the same step, so they all write the same checkpoint and none waits for the others forever."""
        if not self.dist.distributed:
            return self.stop.signal is not None
        own = next((code for name, _, code in STOP_SIGNALS.values() if name == self.stop.signal), 0)
        code = agree_max(own, self.control)
        if code and self.stop.signal is None:
            self.stop.signal, self.stop.reason = STOP_BY_CODE[code]
        return code > 0

    def loader_timeout(self) -> TrainingError:
        """The error for a batch that did not come within ``train.stall_timeout_s`` (stacks dumped)."""
        t, n = self.tc.stall_timeout_s, self.recipe.data.num_workers
        dump = self.watch.dump(f"DataLoader timed out after {t:g} s at step {self.step + 1}")
        return TrainingError(
            f"no batch from the {n} data-loader worker(s) for {t:g} s (train.stall_timeout_s) at step {self.step + 1}: "
            f"a worker is stuck or far too slow; stack dump of all threads: {dump}; {self.checkpoint_state()}; likely "
            "cause: a thread-pool call (OpenCV, OpenMP) in a worker forked from a parent that used threads, a slow "
            "or unreachable file system, or too heavy augmentations (data.num_workers=0 shows it in the main process)")

    def forward(self, views: Tensor, local: Tensor | None) -> dict[str, Tensor]:
        """The method's losses under autocast. With ``train.compile`` the step's random inputs (MSBReg's
        Brownian directions) are drawn outside the compiled graph and passed in."""
        args = (views,) if local is None else (views, local)
        extra = self.method.step_inputs(views.shape[0], self.device) if self.tc.compile else {}
        try:
            with self.autocast:
                return self.model(*args, **extra)
        except RuntimeError:  # e.g. a linear-algebra op that fails on non-finite embeddings
            bad = nonfinite_tensors(self.method.state_dict())
            if bad:
                raise self.guard.broken_weights(self.step, bad) from None
            raise

    def update(self, loss: Tensor, found_inf: Tensor | None = None) -> None:
        """Backward, gradient clipping, optimiser step (skipped on the device where ``found_inf`` is
        1), EMA update of the target."""
        opt = self.optimizer
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.recipe.optim.grad_clip:
            self.scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.recipe.optim.grad_clip)
        if found_inf is not None:
            opt.found_inf = found_inf
        self.scaler.step(opt)
        self.scaler.update()
        self.method.after_step(self.step + 1, self.total_steps)

    def next_step(self) -> None:
        self.step += 1
        if self.progress is not None:
            self.progress.update(1)

    def applied(self) -> bool:
        """Whether the last step's update was applied (reads the device's non-finite flags)."""
        self.guard.flush()
        return self.guard.streak == 0

    def log(self, outputs: dict[str, Tensor], lr: float, t_step: float) -> None:
        """One row of ``metrics.jsonl``: losses, lr, timing, and at monitor steps the collapse and kNN
        monitors; the progress bar's figures."""
        tc = self.tc
        if self.device.type == "cuda" and self.step % tc.log_every == 0:
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - t_step
        if not self.applied():
            return  # a skipped step (device check): nothing to log
        row = {"step": self.step, "epoch": self.epoch, "lr": lr, "momentum": float(self.method.momentum),
               "step_time_s": step_time, "data_time_s": self.data_time,
               "img_per_s": self.global_batch / max(step_time + self.data_time, 1e-9)}
        row.update({k: float(v.detach()) for k, v in outputs.items() if k.startswith("loss")})
        if self.step % tc.monitor_every == 0 or self.step == self.start_step + 1:
            self.monitor_collapse(outputs["z"], row)
        if self.knn is not None and self.step % self.recipe.eval.knn_every == 0:
            row["knn_acc"] = self.knn(self.method.backbone)
            self.method.train()
        self.logger.log(row)
        self.last = row
        if self.progress is not None:
            post = {"loss": f"{row['loss']:.3f}", "img/s": f"{row['img_per_s']:.0f}"}
            if "eff_rank" in row:
                post["rank"] = f"{row['eff_rank']:.0f}"
            if row.get("collapse_warning"):
                post["warn"] = "COLLAPSE"
            self.progress.set_postfix(post)

    def monitor_collapse(self, z: Tensor, row: dict) -> None:
        """Effective rank and per-dimension std of ``z`` into ``row``; warns once when the embeddings
        collapse, and with ``train.stop_on_collapse`` stops (TrainingError)."""
        tc = self.tc
        stats = collapse_stats(z)
        row.update(stats)
        d = z.shape[-1]
        collapsed = (stats["eff_rank"] < tc.collapse_rank_fraction * d
                     or stats["emb_std"] < tc.collapse_std_fraction / math.sqrt(d))
        row["collapse_warning"] = bool(collapsed)
        if not (collapsed and self.step > self.start_step + 1):
            return
        text = (f"step {self.step}: embeddings are collapsing (effective rank {stats['eff_rank']:.1f} of {d}, "
                f"per-dim std {stats['emb_std']:.4f})")
        if not self.collapse_warned:
            warnings.warn(text, stacklevel=1)
            self.collapse_warned = True
        if tc.stop_on_collapse:
            self.logger.log(row)
            raise TrainingError(text + "; stopped (train.stop_on_collapse); checkpoint " + str(self.ckpt_path))

    def fit_schedule_to_budget(self) -> None:
        """``--max-minutes``: time ``train.budget_probe_steps`` steps (after the first), then size the
        whole schedule (warm-up, cosine LR, EMA) to the steps that fit (the same on every rank), and
        re-size it at ``train.budget_replans`` even steps after that, each from the rate since the last."""
        if self.schedule_fixed and not self.replan_steps:
            return
        if self.t_probe is None:
            self.t_probe, self.probe_from = time.monotonic(), self.step  # the first step (allocation) is not typical
        elif not self.schedule_fixed and self.step - self.probe_from >= self.tc.budget_probe_steps:
            self.planned_steps = self.total_steps  # as planned now (--resume may re-plan it before)
            self.size_to_budget(margin=0.97)
            self.schedule_fixed = True
            self.replan_steps = replan_points(self.step, self.total_steps, self.tc.budget_replans)
        elif self.replan_steps and self.step >= self.replan_steps[0]:  # a step count: the same on every rank
            self.replan_steps.pop(0)
            self.size_to_budget(margin=0.99)  # a third of the run: the rate includes checkpoints and logging

    def size_to_budget(self, margin: float) -> None:
        """Set ``total_steps`` to what fits in the budget's time left at the rate measured since the
        last sizing (or the probe's start), capped at the recipe's plan (rank 0's figure on every rank)."""
        now = time.monotonic()
        per_step = (now - self.t_probe) / (self.step - self.probe_from)
        self.t_probe, self.probe_from = now, self.step  # the next re-size measures the steps after this one
        left = self.tc.max_minutes * 60 - (now - self.start_time)
        self.total_steps = broadcast_int(budget_total_steps(self.step, self.planned_steps, per_step, left, margin))
        if self.progress is not None:
            self.progress.total = self.total_steps
            self.progress.refresh()

    def out_of_time(self) -> bool:
        """Past ``--max-minutes`` (×1.25 once the schedule is sized to it) before the schedule's end."""
        tc = self.tc
        if not (tc.max_minutes and self.step < self.total_steps):
            return False
        over = (time.monotonic() - self.start_time) / 60 >= tc.max_minutes * (1.25 if self.schedule_fixed else 1.0)
        if self.dist.distributed:  # every rank's clock differs: all stop after the same step
            over = bool(agree_max(int(over), self.control))
        if not over:
            return False
        warnings.warn(f"--max-minutes {tc.max_minutes:g}: stopped at step {self.step} of {self.total_steps} (the "
                      "steps took longer than measured); rerun with --resume to finish the schedule", stacklevel=1)
        return True

    # ---- checkpoints, end ---------------------------------------------------------------------
    def checkpoint_state(self) -> str:
        """The last good checkpoint, for messages."""
        if self.saved_step is None:
            return f"no checkpoint was written (train.checkpoint_every={self.tc.checkpoint_every})"
        return f"last good checkpoint: {self.ckpt_path} (step {self.saved_step}), kept"

    def save(self) -> None:
        """Write the checkpoint of the current step (rank 0). Under DDP every rank first takes rank 0's
        BatchNorm statistics (``broadcast_buffers=False`` lets them drift between ranks): the saved
        model is rank 0's and all ranks hold the same one. Refused (TrainingError) for non-finite weights."""
        if self.dist.distributed:
            broadcast_buffers(self.method)
            # each rank's own random state (MSBReg's Brownian generator, the RNGs), so that --resume
            # continues every rank exactly, not only rank 0
            by_rank = gather_objects({"extra": self.method.extra_state(), "rng": rng_state()}, self.control)
        bad = nonfinite_tensors(self.method.state_dict())
        if bad:
            raise TrainingError(
                f"step {self.step}: {len(bad)} weight tensor(s) of the model are non-finite (e.g. {bad[0]}), so no "
                f"checkpoint is written; {self.checkpoint_state()}; likely cause: optim.lr={self.recipe.optim.lr:g} "
                "too high (lower it or set optim.grad_clip)"
            )
        self.saved_step = self.step
        if self.dist.is_main:
            state = training_checkpoint(self.recipe, self.method, self.optimizer, self.scaler, step=self.step,
                                        steps_per_epoch=self.steps_per_epoch, total_steps=self.total_steps,
                                        schedule_fixed=self.schedule_fixed, in_chans=self.in_chans)
            if self.dist.distributed:
                state["ranks"] = by_rank
            if isinstance(self.sampler, StreamViews):
                state["stream"] = self.sampler.position(self.step)
            save_atomic(state, self.ckpt_path)

    def finish(self) -> None:
        """The final checkpoint; a run in which no step was applied is a TrainingError, not a success."""
        self.guard.flush()
        if self.step > self.start_step and self.guard.updates == 0:
            raise self.guard.no_update_error(self.step - self.start_step)
        self.save()

    @contextlib.contextmanager
    def end_workers_on_stop(self) -> Iterator[None]:
        """After a SIGINT/SIGTERM stop request, end the loader workers before the signal handlers are
        put back: a worker ended by the same signal (a process group's SIGTERM) that dies late, on a busy
        machine, would otherwise reach torch's restored SIGCHLD handler ("DataLoader worker ... is
        killed by signal", an internal error instead of the checkpoint and exit 143)."""
        try:
            yield
        finally:
            if self.stop.signal is not None:
                self.end_workers()

    def end_workers(self) -> None:
        """End the persistent loader workers now, not whenever the loader is garbage-collected (torch has
        no public call for it; a stuck worker is terminated after torch's 5 s join). Idempotent."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.logger.close()
        self.end_workers()
        if self.worker_stacks is not None:
            self.worker_stacks.close()

    # ---- building the run ---------------------------------------------------------------------
    def _build_data(self, dataset) -> None:
        tc, dist = self.tc, self.dist
        self.base, views_ds = build_training_data(self.recipe, dataset)
        n = len(self.base)
        self.global_batch = tc.batch_size * dist.world_size
        if self.global_batch > n:
            raise DataError(
                f"batch size {tc.batch_size}×{dist.world_size} is larger than the dataset ({n} images in "
                f"{getattr(self.base, 'root', 'the data')}): use --batch-size {max(2, n // (2 * dist.world_size))} "
                "or more data"
            )
        self.sampler = training_sampler(self.recipe, views_ds, n, dist.rank, dist.world_size)
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = tc.max_steps if tc.max_steps else (tc.epochs or 1) * self.steps_per_epoch
        self.loader = training_loader(self.recipe, views_ds, self.sampler, pin_memory=self.device.type == "cuda",
                                      stack_fd=self.worker_stacks.fileno() if self.worker_stacks else None)

    def _build_model(self, load_pretrained: bool, init_from: str | Path | None) -> None:
        recipe, device = self.recipe, self.device
        self.in_chans = self.base.channels
        # model.pretrained: starting weights, unless a checkpoint's weights replace them right after
        backbone = build_backbone(recipe.model, self.in_chans, recipe.data.image_size, load_pretrained=load_pretrained)
        method = build_method(recipe.method, recipe.model, backbone)
        if recipe.views.local_views and not method.supports_local_views:
            raise ConfigError(
                f"views.local_views={recipe.views.local_views}: method '{recipe.method.name}' does not train on local "
                f"crops (multi-crop is implemented for msbreg); set views.local_views=0"
            )
        method.seed(self.tc.seed + 1000 * self.dist.rank)
        if init_from is not None:
            init_weights_from(method, init_from, self.in_chans, recipe.model.backbone)
        method.to(device)
        if use_channels_last(device, recipe.model.channels_last, recipe.model.channels_last_cpu):
            method.use_channels_last()
        model: nn.Module = method
        if self.dist.distributed:
            if recipe.model.sync_bn:
                model = method = nn.SyncBatchNorm.convert_sync_batchnorm(model)
            model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
            )
        self.method, self.model = method, torch.compile(model) if self.tc.compile else model

    def _resume(self) -> None:
        """Continue from the checkpoint: exactly, when the run's length (``train.max_steps``, ``epochs``,
        ``max_minutes``) is the one it was planned with; re-planned from the current step (said in one
        line) when it was changed on ``--resume``; a ConfigError when the new length is already done."""
        ckpt = restore_training(self.ckpt_path, self.recipe, self.method, self.optimizer, self.scaler)
        self.step = self.start_step = int(ckpt["step"])
        self._restore_rank_state(ckpt.get("ranks"))
        if isinstance(self.sampler, StreamViews):
            note = stream_resume_note(ckpt.get("stream"), self.sampler.position(self.step))
            if note:
                warnings.warn(note, stacklevel=1)
        planned, stored = self.total_steps, int(ckpt.get("total_steps", self.total_steps))
        self.schedule_fixed = bool(ckpt.get("schedule_fixed", False))
        asked = run_length(vars(self.tc))
        if asked == run_length((ckpt.get("config") or {}).get("train") or {}):
            if self.schedule_fixed or not self.tc.max_steps:
                self.total_steps = stored
            if self.step >= self.total_steps:
                warnings.warn(f"--resume: the run in {self.out} is already complete (step {self.step} of "
                              f"{self.total_steps}): nothing to train; to train longer, give a larger --max-steps "
                              "(or --epochs) with --resume", stacklevel=1)
            return
        self.total_steps = replanned_total(self.step, planned, self.tc.max_minutes, self.out)
        self.schedule_fixed = not self.tc.max_minutes
        cfg, base_lr = self.recipe.optim, self.optimizer.param_groups[0]["base_lr"]
        old_lr = lr_at(self.step, stored, base_lr, warmup_steps_for(cfg, stored), cfg.min_lr_ratio)
        if self.schedule_fixed:
            new_lr = lr_at(self.step, planned, base_lr, warmup_steps_for(cfg, planned), cfg.min_lr_ratio)
            plan = f"re-planned for {planned} steps (LR at step {self.step}: {old_lr:.3g} -> {new_lr:.3g})"
        else:
            plan = (f"re-planned for the steps that fit in --max-minutes {self.tc.max_minutes:g} (at most {planned}), "
                    f"sized after {self.tc.budget_probe_steps} timed steps")
        warnings.warn(f"--resume: the run was planned for {stored} steps and is at step {self.step}; the rest of "
                      f"its LR and EMA schedule is {plan}", stacklevel=1)

    def _restore_rank_state(self, ranks: list | None) -> None:
        """Under DDP, this rank's own random state from the checkpoint (``save`` stores every rank's).
        With another world size than the checkpoint's (not an exact resume anyway) a rank without a
        stored state re-seeds its method's generator from (seed, rank, step), never rank 0's copy."""
        if not self.dist.distributed:
            return
        if ranks and len(ranks) == self.dist.world_size:
            own = ranks[self.dist.rank]
            self.method.load_extra_state(own.get("extra") or {})
            set_rng_state(own.get("rng") or {})
        elif self.dist.rank > 0:
            self.method.seed(self.tc.seed + 1000 * self.dist.rank + self.step)


def run_length(train: dict) -> tuple:
    """What decides a run's length in a recipe's ``train`` section: ``(max_steps, epochs, max_minutes)``,
    with a missing or zero value as None (``--resume`` compares the checkpoint's with the one asked)."""
    return tuple((train.get(k) or None) for k in ("max_steps", "epochs", "max_minutes"))


def replanned_total(step: int, planned: int, max_minutes: float | None, out: Path) -> int:
    """The new length of a run resumed at ``step`` with another length: the recipe's ``planned`` steps
    (a time budget sizes it later, capped there). ConfigError when ``planned`` leaves nothing to train."""
    if planned > step:
        return planned
    how = (f"give a larger --max-steps (e.g. --max-steps {2 * step}) with --max-minutes {max_minutes:g}: the budget "
           "never lengthens the recipe's plan" if max_minutes else
           f"give --max-steps (or --epochs) above {step} to train longer")
    raise ConfigError(f"--resume: the run in {out} is already at step {step} and the recipe now plans {planned} "
                      f"steps: nothing to train; {how}, or use {out / 'checkpoints' / 'last.pt'} as it is")


def replan_points(step: int, total: int, replans: int) -> list[int]:
    """The steps at which a budgeted schedule sized at ``step`` for ``total`` steps is re-sized:
    ``replans`` points evenly spaced in between (e.g. 10, 910, 2 -> [310, 610]), none repeated."""
    return sorted({step + (total - step) * (k + 1) // (replans + 1) for k in range(replans)} - {step})


def budget_total_steps(step: int, planned: int, seconds_per_step: float, seconds_left: float,
                       margin: float = 0.97) -> int:
    """Steps a wall-clock budget allows: ``step`` done plus what fits in ``seconds_left`` at the
    measured ``seconds_per_step`` (× ``margin`` for checkpoints and logging), capped at ``planned``
    (the recipe's epochs or max_steps) and at least ``step + 1``."""
    fits = int(max(0.0, seconds_left) * margin / max(seconds_per_step, 1e-9))
    return max(step + 1, min(planned, step + fits))


def autocast_for(device: torch.device, precision: str):
    """(autocast context, precision used) for ``train.precision`` on ``device``: bf16 on CUDA by
    default, none (fp32) on the CPU unless asked; ``fast`` picks bf16 on a CPU with native bf16
    (:func:`cellssl.engine.hardware.resolve_precision`)."""
    precision = resolve_precision(device, precision)
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
