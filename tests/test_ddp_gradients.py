"""Gradients across ranks: for every method, one global batch split over 2 gloo ranks (DDP) gives
the loss and the gradients of 1 process on the whole batch.

Two spawned processes run every method once (tiny linear backbone, real heads, real losses,
``DistributedDataParallel``); the test process computes the single-process reference and compares:
the mean over ranks of the per-rank loss, every parameter gradient after DDP's averaging, the
gradient w.r.t. the input views (a rank's is W × the single-process one, before averaging) and the
heads' BatchNorm running statistics.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from cellssl.config import ModelConfig, method_config
from cellssl.methods import build_method
from cellssl.methods.msbreg import sample_brownian_directions
from conftest import spawn_ranks

WORLD, B, M, D_IN = 2, 8, 3, 16
CASES = {
    "msbreg": {},
    "msbreg-flat-stacked": {"sv_variant": "flat", "sv_on": "stacked", "centroid_variant": "same_views"},
    "byol": {},
    "simclr": {},
    "vicreg": {},
    "barlow": {},
}
JOIN_TIMEOUT_S = 180
pytestmark = pytest.mark.slow  # two spawned processes (a fresh interpreter each)


class TinyBackbone(nn.Module):
    """(B, 1, 4, 4) -> (B, 12): no BatchNorm, so only the heads' statistics are batch-wide."""

    num_features = 12

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(D_IN, self.num_features), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_case(case: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The method (seeded weights), the global views (B, M, 1, 4, 4) and Brownian directions (B, D)."""
    name = case.split("-")[0]
    torch.manual_seed(1234)
    model_cfg = ModelConfig(proj_hidden=16, proj_dim=8, pred_hidden=16)
    method = build_method(method_config(name, **CASES[case]), model_cfg, TinyBackbone())
    g = torch.Generator().manual_seed(99)
    views = torch.randn(B, M, 1, 4, 4, generator=g)
    directions = sample_brownian_directions(B, model_cfg.proj_dim, g)
    return method, views, directions


def step(method: nn.Module, module: nn.Module, views: torch.Tensor, directions: torch.Tensor) -> dict:
    """One forward/backward; returns the loss, parameter and input gradients, BN running stats."""
    views = views.clone().requires_grad_(True)
    kwargs = {"directions": directions} if method.name == "msbreg" else {}
    loss = module(views, **kwargs)["loss"]
    loss.backward()
    return {
        "loss": loss.detach().clone(),
        "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
        "x_grad": views.grad.clone(),
        "running": {n: b.clone() for n, b in method.named_buffers() if "running" in n},
    }


def rank_worker(rank: int, store: str, out: str) -> None:
    """One gloo rank: every case on its half of the global batch, wrapped in DDP."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        lo, hi = rank * B // WORLD, (rank + 1) * B // WORLD
        for case in CASES:
            method, views, directions = make_case(case)
            ddp = nn.parallel.DistributedDataParallel(method, broadcast_buffers=False)
            res = step(method, ddp, views[lo:hi], directions[lo:hi])
            dist.all_reduce(res["loss"])
            res["loss"] /= WORLD
            results[case] = res
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run the 2 ranks once (spawned, joined with a timeout, killed if still alive)."""
    tmp = tmp_path_factory.mktemp("ddp_grads")
    codes = spawn_ranks(rank_worker, [(r, str(tmp / "store"), str(tmp)) for r in range(WORLD)], JOIN_TIMEOUT_S)
    assert codes == [0] * WORLD, f"rank exit codes {codes} (None = killed after {JOIN_TIMEOUT_S} s)"
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_equal_one_process(ranks, case):
    method, views, directions = make_case(case)
    ref = step(method, method, views, directions)
    r0, r1 = ranks[0][case], ranks[1][case]
    tol = {"rtol": 1e-4, "atol": 1e-6}
    torch.testing.assert_close(r0["loss"], ref["loss"], **tol)
    assert ref["grads"].keys() == r0["grads"].keys() and ref["grads"]
    for n, g in ref["grads"].items():
        torch.testing.assert_close(r0["grads"][n], g, **tol, msg=lambda m, n=n: f"{case} {n}: {m}")
        torch.testing.assert_close(r1["grads"][n], g, **tol)
    # a rank's gradient w.r.t. its own inputs is W x the single-process one (DDP averages params only)
    x_grad = torch.cat([r0["x_grad"], r1["x_grad"]]) / WORLD
    torch.testing.assert_close(x_grad, ref["x_grad"], **tol)
    # the heads' BatchNorm saw the whole batch on both ranks
    assert ref["running"]
    for n, v in ref["running"].items():
        torch.testing.assert_close(r0["running"][n], v, **tol)
        torch.testing.assert_close(r1["running"][n], v, **tol)
