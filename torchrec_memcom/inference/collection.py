"""`InferenceEmbeddingBagCollection` and `inference_model`: any model holding our collections,
for serving.

As `torchrec.quant`'s `EmbeddingBagCollection.from_float` is the inference form of a stock EBC,
`InferenceEmbeddingBagCollection.from_float` is the inference form of any of ours (MEmCom, hash,
QR, budgeted, mixed) and of stock EBCs beside them: a KeyedJaggedTensor in, a KeyedTensor with
the same keys and dims out, the tables in the precision asked for. `inference_model` swaps one in
for every collection of a model, as `torchrec.inference.modules.quantize_inference_model` swaps
quantized EBCs in, so the model's own code around its collections is unchanged.
"""

import copy
from typing import Any, Dict, List, Optional, cast

import torch
from torch import Tensor, nn
from torch.export import Dim
from torchrec.distributed.types import ShardedModule
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingBagCollectionInterface
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_memcom.inference.stores import PRECISIONS, store_bytes
from torchrec_memcom.inference.tables import ExportError, Store, build_stores, collect_tables, join_stores
from torchrec_memcom.modules.compressed_collection import CompressedCollection
from torchrec_memcom.modules.mixed_embedding_bag import MixedEmbeddingBagCollection

# The collections `from_float` converts; other EBC interfaces (sharded, quantized) are refused.
COLLECTIONS = (EmbeddingBagCollection, CompressedCollection, MixedEmbeddingBagCollection)
# Attributes `apply_optimizer_in_backward` leaves on parameters: training state.
OPTIMIZER_ATTRIBUTES = ("_in_backward_optimizers", "_optimizer_classes", "_optimizer_kwargs")
# The fields of a KJT's pytree node whose first dim varies with the ids and the batch size.
DYNAMIC_FIELDS = ("_values", "_weights", "_lengths", "_offsets")


class InferenceEmbeddingBagCollection(nn.Module):
    """A trained embedding bag collection for inference: ``forward(KeyedJaggedTensor) ->
    KeyedTensor`` with the collection's keys and dims, from row stores in ``precision``.

    Stock, MEmCom, hashed and QR tables of one dim share a ``CompressedEmbeddings`` store,
    budgeted ones of one dim a ``TieredEmbeddings``; bags pool by the tables' SUM or MEAN, times
    the KJT's weights for a weighted collection (an unweighted one ignores them, as TorchRec's
    EBC does). Input keys may come in any order and include others (ignored); ids and lengths
    may be int32 or int64. It holds buffers only: nothing to train. Build it with
    ``from_float``, or ``inference_model`` for a whole model.

    Args:
        stores: the row stores (``build_stores``), each holding some of ``keys``.
        keys: the output keys, one per feature, in the collection's order.
        dims: the embedding dim of each key.
        mean: per key, whether its bags are averaged (MEAN pooling) rather than summed.
        weighted: whether the KJT's weights scale the ids (a weighted stock EBC).
        precision: the stores' precision (``fp32``, ``fp16`` or ``int8``).

    Example::

        ebc = InferenceEmbeddingBagCollection.from_float(trained_ebc, "int8")
        kt = ebc(kjt)                      # kt.keys() == the trained collection's keys
        scripted = torch.jit.script(ebc)
    """

    precision: torch.jit.Final[str]
    weighted: torch.jit.Final[bool]
    has_mean: torch.jit.Final[bool]
    in_order: torch.jit.Final[bool]
    one_store: torch.jit.Final[bool]
    # buffers, registered in __init__, declared for type checkers
    store_of: Tensor
    local_index: Tensor
    columns: Tensor
    column_key: Tensor
    column_mean: Tensor

    def __init__(
        self,
        stores: List[Store],
        keys: List[str],
        dims: List[int],
        mean: List[bool],
        weighted: bool,
        precision: str,
    ) -> None:
        super().__init__()
        held = [f for s in stores for f in s.feature_names]
        if sorted(held) != sorted(keys) or len(set(keys)) != len(keys):
            raise ValueError(f"the stores hold features {held}, not the keys {keys} (each once)")
        self.precision = precision
        self.weighted = weighted
        self.stores = nn.ModuleList(stores)
        self._keys = list(keys)
        self._dims = list(dims)
        self._key_index: Dict[str, int] = {k: i for i, k in enumerate(keys)}
        store_of = [next(j for j, s in enumerate(stores) if f in s.feature_names) for f in keys]
        local = [stores[j].feature_names.index(f) for f, j in zip(keys, store_of)]
        self.register_buffer("store_of", torch.tensor(store_of, dtype=torch.int64))
        self.register_buffer("local_index", torch.tensor(local, dtype=torch.int64))
        # the stores' outputs side by side are the keys in `held` order: their columns in key order
        dim_of = dict(zip(keys, dims))
        starts, at = {}, 0
        for f in held:
            starts[f], at = at, at + dim_of[f]
        columns = [c for f in keys for c in range(starts[f], starts[f] + dim_of[f])]
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.int64))
        self.in_order = columns == sorted(columns)
        self.one_store = len(stores) == 1
        self.has_mean = any(mean)
        # per output column: its key, and whether that key's bags are averaged
        column_key = [i for i, d in enumerate(dims) for _ in range(d)]
        self.register_buffer("column_key", torch.tensor(column_key, dtype=torch.int64))
        self.register_buffer("column_mean", torch.tensor([mean[i] for i in column_key], dtype=torch.bool))

    @classmethod
    def from_float(cls, module: nn.Module, precision: str = "int8") -> "InferenceEmbeddingBagCollection":
        """The inference form of a trained (unsharded) collection: stock ``EmbeddingBagCollection``,
        ``MEmCom``/``Hash``/``QR``/``BudgetedEmbeddingBagCollection`` or a mixed one of those."""
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
        if not isinstance(module, COLLECTIONS):
            raise ExportError(f"{type(module).__name__} is not an embedding bag collection inference_model converts")
        configs = module.embedding_bag_configs()
        keys = [f for cfg in configs for f in cfg.feature_names]
        mean = []
        for cfg in configs:
            if cfg.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ExportError(f"table {cfg.name!r}: pooling {cfg.pooling.name}; inference pools with SUM or MEAN")
            mean += [cfg.pooling == PoolingType.MEAN] * len(cfg.feature_names)
        dims = [cfg.embedding_dim for cfg in configs for _ in cfg.feature_names]
        stores = build_stores(collect_tables(module), keys, precision)
        device = next(iter(module.parameters())).device  # the stores' index buffers start on the host
        return cls(stores, keys, dims, mean, bool(module.is_weighted()), precision).to(device)

    def keys(self) -> List[str]:
        """The output keys (the collection's features, in its order)."""
        return self._keys

    def nbytes(self) -> Dict[str, int]:
        """Bytes of what it holds: ``tables`` (rows; int8: with their scale and bias),
        ``entity_scalars``, ``projections``, ``remap`` (budgeted ranks), ``feature_index``."""
        return store_bytes(dict(self.named_buffers()))

    def one_id_per_feature(self, feature_names: List[str]) -> nn.Module:
        """The lookup of ids ``[B, F]`` of ``feature_names`` (these keys in any order), one per
        feature, as embeddings ``[B, F, d]`` (the Criteo DLRM export's input): the stores, of
        one dim, joined; they share the tables with this module."""
        if sorted(feature_names) != sorted(self._keys):
            raise ExportError(f"features {feature_names} are not the collection's keys {self._keys}")
        return join_stores(cast(List[Store], list(self.stores)), feature_names)

    def _positions(self, keys: List[str]) -> List[int]:
        """Where each of our keys is among the input's ``keys``; a missing one is an error."""
        out: List[int] = []
        for k in self._keys:
            if k not in keys:
                raise ValueError("feature {} is not in the input's keys {}".format(k, keys))
            out.append(keys.index(k))
        return out

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys = features.keys()
        batch = features.stride()
        positions = self._positions(keys)
        values = features.values().long()
        lengths = features.lengths()
        device = values.device
        weights: Optional[Tensor] = None
        if self.weighted:
            weights = features.weights().float()
        ours = [self._key_index.get(k, -1) for k in keys]
        # the bag of every id in the input's (key, sample) order, then its key among ours and sample
        bag = torch.repeat_interleave(
            torch.arange(len(keys) * batch, device=device), lengths, output_size=values.numel()
        )
        key_of_input = torch.tensor(ours, dtype=torch.int64, device=device)
        key = key_of_input.index_select(0, torch.div(bag, batch, rounding_mode="floor"))
        sample = bag % batch
        all_ours = -1 not in ours
        pooled: List[Tensor] = []
        for s, store in enumerate(self.stores):
            ids, at_key, at_sample, w = values, key, sample, weights
            if not (self.one_store and all_ours):
                mine = (key >= 0) & (self.store_of.index_select(0, key.clamp(min=0)) == s)
                picked = torch.nonzero(mine).squeeze(1)
                ids, at_key = values.index_select(0, picked), key.index_select(0, picked)
                at_sample = sample.index_select(0, picked)
                if w is not None:
                    w = w.index_select(0, picked)
            feature = self.local_index.index_select(0, at_key)
            # nn.ModuleList iterates as Module (TorchScript allows only a bare ignore at a line's end)
            out = store.pooled(ids, feature, w, at_sample * store.num_features + feature, batch)  # type: ignore[operator]
            pooled.append(out.reshape(batch, -1))
        out = pooled[0] if self.one_store else torch.cat(pooled, 1)
        if not self.in_order:
            out = out.index_select(1, self.columns)
        if self.has_mean:
            counts = lengths.view(len(keys), batch).index_select(0, torch.tensor(positions, device=device))
            denominator = counts.t().float().clamp(min=1).index_select(1, self.column_key)
            out = torch.where(self.column_mean, out / denominator, out)
        return KeyedTensor(keys=self._keys, length_per_key=self._dims, values=out)


def kjt_dynamic_shapes(features: KeyedJaggedTensor) -> List[Optional[Dict[int, Any]]]:
    """``torch.export``'s ``dynamic_shapes`` entry for a KJT argument like ``features``: any
    number of ids and any batch size (its keys stay fixed). TorchRec 1.8 has no such helper."""
    # a KJT flattens (its pytree node) to the tensors of `_fields`, private, in that order
    return [
        {0: Dim.AUTO} if name in DYNAMIC_FIELDS and isinstance(getattr(features, name), Tensor) else None
        for name in KeyedJaggedTensor._fields
    ]


def _is_collection(module: nn.Module) -> bool:
    return isinstance(module, COLLECTIONS)


def _plan(module: nn.Module, path: str, precision: str, out: Dict[int, nn.Module]) -> None:
    """The inference form of every collection under ``module``, by the id of the original."""
    for name, child in module.named_children():
        where = f"{path}.{name}" if path else name
        if id(child) in out:
            continue
        if _is_collection(child):
            try:
                out[id(child)] = InferenceEmbeddingBagCollection.from_float(child, precision)
            except ExportError as e:
                raise ExportError(f"{where}: {e}") from None
        elif isinstance(child, (EmbeddingBagCollectionInterface, ShardedModule)):
            raise ExportError(
                f"{where}: {type(child).__name__} is not converted (inference_model takes the unsharded "
                f"model: load its state dict into one built without DistributedModelParallel)"
            )
        else:
            _plan(child, where, precision, out)


def inference_model(model: nn.Module, precision: str = "int8") -> nn.Module:
    """A copy of ``model`` for inference: every embedding bag collection (ours, and stock EBCs,
    at any depth) swapped for its ``InferenceEmbeddingBagCollection`` in ``precision``, every
    parameter frozen (``requires_grad`` off, in-backward optimizers dropped), in eval mode.

    The model's code around its collections is unchanged: they take and return what the trained
    ones did. The result works eagerly and with ``torch.jit.script`` and ``torch.export`` where
    the model's own code allows them. ``model`` itself is not touched, nor its tables copied.

    Args:
        model: a trained, unsharded model holding our collections (or one collection).
        precision: ``fp32``, ``fp16`` or ``int8`` (row-wise, fp16 scale and bias per row, as
            TorchRec's INT8 tables); MEmCom scalars are fp16 below fp32, dense layers stay fp32.

    Example::

        served = inference_model(trained_model, "int8")
        scripted = torch.jit.script(served)
        scores = served(dense, kjt)
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {list(PRECISIONS)}")
    if _is_collection(model):
        return InferenceEmbeddingBagCollection.from_float(model, precision).eval()
    swaps: Dict[int, nn.Module] = {}
    _plan(model, "", precision, swaps)
    # deepcopy takes the memo's entries as the copies of the originals: the swapped collections
    # are never copied, the rest of the model is
    out = copy.deepcopy(model, memo=dict(swaps))
    for p in out.parameters():
        p.requires_grad_(False)
        for attr in OPTIMIZER_ATTRIBUTES:
            if hasattr(p, attr):
                delattr(p, attr)
    return out.eval()
