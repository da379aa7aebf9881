"""Export a trained checkpoint as one small TorchScript file for CPU inference (`memcom export`).

Names resolve lazily, so the `memcom` CLI does not load the export machinery until it runs.
"""

from typing import TYPE_CHECKING

from torchrec_memcom.lazy import lazy_getattr

if TYPE_CHECKING:
    from .export import TOLERANCES, ExportCheckError, ExportError, describe, export_checkpoint
    from .inference import InferenceDLRM, load_model
    from .raw import RawLineError, parse_lines

_EXPORTS = {
    "export_checkpoint": "export",
    "describe": "export",
    "ExportCheckError": "export",
    "TOLERANCES": "export",
    "ExportError": "export",
    "InferenceDLRM": "inference",
    "load_model": "inference",
    "parse_lines": "raw",
    "RawLineError": "raw",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
