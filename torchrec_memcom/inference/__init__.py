"""Inference forms of our embedding collections: `inference_model(model, precision)` swaps an
`InferenceEmbeddingBagCollection` in for every collection of a model (docs/inference.md)."""

from torchrec_memcom.inference.collection import InferenceEmbeddingBagCollection, inference_model, kjt_dynamic_shapes
from torchrec_memcom.inference.stores import PRECISIONS
from torchrec_memcom.inference.tables import ExportError

__all__ = ["ExportError", "InferenceEmbeddingBagCollection", "PRECISIONS", "inference_model", "kjt_dynamic_shapes"]
