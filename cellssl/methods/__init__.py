"""Self-supervised methods: one file each, registered by name with its settings.

Every module of this package is imported here, and importing a method's file registers it (and its
settings, which recipes are built from): a new method is its file, nothing else to edit.
"""

import importlib
import pkgutil

from cellssl.methods.base import METHODS, SSLMethod, build_method, register_method

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["METHODS", "SSLMethod", "build_method", "register_method"]
