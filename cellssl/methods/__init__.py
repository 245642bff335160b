"""Self-supervised methods: one file each, registered by name."""

from cellssl.methods import msbreg  # noqa: F401  (registers "msbreg")
from cellssl.methods.base import METHODS, SSLMethod, build_method, register_method

for _name in ("byol", "simclr", "vicreg", "barlow"):
    try:  # baselines live in their own files; import registers them
        __import__(f"cellssl.methods.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"cellssl.methods.{_name}":
            raise

__all__ = ["METHODS", "SSLMethod", "build_method", "register_method"]
