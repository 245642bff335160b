"""What the machine a run trains on does fast, and the settings that follow from it.

bf16 on the CPU: with AMX-BF16 (Intel Sapphire Rapids and later) oneDNN runs bf16 convolutions
and matrix products on the tile unit, so bf16 autocast can beat fp32. AVX512-BF16 alone (Cooper
Lake, AMD Zen 4; the 2-core development machine reports it without AMX) is not enough: there,
``benchmarks/cpu_speed.py`` measured bf16 autocast 13 % slower than fp32 for an MSBReg step
(2.91 vs 2.57 s, 64 × 4 views at 64 px) and 12 % for VICReg, so such a CPU keeps float32. The
flags come from ``/proc/cpuinfo`` (Linux); elsewhere none are found and fp32 stays.

``train.precision``:
- ``auto``: bf16 on CUDA; on the CPU fp32, or, once :data:`AUTO_FAST_ON_CPU` is set, what ``fast`` picks;
- ``fast``: bf16 on CUDA and on a CPU with native bf16 (:func:`cpu_has_fast_bf16`), else fp32;
- ``bf16`` / ``fp16`` / ``fp32``: exactly that, on any device.

``train.target_precision`` (methods with an EMA target: MSBReg, BYOL): the target is never
differentiated, and a bf16 *forward* is fast with AVX512-BF16 alone (its dot-product instructions;
it is the backward that makes bf16 training slower there): resnet18's forward on 256 views at 64 px
took 0.16 s in bf16 autocast against 0.32 s in fp32 on the 2-core machine (AMD EPYC, ``avx512_bf16``),
against 1.09 s for the online forward + backward.
- ``auto``: in an fp32 run on a CPU with bf16 dot products (:func:`cpu_has_bf16_dot`), the target's
  forward runs in bf16 autocast; otherwise as the run (on CUDA the run is already bf16);
- ``same``: as the run; ``bf16``: bf16 autocast on any device.

``model.channels_last`` (CUDA) and ``model.channels_last_cpu`` (the CPU): the channels-last memory
format for the weights and every batch the backbone sees.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

CPUINFO = Path("/proc/cpuinfo")
BF16_FLAGS = ("amx_bf16",)  # /proc/cpuinfo flag of bf16 matrix arithmetic that beats fp32 (see above)
# ``auto`` stays fp32 on the CPU: no AMX machine was at hand to show bf16 trains as well and faster
# (benchmarks/cpu_speed.py, then benchmarks/quality.py at equal minutes); set True once one has.
AUTO_FAST_ON_CPU = False
BF16_DOT_FLAGS = ("avx512_bf16", "amx_bf16")  # bf16 dot products: a bf16 forward beats fp32's (see above)


@lru_cache(maxsize=1)
def cpu_flags(path: Path = CPUINFO) -> frozenset[str]:
    """The CPU's feature flags (the ``flags`` line of ``/proc/cpuinfo``); empty where unreadable."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """Whether the CPU does bf16 matrix arithmetic fast enough for bf16 autocast to pay (AMX-BF16)."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def cpu_has_bf16_dot() -> bool:
    """Whether the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX-BF16): enough for a bf16
    forward pass to beat fp32, not for bf16 training (:func:`cpu_has_fast_bf16`)."""
    return any(flag in cpu_flags() for flag in BF16_DOT_FLAGS)


def target_autocast_dtype(device: torch.device, run_precision: str, target_precision: str) -> torch.dtype | None:
    """``train.target_precision`` -> the autocast dtype of the EMA target's forward, or None (as the run).

    Args:
        device: the run's device.
        run_precision: the precision the run uses (:func:`resolve_precision`'s answer: bf16, fp16, fp32).
        target_precision: ``auto``, ``same`` or ``bf16`` (module docstring).
    """
    if target_precision == "bf16":
        return torch.bfloat16
    if target_precision == "auto" and run_precision == "fp32" and device.type == "cpu" and cpu_has_bf16_dot():
        return torch.bfloat16
    return None


def resolve_precision(device: torch.device, precision: str) -> str:
    """``train.precision`` on ``device`` -> the precision used: ``bf16``, ``fp16`` or ``fp32``
    (``auto`` and ``fast`` as in the module docstring)."""
    if precision == "auto":
        precision = "fast" if device.type == "cuda" or AUTO_FAST_ON_CPU else "fp32"
    if precision == "fast":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()) else "fp32"
    return precision


def use_channels_last(device: torch.device, on_cuda: bool, on_cpu: bool) -> bool:
    """Whether the run trains in the channels-last memory format: ``model.channels_last`` on CUDA,
    ``model.channels_last_cpu`` on the CPU, never elsewhere."""
    return (device.type == "cuda" and on_cuda) or (device.type == "cpu" and on_cpu)
