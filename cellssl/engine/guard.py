"""Non-finite losses during training: skip the update, count it, name the cause, stop a streak.

A step whose loss is NaN or infinite is not applied (the step still counts, so the data order
stays tied to the step). Every such step warns once; ``train.max_nonfinite`` of them in a row
stop the run with a :class:`~cellssl.errors.TrainingError` that names the non-finite loss term,
the recipe values behind it and the last good checkpoint; weights that are already non-finite
stop it at once (skipping cannot help).

Where the check runs:

- *on the host* (CPU, and fp16 runs whose GradScaler reads its flag anyway): the loss is read
  every step and a bad step never reaches backward or the optimiser;
- *on the device* (CUDA with bf16/fp32): reading the loss would stall the GPU every step. The
  flag stays on the device and is handed to the optimiser as ``found_inf`` (the fused AdamW/SGD
  kernels and :class:`~cellssl.engine.optim.LARS` then leave weights and optimiser state untouched);
  the flags of all steps since the last read are read in one transfer at log and checkpoint steps
  (:meth:`NonFiniteGuard.flush`), which warns and stops exactly as the host check does. The only
  difference: the EMA target still takes its step towards the (unchanged) online network.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from cellssl.config import Recipe
from cellssl.engine.checkpoint import nonfinite_tensors
from cellssl.errors import TrainingError


def _recipe_values(recipe: Recipe, fields: list[str]) -> str:
    """``"method.sv_weight=0.1, method.sv_eps=0.0001"`` for ``fields`` of ``recipe.method``."""
    return ", ".join(f"method.{f}={getattr(recipe.method, f)}" for f in dict.fromkeys(fields))


def nonfinite_cause(bad: list[str], logged: list[str], method: nn.Module, recipe: Recipe) -> tuple[str, str]:
    """(which loss terms are non-finite, the likely cause with the recipe values behind them).

    ``bad``: the non-finite ones of the ``logged`` terms (``loss_sv``, ...). A method's
    ``loss_terms`` maps each term to the ``method.*`` recipe values that scale or shape it; with
    every term non-finite (or none, only the weighted total) the learning rate is named as well.
    """
    terms_cfg: dict = getattr(method, "loss_terms", {}) or {}
    lr = f"optim.lr={recipe.optim.lr:g}"
    if bad and len(bad) < len(logged):
        values = _recipe_values(recipe, [f for t in bad for f in terms_cfg.get(t, ())])
        return ", ".join(bad), f"likely cause: {values or 'the ' + bad[0] + ' term'} or the data"
    values = _recipe_values(recipe, [f for fs in terms_cfg.values() for f in fs])
    what = ", ".join(bad) if bad else "the weighted total (every term is finite)"
    return what, f"likely cause: {values + ' or ' if values else ''}{lr} too high, or the data"


class NonFiniteGuard:
    """Watches the loss of every step (see the module docstring).

    ``checkpoint_state()`` describes the last good checkpoint for the messages; ``on_device``
    keeps the check on the device (read by :meth:`flush`). Counters: ``skipped`` (all bad steps),
    ``updates`` (applied steps), ``streak`` (bad steps in a row).
    """

    def __init__(self, method: nn.Module, recipe: Recipe, checkpoint_state: Callable[[], str], on_device: bool):
        self.method, self.recipe, self.checkpoint_state = method, recipe, checkpoint_state
        self.on_device = on_device
        self.skipped = self.updates = self.streak = 0
        self.last_bad: tuple[str, str] = ("", "")
        self._pending: list[tuple[int, Tensor, list[str]]] = []

    def broken_weights(self, step: int, bad: list[str]) -> TrainingError:
        """The error for weights that went non-finite in the update of (0-based) ``step``."""
        return TrainingError(
            f"stopped at step {step + 1}: the model weights became non-finite in the update of step {step} "
            f"(e.g. {bad[0]}); {self.checkpoint_state()}; likely cause: optim.lr={self.recipe.optim.lr:g} too high "
            "(lower it or set optim.grad_clip)"
        )

    def skip(self, step: int, outputs: dict[str, Tensor]) -> bool | Tensor:
        """On the host: True when the (0-based) ``step`` must not be applied (handled here). On the
        device: a 0-dim float tensor, 1.0 for a bad step, to give the optimiser as ``found_inf``."""
        logged = [k for k in outputs if k.startswith("loss_")]
        if self.on_device:
            finite = torch.stack([torch.isfinite(outputs[k]).all() for k in ["loss", *logged]])
            self._pending.append((step, finite, logged))
            return (~finite[0]).float()
        if torch.isfinite(outputs["loss"]):
            self._record(step, True, [], logged)
            return False
        self._record(step, False, [k for k in logged if not torch.isfinite(outputs[k]).all()], logged)
        return True

    def flush(self) -> bool:
        """Read the device flags of the steps since the last flush (one transfer) and handle them in
        order; True when the last of them was skipped. A no-op on the host path."""
        if not self._pending:
            return False
        flags = torch.stack([f for _, f, _ in self._pending]).cpu()
        pending, self._pending = self._pending, []
        for (step, _, logged), finite in zip(pending, flags.tolist()):
            self._record(step, bool(finite[0]), [k for k, ok in zip(logged, finite[1:]) if not ok], logged)
        return not bool(flags[-1, 0])

    def _record(self, step: int, ok: bool, bad: list[str], logged: list[str]) -> None:
        if ok:
            self.streak = 0
            self.updates += 1
            return
        self.streak += 1
        self.skipped += 1
        terms, cause = self.last_bad = nonfinite_cause(bad, logged, self.method, self.recipe)
        warnings.warn(f"step {step + 1}: non-finite loss (terms: {terms}); update skipped", stacklevel=1)
        weights = nonfinite_tensors(self.method.state_dict()) if self.streak == 1 else []
        if weights:  # skipping cannot help: the last update broke the model
            raise self.broken_weights(step, weights)
        if self.streak >= self.recipe.train.max_nonfinite:
            raise TrainingError(
                f"stopped at step {step + 1}: {self.streak} non-finite losses in a row in {terms} (the model "
                f"weights are still finite); {self.checkpoint_state()}; {cause}"
            )

    def no_update_error(self, steps: int) -> TrainingError:
        """The error for a run of ``steps`` steps of which none was applied."""
        terms, cause = self.last_bad
        return TrainingError(f"no update was made: all {steps} steps had a non-finite loss in {terms}; "
                             f"{self.checkpoint_state()}; {cause}")
