"""Baseline methods (BYOL, SimCLR, VICReg, Barlow Twins): their losses on hand-made tensors,
the method classes end to end on a tiny ResNet, and the MSBReg ablation recipes."""

import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

import cellssl.methods.simclr as simclr_mod
from cellssl.config import ModelConfig, method_config, recipe_to_dict
from cellssl.methods import METHODS, build_method
from cellssl.methods.barlow import barlow_loss, barlow_terms, cross_correlation
from cellssl.methods.byol import byol_loss
from cellssl.methods.msbreg import centroid_loss
from cellssl.methods.simclr import nt_xent_loss
from cellssl.methods.vicreg import covariance_loss, invariance_loss, variance_loss, vicreg_loss
from cellssl.models import build_backbone

ABLATION_DIR = Path(__file__).resolve().parent.parent / "recipes" / "ablation"


def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix (n a power of 2): ±1 entries, orthogonal columns."""
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def decorrelated_batch(b: int = 16) -> torch.Tensor:
    """(B, B−1): Hadamard columns without the all-ones one — zero mean, ±1, orthogonal."""
    return hadamard(b)[:, 1:].clone()


# ----- BYOL -----------------------------------------------------------------------------


@pytest.mark.parametrize("m", [2, 3])
def test_byol_loss_zero_when_aligned_and_four_when_opposite(m):
    torch.manual_seed(0)
    direction = torch.randn(5, 1, 16)
    scales = torch.rand(5, m, 1) + 0.5
    zt = direction * scales  # every view's target points the same way, with different norms
    p = 3.0 * zt
    assert byol_loss(p, zt).item() == pytest.approx(0.0, abs=1e-6)
    assert byol_loss(-p, zt).item() == pytest.approx(4.0, abs=1e-5)


@pytest.mark.parametrize("m", [2, 4])
def test_byol_loss_is_mean_over_ordered_pairs(m):
    torch.manual_seed(1)
    p, zt = torch.randn(6, m, 8), torch.randn(6, m, 8)
    pairs = [(i, j) for i in range(m) for j in range(m) if i != j]
    ref = sum((2 - 2 * F.cosine_similarity(p[:, i], zt[:, j], dim=-1)).mean() for i, j in pairs) / len(pairs)
    assert byol_loss(p, zt).item() == pytest.approx(ref.item(), rel=1e-5)
    assert byol_loss(list(p.unbind(1)), list(zt.unbind(1))).item() == pytest.approx(ref.item(), rel=1e-5)
    if m == 2:  # the ablation row "BYOL with M views" (msbreg per_view) is BYOL for two views
        assert centroid_loss(p, zt, "per_view").item() == pytest.approx(ref.item(), rel=1e-5)


def test_byol_loss_gradient_never_reaches_target():
    p = torch.randn(4, 3, 8, requires_grad=True)
    zt = torch.randn(4, 3, 8, requires_grad=True)
    byol_loss(p, zt).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert zt.grad is None


# ----- SimCLR / NT-Xent ------------------------------------------------------------------


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> torch.Tensor:
    """The usual two-view implementation: cross entropy over a (2B, 2B) similarity matrix."""
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / tau
    sim = sim - 1e9 * torch.eye(2 * b)
    labels = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)])
    return F.cross_entropy(sim, labels)


def test_nt_xent_for_a_single_image():
    # B = 1, M = 2: the positive is the only candidate, so the loss is exactly 0
    torch.manual_seed(2)
    assert nt_xent_loss(torch.randn(1, 2, 8), 0.2).item() == pytest.approx(0.0, abs=1e-6)
    # B = 1, M = 3: the two positives share one softmax (p1 + p2 = 1), so the mean of
    # −log p over them is ≥ log 2, with equality when the views coincide
    assert nt_xent_loss(torch.ones(1, 3, 8), 0.2).item() == pytest.approx(math.log(2), abs=1e-6)
    assert nt_xent_loss(torch.randn(1, 3, 8), 0.2).item() >= math.log(2) - 1e-6


def test_nt_xent_known_value_for_orthogonal_images():
    # two images, two identical views each, images orthogonal: the anchor's candidates are
    # its positive (cos 1) and two negatives (cos 0) -> log(1 + 2 e^{-1/τ})
    tau = 0.5
    z = torch.tensor([[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 1.0]]])
    assert nt_xent_loss(z, tau).item() == pytest.approx(math.log(1 + 2 * math.exp(-1 / tau)), rel=1e-6)


def test_nt_xent_matches_cross_entropy_reference_for_two_views():
    torch.manual_seed(3)
    z1, z2 = torch.randn(10, 16), torch.randn(10, 16)
    for tau in (0.1, 0.2, 1.0):
        ref = nt_xent_reference(z1, z2, tau)
        assert nt_xent_loss([z1, z2], tau).item() == pytest.approx(ref.item(), rel=1e-5)
        assert nt_xent_loss(torch.stack([z1, z2], 1), tau).item() == pytest.approx(ref.item(), rel=1e-5)


def test_nt_xent_matches_loop_reference_for_three_views():
    torch.manual_seed(4)
    b, m, tau = 3, 3, 0.3
    z = torch.randn(b, m, 5)
    zh = F.normalize(z, dim=-1)
    terms = []
    for a, i in itertools.product(range(b), range(m)):
        denom = sum(
            math.exp(float(zh[a, i] @ zh[c, k]) / tau)
            for c, k in itertools.product(range(b), range(m))
            if (c, k) != (a, i)
        )
        for j in range(m):
            if j != i:
                terms.append(-math.log(math.exp(float(zh[a, i] @ zh[a, j]) / tau) / denom))
    assert nt_xent_loss(z, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("m", [2, 3])
def test_nt_xent_lower_for_aligned_positives_and_spread_negatives(m):
    torch.manual_seed(5)
    b, d = 8, 16
    aligned = torch.eye(d)[:b].unsqueeze(1).repeat(1, m, 1) + 0.05 * torch.randn(b, m, d)
    random = torch.randn(b, m, d)
    collapsed = torch.ones(b, m, d) + 0.05 * torch.randn(b, m, d)
    la, lr, lc = (nt_xent_loss(x, 0.2).item() for x in (aligned, random, collapsed))
    assert la < lr - 1.0
    assert la < lc - 1.0


def test_nt_xent_split_over_ranks_equals_full_batch(monkeypatch):
    # simulate 2 DDP ranks: each rank's anchors against the gathered batch; the mean of the two
    # ranks' losses must equal the single-process loss on the whole batch
    torch.manual_seed(6)
    z0, z1 = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    full = nt_xent_loss(torch.cat([z0, z1]), 0.2)
    losses = []
    for rank, local in enumerate((z0, z1)):
        other = F.normalize(z1 if rank == 0 else z0, dim=-1).reshape(4, -1)
        monkeypatch.setattr(
            simclr_mod,
            "gather_with_grad",
            lambda x, rank=rank, other=other: torch.cat([x, other] if rank == 0 else [other, x]),
        )
        monkeypatch.setattr(simclr_mod, "_rank_offset", lambda b, rank=rank: rank * b)
        losses.append(nt_xent_loss(local, 0.2))
    assert ((losses[0] + losses[1]) / 2).item() == pytest.approx(full.item(), rel=1e-5)


def test_every_loss_refuses_a_wrong_shape_with_the_one_check():
    """One shape check (methods.base.check_shape / stack_views) for every loss: same wording, the
    received shape named; a list of per-view (B, D) tensors is the same as the stacked (B, M, D)."""
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"p must have shape \(N, M, D\), got \(4, 8\)"):
        byol_loss(z, z)
    with pytest.raises(ValueError, match=r"z needs at least 2 views, got M = 1"):
        nt_xent_loss(torch.randn(4, 1, 8))
    with pytest.raises(ValueError, match=r"z_b must have the same shape as the first input \(4, 8\), got \(4, 9\)"):
        barlow_loss(z, torch.randn(4, 9))
    with pytest.raises(ValueError, match=r"z must have shape \(B, D\), got \(2, 3, 4\)"):
        variance_loss(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"z_target must have the same shape"):
        byol_loss(torch.randn(4, 2, 8), torch.randn(4, 3, 8))
    stacked = torch.randn(4, 2, 8)
    assert torch.equal(byol_loss(list(stacked.unbind(1)), list(stacked.unbind(1))), byol_loss(stacked, stacked))
    assert torch.equal(nt_xent_loss(list(stacked.unbind(1))), nt_xent_loss(stacked))


def test_losses_are_float32_under_autocast():
    torch.manual_seed(7)
    z = torch.randn(8, 2, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = [
            byol_loss(z, z.flip(0)),
            nt_xent_loss(z, 0.2),
            vicreg_loss(z[:, 0], z[:, 1]),
            barlow_loss(z[:, 0], z[:, 1]),
        ]
    for out in outs:
        assert out.dtype == torch.float32 and torch.isfinite(out)


# ----- VICReg ----------------------------------------------------------------------------


def test_vicreg_variance_zero_when_std_at_least_one_and_positive_when_collapsed():
    z = decorrelated_batch(16)  # every dim: ±1, unbiased std = sqrt(16/15) > 1
    assert variance_loss(z).item() == 0.0
    assert variance_loss(3 * torch.randn(256, 8)).item() == 0.0
    collapsed = torch.ones(16, 8) * 5 + 1e-3 * torch.randn(16, 8)
    assert variance_loss(collapsed).item() == pytest.approx(1.0, abs=0.02)
    # half-spread dims (std ½) give γ − ½ per dim
    half = 0.5 * z * math.sqrt(15 / 16)  # unbiased std exactly 0.5
    assert variance_loss(half, eps=0.0).item() == pytest.approx(0.5, abs=1e-6)
    assert variance_loss(half, eps=0.0, gamma=2.0).item() == pytest.approx(1.5, abs=1e-6)


def test_vicreg_covariance_zero_when_decorrelated_and_positive_when_redundant():
    z = decorrelated_batch(16)
    assert covariance_loss(z).item() == pytest.approx(0.0, abs=1e-10)
    redundant = z.clone()
    redundant[:, 1] = redundant[:, 0]  # two dims identical: C_01 = C_10 = 16/15
    d = z.shape[1]
    assert covariance_loss(redundant).item() == pytest.approx(2 * (16 / 15) ** 2 / d, rel=1e-5)


def test_vicreg_invariance_is_mse_and_total_uses_paper_weights():
    torch.manual_seed(8)
    za, zb = torch.randn(32, 8), torch.randn(32, 8)
    assert invariance_loss(za, zb).item() == pytest.approx(((za - zb) ** 2).mean().item(), rel=1e-6)
    assert invariance_loss(torch.zeros(4, 3), torch.full((4, 3), 2.0)).item() == pytest.approx(4.0)
    expected = (
        25 * invariance_loss(za, zb)
        + 25 * (variance_loss(za) + variance_loss(zb)) / 2
        + 1 * (covariance_loss(za) + covariance_loss(zb))
    )
    assert vicreg_loss(za, zb).item() == pytest.approx(expected.item(), rel=1e-6)
    z = decorrelated_batch(16)
    assert vicreg_loss(z, z).item() == pytest.approx(0.0, abs=1e-6)  # the global minimum


# ----- Barlow Twins ----------------------------------------------------------------------


def test_barlow_on_diagonal_vanishes_for_identical_views_and_is_scale_free():
    torch.manual_seed(9)
    za = torch.randn(64, 8)
    on, _ = barlow_terms(za, za.clone())
    assert on.item() == pytest.approx(0.0, abs=1e-6)
    zb = za + 0.5 * torch.randn(64, 8)
    assert barlow_loss(3 * za + 1, zb).item() == pytest.approx(barlow_loss(za, zb).item(), rel=1e-4)
    on_noisy, _ = barlow_terms(za, zb)
    assert on_noisy.item() > 0.05


def test_barlow_off_diagonal_zero_when_decorrelated_and_large_when_collapsed():
    z = decorrelated_batch(16)
    c = cross_correlation(z, z)
    assert torch.allclose(c, torch.eye(15), atol=1e-5)
    on, off = barlow_terms(z, z)
    assert off.item() == pytest.approx(0.0, abs=1e-8)
    assert (on + off).item() == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(10)
    collapsed = torch.randn(16, 1).repeat(1, 15) + 1e-4 * torch.randn(16, 15)  # all dims redundant
    _, off_c = barlow_terms(collapsed, collapsed, lambd=0.0051)
    assert off_c.item() == pytest.approx(0.0051 * 15 * 14, rel=1e-3)  # every C_ij ≈ 1
    assert barlow_loss(collapsed, collapsed).item() > barlow_loss(z, z).item() + 1.0


# ----- the method classes end to end ----------------------------------------------------

TERMS = {
    "byol": ["loss_byol"],
    "simclr": ["loss_nt_xent"],
    "vicreg": ["loss_invariance", "loss_variance", "loss_covariance"],
    "barlow": ["loss_on_diag", "loss_off_diag"],
}
MODEL_CFG = ModelConfig(backbone="test_resnet", proj_hidden=64, proj_dim=32, pred_hidden=64)


def make_method(name: str, **cfg):
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(backbone="test_resnet"), in_chans=3, image_size=16)
    return build_method(method_config(name, **cfg), MODEL_CFG, backbone)


@pytest.mark.parametrize("name", sorted(TERMS))
@pytest.mark.parametrize("m", [2, 3])
def test_method_forward_returns_documented_outputs(name, m):
    assert name in METHODS
    method = make_method(name)
    views = torch.randn(8, m, 3, 16, 16)
    out = method(views)
    assert set(out) == {"loss", "z", *TERMS[name]}
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"]) and out["loss"].requires_grad
    for key in TERMS[name]:
        assert out[key].ndim == 0 and torch.isfinite(out[key]) and not out[key].requires_grad
    assert out["z"].shape == (8 * m, 32) and not out["z"].requires_grad
    assert (method.target_backbone is not None) == (name == "byol")
    assert (method.predictor is not None) == (name == "byol")


def test_vicreg_and_barlow_methods_average_their_pairwise_losses():
    torch.manual_seed(11)
    views = torch.randn(8, 3, 3, 16, 16)
    for name in ("vicreg", "barlow"):
        method = make_method(name)
        out = method(views)
        x, b, m = method.flatten_views(views)
        z = method.unflatten(method.online(x), b, m).detach()
        pair_loss = vicreg_loss if name == "vicreg" else barlow_loss
        ref = torch.stack([pair_loss(z[:, i], z[:, j]) for i, j in itertools.combinations(range(3), 2)]).mean()
        assert out["loss"].item() == pytest.approx(ref.item(), rel=1e-4)


@pytest.mark.parametrize("name", sorted(TERMS))
def test_a_few_adamw_steps_lower_the_loss(name):
    method = make_method(name)
    torch.manual_seed(12)
    views = torch.randn(8, 3, 3, 16, 16)
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for step in range(6):
        out = method(views)
        losses.append(out["loss"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_step(step, 6)
    with torch.no_grad():
        final = method(views)["loss"].item()
    assert final < 0.9 * losses[0], (name, losses, final)


def test_byol_after_step_moves_target_towards_online():
    method = make_method("byol", momentum_base=0.5)
    with torch.no_grad():
        for p in method.projector.parameters():
            p.add_(1.0)
    before = [t.clone() for t in method.target_projector.parameters()]
    method.after_step(0, 10)
    for t0, t, o in zip(before, method.target_projector.parameters(), method.projector.parameters()):
        assert torch.allclose(t, 0.5 * t0 + 0.5 * o)
        assert not t.requires_grad


# ----- ablation recipes ------------------------------------------------------------------

ABLATIONS = {  # what each overlay switches, on top of the recipe (other values come from the recipe)
    "centroid": dict(sv_weight=0.0, brownian_weight=0.0),
    "centroid_sv": dict(brownian_weight=0.0),
    "centroid_bd": dict(sv_weight=0.0),
    "centroid_sv_bd": dict(),
    "old_forms": dict(centroid_variant="same_views", sv_on="stacked"),
}


VIEW_OVERLAYS = {  # view ablations beside the forces: what each switches on top of the recipe
    "weak_colour": dict(hed_jitter=0.02, brightness=0.1, contrast=0.1, saturation=0.05, hue=0.0),
    "grayscale": dict(grayscale_p=0.2),
    "zoom_out": dict(zoom_out_p=0.5, zoom_out_max=1.5),
    "randstain": dict(randstain_p=0.5, randstain_std=3.0),
}


# blood_smear's own colour since docs/tuning.md phase C, kept as an overlay for other recipes and variants
STRONG_COLOUR = dict(hed_jitter=0.04, brightness=0.25, contrast=0.25, saturation=0.2, hue=0.04)


def test_ablation_recipes_are_the_rows():
    assert sorted(p.stem for p in ABLATION_DIR.glob("*.yaml")) == sorted(
        {**ABLATIONS, **VIEW_OVERLAYS, "strong_colour": STRONG_COLOUR})


def test_strong_colour_overlay_is_blood_smears_own_colour():
    from cellssl.config import load_recipe

    path = ABLATION_DIR / "strong_colour.yaml"
    assert yaml.safe_load(path.read_text()) == {"views": STRONG_COLOUR}
    assert {k: getattr(load_recipe("blood_smear").views, k) for k in STRONG_COLOUR} == STRONG_COLOUR


@pytest.mark.parametrize("row", sorted(VIEW_OVERLAYS))
def test_view_overlay_switches_only_its_view_fields(row):
    from cellssl.config import load_recipe

    path = ABLATION_DIR / f"{row}.yaml"
    assert path.read_text().lstrip().startswith("#")
    assert set(yaml.safe_load(path.read_text())) == {"views"}
    base, recipe = load_recipe("blood_smear"), load_recipe("blood_smear", overlays=[str(path)])
    assert {k: getattr(recipe.views, k) for k in VIEW_OVERLAYS[row]} == VIEW_OVERLAYS[row]
    assert {k: getattr(base.views, k) for k in VIEW_OVERLAYS[row]} != VIEW_OVERLAYS[row]  # it changes something
    untouched = {k: v for k, v in vars(base.views).items() if k not in VIEW_OVERLAYS[row]}
    assert {k: getattr(recipe.views, k) for k in untouched} == untouched
    assert recipe_to_dict(recipe)["method"] == recipe_to_dict(base)["method"]


@pytest.mark.parametrize("row", sorted(ABLATIONS))
def test_ablation_overlay_switches_only_its_forces(row):
    from cellssl.config import load_recipe

    path = ABLATION_DIR / f"{row}.yaml"
    text = path.read_text()
    assert text.lstrip().startswith("#")  # says which ablation row it is
    d = yaml.safe_load(text)
    assert set(d) == {"method"}
    base = load_recipe("blood_smear")
    recipe = load_recipe("blood_smear", overlays=[str(path)])
    assert recipe.method.name == "msbreg"
    for key, value in ABLATIONS[row].items():
        assert getattr(recipe.method, key) == value, key
    untouched = {k: v for k, v in vars(base.method).items() if k not in ABLATIONS[row]}
    assert {k: getattr(recipe.method, k) for k in untouched} == untouched
    if row != "old_forms":  # the ablation rows use the default (non-trivial) loss forms
        assert (recipe.method.centroid_variant, recipe.method.sv_on) == ("per_view", "per_view")


# ----- EMA momentum 0: the target is the online network, without a second forward -------------------

@pytest.mark.parametrize("name", ["msbreg", "byol"])
def test_momentum_zero_reuses_the_online_embedding_and_trains_the_same(name):
    """τ = 0 throughout: the target's forward is skipped (its output would equal the online's), and
    three training steps give the same losses and weights as with the target's own forward."""
    model_cfg = ModelConfig(backbone="test_resnet", proj_hidden=32, proj_dim=16, pred_hidden=32)
    cfg = method_config(name, momentum_base=0.0, momentum_end=0.0)
    torch.manual_seed(0)
    fast = build_method(cfg, model_cfg, build_backbone(model_cfg, 3, 32))
    slow = build_method(cfg, model_cfg, build_backbone(model_cfg, 3, 32))
    slow.load_state_dict(fast.state_dict())
    slow.target_embedding = lambda x, z: slow.target(x)  # the forward the shortcut replaces
    calls = []
    fast.target_backbone.register_forward_hook(lambda *a: calls.append(1))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fast, slow)]
    views = torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for step in range(3):
        losses = []
        for method, opt in zip((fast, slow), opts):
            extra = method.step_inputs(8, torch.device("cpu"))
            extra = {"directions": torch.randn(8, 16, generator=torch.Generator().manual_seed(step))} if extra else {}
            out = method(views, **extra)
            opt.zero_grad(set_to_none=True)
            out["loss"].backward()
            opt.step()
            method.after_step(step + 1, 3)
            losses.append(out["loss"].item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    assert calls == []
    for a, b in zip(fast.parameters(), slow.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    fast.eval()
    fast(views)
    assert calls  # in eval mode (no training step) the target still runs its own forward
