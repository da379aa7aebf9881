"""Inference forms of our embedding collections: `inference_model(model, precision)` swaps an
`InferenceEmbeddingBagCollection` in for every collection of a model (docs/inference.md).

Names resolve lazily, so importing the row stores (as `memcom export`'s CLI does) does not load
TorchRec and FBGEMM.
"""

from typing import TYPE_CHECKING

from torchrec_memcom.lazy import lazy_getattr

if TYPE_CHECKING:
    from .collection import InferenceEmbeddingBagCollection, inference_model, kjt_dynamic_shapes
    from .stores import PRECISIONS
    from .tables import ExportError

_EXPORTS = {
    "InferenceEmbeddingBagCollection": "collection",
    "inference_model": "collection",
    "kjt_dynamic_shapes": "collection",
    "PRECISIONS": "stores",
    "ExportError": "tables",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
