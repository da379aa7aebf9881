"""Lazy package exports (PEP 562): a name's module is imported on first use, so `memcom --help`
and `memcom data` never pay for torch and torchrec."""

import importlib
from typing import Any, Callable, Dict


def lazy_getattr(package: str, exports: Dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``name`` from the submodule ``exports[name]``."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(f".{exports[name]}", package), name)

    return __getattr__
