"""AdaBN: only BatchNorm buffers change, parameters never do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from cellssl.config import DataConfig
from cellssl.engine.checkpoint import load_backbone
from cellssl.errors import DataError
from cellssl.eval.features import adapt_batchnorm_folder
from cellssl.models.bn import adapt_batchnorm, batchnorm_layers
from conftest import TINY_BACKBONE


def _target(n: int = 24, size: int = 32, shift: float = 2.0) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g) * 3 + shift  # a very different "lab"
    return TensorDataset(x, torch.zeros(n, dtype=torch.long))


def test_adabn_changes_only_bn_buffers():
    net, _ = load_backbone(f"random:{TINY_BACKBONE}", in_chans=3, image_size=32)
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    layers = batchnorm_layers(net)
    assert layers
    before = [m.running_mean.clone() for m in layers]
    momenta = [m.momentum for m in layers]
    out = adapt_batchnorm(net, _target(), "cpu", batch_size=8)
    assert out is net and not net.training and all(not m.training for m in net.modules())
    for k, v in net.named_parameters():
        assert torch.equal(v, params[k]), k
    assert any(not torch.allclose(b, m.running_mean) for b, m in zip(before, layers))
    assert [m.momentum for m in layers] == momenta
    assert all(int(m.num_batches_tracked) == 3 for m in layers)  # cumulative average over 3 batches


def test_adabn_cumulative_average_matches_full_batch_stats():
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    ds = _target(n=16, size=4)
    adapt_batchnorm(bn, ds, "cpu", batch_size=8)
    x = ds.tensors[0]
    expected = torch.stack([x[:8].mean((0, 2, 3)), x[8:].mean((0, 2, 3))]).mean(0)
    torch.testing.assert_close(bn[0].running_mean, expected, rtol=1e-4, atol=1e-4)


def test_adabn_max_images_and_no_bn_warning():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.LayerNorm(30))
    with pytest.warns(UserWarning, match="no BatchNorm"):
        adapt_batchnorm(net, _target(), "cpu")
    bn = torch.nn.Sequential(torch.nn.BatchNorm2d(3))
    adapt_batchnorm(bn, _target(n=40, size=4), "cpu", batch_size=4, max_images=12)
    assert int(bn[0].num_batches_tracked) == 3


def test_adabn_folder(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    net, _ = load_backbone(f"random:{TINY_BACKBONE}", in_chans=3, image_size=32)
    before = batchnorm_layers(net)[0].running_mean.clone()
    adapt_batchnorm_folder(net, tmp_path, DataConfig(image_size=32), "cpu", batch_size=4, in_chans=3)
    assert not torch.allclose(before, batchnorm_layers(net)[0].running_mean)
    with pytest.raises(DataError, match="1"):
        adapt_batchnorm_folder(net, tmp_path, DataConfig(image_size=32), "cpu", in_chans=1)
