"""Lazy package exports: a name resolves to its module's attribute on first access.

>>> getattr_, dir_ = lazy_exports("doc", {"sqrt": "math"})
>>> getattr_("sqrt")(9.0), dir_()
(3.0, ['sqrt'])
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(
    package: str, exports: dict[str, str], eager: list[str] | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps a name to the module holding it.

    ``eager`` names are already imported and are only listed by ``__dir__``. A resolved name
    is stored in the package's namespace, so ``__getattr__`` runs once per name.
    """
    listed = sorted([*(eager or []), *exports])

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        if package in sys.modules:
            setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return listed

    return __getattr__, __dir__
