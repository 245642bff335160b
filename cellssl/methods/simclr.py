"""SimCLR: contrastive learning with the NT-Xent loss.

Chen, Kornblith, Norouzi, Hinton, *A Simple Framework for Contrastive Learning of Visual
Representations*, arXiv:2002.05709 (ICML 2020). Each embedding must pick out the other views
of its own image among all embeddings of the batch (gathered across DDP ranks), with cosine
similarity divided by a temperature τ:

    ℓ(a, p) = −log( exp(s_ap / τ) / Σ_{k ≠ a} exp(s_ak / τ) ),   s = cos
    L = mean over anchors a and their positives p (the other M−1 views of a's image)

With M = 2 this is exactly the paper's eq. (1) averaged over the 2N anchors (2N − 1
candidates each, 2(N − 1) negatives). With M > 2 each anchor sees all M·N − 1 other
embeddings (M(N − 1) negatives) and the loss is averaged over every ordered pair of views of
an image — the multi-positive form (SupCon's L_out, arXiv:2004.11362 eq. 2, with "label" =
image id).

Example::

    z = torch.randn(8, 2, 128)        # B images × M views × D
    nt_xent_loss(z, temperature=0.2)  # scalar
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from cellssl.config import MethodConfig, Range, setting
from cellssl.methods.base import SSLMethod, gather_with_grad, register_method, stack_views


def _rank_offset(local_b: int) -> int:
    """Index of this rank's first image in the gathered batch (0 when not distributed)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank() * local_b
    return 0


def nt_xent_loss(z: Tensor | list[Tensor], temperature: float = 0.2, gather: bool = True) -> Tensor:
    """NT-Xent (normalised temperature-scaled cross entropy), arXiv:2002.05709 eq. (1).

    Args:
        z: projections ``(B, M, D)`` or a list of M tensors ``(B, D)``; M ≥ 2.
        temperature: τ (the paper's best for large batches is 0.1–0.5; recipe default 0.2).
        gather: concatenate the batch of all DDP ranks (with gradient) as candidates; local
            rows stay the anchors. A no-op when not distributed.

    Returns:
        Scalar float32 loss: the mean over local anchors (b, i) and positives (b, j), j ≠ i, of
        ``−s_(bi)(bj)/τ + logsumexp_{k ≠ (b,i)} s_(bi)k/τ`` with s the cosine similarity.
        For B = 1 it is 0 (the positives are the only candidates).
    """
    z = stack_views(z, "z")
    b, m, d = z.shape
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    with torch.autocast(device_type=z.device.type, enabled=False):
        zh = F.normalize(z.float(), dim=-1)
        z_all = gather_with_grad(zh.reshape(b, m * d)).reshape(-1, m, d) if gather else zh
        offset = _rank_offset(b) if gather else 0
        anchors = zh.reshape(b * m, d)  # sample-major: row b·M + i is view i of image b
        cands = z_all.reshape(-1, d)
        logits = anchors @ cands.T / temperature  # (B·M, B_all·M)
        rows = torch.arange(b * m, device=z.device)
        own_img = rows // m + offset  # image index of each anchor in the gathered batch
        cand_img = torch.arange(cands.shape[0], device=z.device) // m
        self_mask = torch.zeros_like(logits, dtype=torch.bool)
        self_mask[rows, offset * m + rows] = True
        logits = logits.masked_fill(self_mask, float("-inf"))
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        pos_mask = (own_img[:, None] == cand_img[None, :]) & ~self_mask  # M−1 per row
        return -(log_prob[pos_mask]).mean()


@dataclass
class SimCLRSettings(MethodConfig):
    """SimCLR's recipe setting (``method.*``; arXiv:2002.05709)."""

    temperature: float = setting(0.2, Range(0, lo_open=True), "τ of the NT-Xent loss (the paper's best: 0.1-0.5)")


@register_method("simclr", settings=SimCLRSettings)
class SimCLR(SSLMethod):
    """SimCLR (arXiv:2002.05709): backbone + projector, NT-Xent over all views of the batch.

    Recipe settings (``method.*``, :class:`SimCLRSettings`): ``temperature`` τ (default 0.2). No predictor, no target;
    negatives come from the (DDP-gathered) batch, so larger batches help.
    """

    uses_target = False
    uses_predictor = False
    loss_terms = {"loss_nt_xent": ("temperature",)}
    cfg: SimCLRSettings

    def forward(self, views: Tensor) -> dict[str, Tensor]:
        """Losses for views ``(B, M, C, H, W)``, M ≥ 2.

        Returns ``loss`` (= ``loss_nt_xent``), ``loss_nt_xent`` (detached) and ``z`` (detached
        projections ``(B·M, D)``, view-major).
        """
        x, b, m = self.flatten_views(views)
        z_flat = self.online(x)
        loss = nt_xent_loss(self.unflatten(z_flat, b, m), self.cfg.temperature)
        return {"loss": loss, "loss_nt_xent": loss.detach(), "z": z_flat.detach()}
