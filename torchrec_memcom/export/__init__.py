"""Export a trained checkpoint as one small TorchScript file for CPU inference (`memcom export`).

Names resolve lazily, so the `memcom` CLI does not load the export machinery until it runs.
"""

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .export import TOLERANCES, ExportCheckError, describe, export_checkpoint
    from .inference import InferenceDLRM, load_model
    from .raw import RawLineError, parse_lines
    from .tables import ExportError

_EXPORTS = {
    "export_checkpoint": "export",
    "describe": "export",
    "ExportCheckError": "export",
    "TOLERANCES": "export",
    "ExportError": "tables",
    "InferenceDLRM": "inference",
    "load_model": "inference",
    "parse_lines": "raw",
    "RawLineError": "raw",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
