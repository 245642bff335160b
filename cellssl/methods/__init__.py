"""Self-supervised methods: one file each, registered by name (importing a file registers it)."""

from cellssl.methods import barlow, byol, msbreg, simclr, vicreg  # noqa: F401  (register the methods)
from cellssl.methods.base import METHODS, SSLMethod, build_method, register_method

__all__ = ["METHODS", "SSLMethod", "build_method", "register_method"]
