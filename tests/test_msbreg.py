"""The MSBReg losses' math, on small hand-made tensors (msbreg.md, 'Tests that pin the math')."""

import math

import pytest
import torch
import torch.nn.functional as F

from cellssl.config import ModelConfig, method_config
from cellssl.methods import build_method
from cellssl.methods.base import effective_rank
from cellssl.methods.msbreg import (
    brownian_loss,
    centroid_loss,
    sample_brownian_directions,
    singular_value_loss,
)
from cellssl.models import build_backbone


def test_centroid_loss_zero_when_prediction_equals_target_centroid_of_other_views():
    torch.manual_seed(0)
    zt = F.normalize(torch.randn(6, 4, 16), dim=-1)
    others = (zt.sum(dim=1, keepdim=True) - zt) / 3
    p = others * 3.0  # each online view predicts the target centroid of the other views (any scale)
    assert centroid_loss(p, zt).item() == pytest.approx(0.0, abs=1e-6)  # per_view is the default
    assert centroid_loss(-p, zt).item() == pytest.approx(4.0, abs=1e-5)
    # halves: online centroid of views {0,1} vs target centroid of {2,3}, and the other way round
    half_a, half_b = zt[:, :2].mean(1, keepdim=True), zt[:, 2:].mean(1, keepdim=True)
    p_halves = torch.cat([half_b.expand(-1, 2, -1), half_a.expand(-1, 2, -1)], dim=1)
    assert centroid_loss(p_halves, zt, "halves").item() == pytest.approx(0.0, abs=1e-6)
    # same_views (ablation): the online centroid equals the target centroid of the same views
    centroid = zt.mean(dim=1, keepdim=True).expand(-1, 4, -1)
    assert centroid_loss(centroid, zt, "same_views").item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("m", [2, 4])
def test_centroid_loss_is_large_for_the_trivial_same_view_solution(m):
    """Unrelated 'views' whose online predictions copy their own target view: the same-view form
    is ~0 (no invariance needed), the default forms stay at ~2 (cosine ~0 between unrelated views)."""
    torch.manual_seed(4)
    zt = torch.randn(512, m, 64)  # views of one image are unrelated random vectors
    p = zt.clone()  # each online view predicts exactly its own target view
    assert centroid_loss(p, zt, "same_views").item() < 1e-6
    assert centroid_loss(p, zt).item() > 1.8  # default: per_view
    assert centroid_loss(p, zt, "halves").item() > 1.8


def test_centroid_loss_local_crops_pull_to_global_target_centroid():
    torch.manual_seed(5)
    zt = F.normalize(torch.randn(8, 2, 16), dim=-1)
    p = zt.flip(1)  # global term is 0: each view predicts the other's target
    target_centroid = zt.mean(dim=1, keepdim=True)
    good_local = target_centroid.expand(-1, 3, -1).clone()
    bad_local = -good_local
    assert centroid_loss(p, zt, p_local=good_local).item() == pytest.approx(0.0, abs=1e-6)
    # 2 global views at 0, 3 local views at 4: weighted by view count -> 4·3/5
    assert centroid_loss(p, zt, p_local=bad_local).item() == pytest.approx(12 / 5, abs=1e-5)
    p_local = torch.randn(8, 3, 16, requires_grad=True)
    centroid_loss(p, zt, p_local=p_local).backward()
    assert p_local.grad is not None and p_local.grad.abs().sum() > 0


def _separation(loss, z1, z2):
    """Σ_i <∂L/∂z_i1 − ∂L/∂z_i2, z_i1 − z_i2>: negative when gradient descent pushes views apart."""
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    return ((g1 - g2) * (z1 - z2).detach()).sum().item()


@pytest.mark.parametrize("b,d", [(64, 32), (128, 256)])
def test_singular_value_loss_per_view_does_not_push_views_of_one_image_apart(b, d):
    """Two views z_i1 = c_i + δ_i, z_i2 = c_i − δ_i. The stacked form's gradient separates them
    in every draw (more spread in the stacked batch); the per-view form has no systematic push
    (a second-order effect of random sign, mean ≈ 0), the centroid form none at all."""
    from cellssl.methods.msbreg import sv_inputs

    seps = {"stacked": [], "per_view": [], "centroid": []}
    for seed in range(8):
        torch.manual_seed(seed)
        c, u = torch.randn(b, d), torch.randn(b, d)
        z1 = (c + 0.1 * u).requires_grad_(True)
        z2 = (c - 0.1 * u).requires_grad_(True)
        for mode, out in seps.items():
            batches = sv_inputs(torch.stack([z1, z2], dim=1), mode)
            out.append(_separation(torch.stack([singular_value_loss(x) for x in batches]).mean(), z1, z2))
    mean = {mode: sum(v) / len(v) for mode, v in seps.items()}
    assert max(seps["stacked"]) < 0  # the stacked ablation form pushes views apart, every time
    assert abs(mean["per_view"]) < abs(mean["stacked"]) / 20
    assert abs(mean["centroid"]) < abs(mean["stacked"]) / 100


@pytest.mark.parametrize("variant", ["per_view", "halves", "same_views"])
def test_centroid_loss_gradient_never_reaches_target(variant):
    p = torch.randn(4, 4, 8, requires_grad=True)
    zt = torch.randn(4, 4, 8, requires_grad=True)
    centroid_loss(p, zt, variant).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert zt.grad is None


def test_singular_value_loss_prefers_isotropic_batch():
    torch.manual_seed(0)
    iso = torch.randn(256, 16)
    squeezed = torch.randn(256, 2) @ torch.randn(2, 16) + 0.01 * torch.randn(256, 16)
    assert singular_value_loss(iso).item() < singular_value_loss(squeezed).item() - 1.0
    assert singular_value_loss(iso, variant="flat").item() < singular_value_loss(squeezed, variant="flat").item()
    # lower bound of the logdet form: a flat spectrum with trace 1 gives -log(1/D + eps)
    assert singular_value_loss(iso).item() >= -math.log(1 / 16 + 1e-4) - 1e-5


@pytest.mark.parametrize("shape", [(64, 16), (12, 32)])  # B > D and rank-deficient B < D
def test_singular_value_loss_cholesky_matches_svd(shape):
    torch.manual_seed(2)
    z = torch.randn(*shape, dtype=torch.float64)
    chol = singular_value_loss(z, eps=1e-4, method="cholesky")
    svd = singular_value_loss(z, eps=1e-4, method="svd")
    assert chol.item() == pytest.approx(svd.item(), abs=1e-5)


def test_brownian_gradient_is_tangential_part_of_r():
    torch.manual_seed(3)
    z = torch.randn(5, 2, 12)
    z = F.normalize(z, dim=-1).requires_grad_(True)
    r = F.normalize(torch.randn(5, 12), dim=-1)
    brownian_loss(z, r).backward()
    # d/dz cos(z, r) for unit z is r - (z·r) z (tangent to the sphere); scaled by 1/(N M)
    tangent = r.unsqueeze(1) - (z.detach() * r.unsqueeze(1)).sum(-1, keepdim=True) * z.detach()
    cos = F.cosine_similarity(z.grad.flatten(0, 1), tangent.flatten(0, 1), dim=-1)
    assert torch.all(cos > 0.999)


def test_brownian_directions_are_fresh_each_call_and_reproducible():
    g = torch.Generator().manual_seed(5)
    a, b = sample_brownian_directions(4, 8, g), sample_brownian_directions(4, 8, g)
    assert not torch.allclose(a, b)
    assert torch.allclose(a.norm(dim=-1), torch.ones(4))
    g2 = torch.Generator().manual_seed(5)
    assert torch.equal(sample_brownian_directions(4, 8, g2), a)


def test_effective_rank_bounds():
    torch.manual_seed(0)
    assert effective_rank(torch.randn(512, 8)).item() > 7.0
    collapsed = torch.randn(512, 1) @ torch.ones(1, 8) + 1e-4 * torch.randn(512, 8)
    assert effective_rank(collapsed).item() < 2.0


def _tiny_msbreg(**kw):
    torch.manual_seed(0)
    mcfg = ModelConfig(backbone="test_resnet", proj_hidden=64, proj_dim=32, pred_hidden=64)
    backbone = build_backbone(mcfg, in_chans=3, image_size=16)
    return build_method(method_config("msbreg", **kw), mcfg, backbone)


def test_msbreg_step_lowers_centroid_loss_and_target_gets_no_grad():
    method = _tiny_msbreg()
    views = torch.rand(8, 3, 3, 16, 16)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    first = None
    for _ in range(5):
        out = method(views)
        first = first if first is not None else out["loss_centroid"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert all(p.grad is None for p in method.target_backbone.parameters())
    assert all(not p.requires_grad for p in method.target_projector.parameters())
    assert method(views)["loss_centroid"].item() < first
    assert set(out) >= {"loss", "loss_centroid", "loss_sv", "loss_brownian", "z"}
    assert out["z"].shape == (8 * 3, 32)


def _train_embeddings(sv_weight: float, steps: int = 200) -> float:
    """Train free embeddings (no network) on L_MC + λ_SV·L_SV; return the final effective rank."""
    from cellssl.methods.msbreg import sv_inputs

    torch.manual_seed(0)
    z = torch.randn(64, 2, 16, requires_grad=True)
    opt = torch.optim.SGD([z], lr=100.0)  # the loss is a mean over 128 rows: big lr
    for _ in range(steps):
        target = z.detach().clone()
        target[..., 2:] = 0  # the attraction pulls every embedding into a 2-D subspace
        sv = torch.stack([singular_value_loss(x) for x in sv_inputs(z)]).mean()  # per view (default)
        loss = centroid_loss(z, target) + sv_weight * sv
        opt.zero_grad()
        loss.backward()
        opt.step()
    return effective_rank(z.detach().flatten(0, 1)).item()


def test_singular_value_loss_keeps_rank_high_against_attraction():
    with_sv = _train_embeddings(sv_weight=1.0)
    without = _train_embeddings(sv_weight=0.0)
    assert with_sv > 8.0  # of 16 dimensions, against an attraction into a 2-D subspace
    assert without < 3.0


def test_ema_target_moves_towards_online():
    method = _tiny_msbreg()
    with torch.no_grad():
        for p in method.backbone.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.target_backbone.parameters()]
    method.after_step(0, 100)  # momentum 0.99 at step 0
    after = list(method.target_backbone.parameters())
    online = list(method.backbone.parameters())
    for b, a, o in zip(before, after, online):
        assert torch.allclose(a, 0.99 * b + 0.01 * o, atol=1e-6)
