"""`CompressedCollection`: the EBC interface every compressed collection of ours shares."""

import abc
import warnings
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch.fx._symbolic_trace import is_fx_tracing
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from torchrec_memcom.modules.collection_checks import cost_report

SHARDERS_FIX = "give the sharders compress() returns to the planner and to DistributedModelParallel(sharders=...)"


class ShardedByPlugin(abc.ABCMeta):
    """Metaclass of our collections: its repr names the fix in TorchRec's own error, since DMP
    looks a module's sharder up with a bare ``sharder_map[type(module)]`` (no hook to catch the
    ``KeyError`` it raises when our sharders were not passed).

    Example::

        class MyCollection(EmbeddingBagCollectionInterface, metaclass=ShardedByPlugin): ...
        repr(MyCollection)  # "<class '...MyCollection'> (no sharder for it: give the sharders ...)"
    """

    def __repr__(cls) -> str:
        return f"<class '{cls.__module__}.{cls.__qualname__}'> (no sharder for it: {SHARDERS_FIX})"


def _warn_if_replicated(module: "CompressedCollection", args: Any) -> None:
    """Forward pre-hook, once: a collection training unsharded on several ranks is replicated
    (DMP keeps modules its plan lacks, e.g. planned without our sharders): say so and the fix."""
    if is_fx_tracing() or not (module.training and torch.is_grad_enabled()):
        return
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            f"{type(module).__name__} of tables {[c.name for c in module.embedding_bag_configs()]} trains "
            f"unsharded on {dist.get_world_size()} ranks, a full copy on every rank: {SHARDERS_FIX}",
            stacklevel=4,
        )
    module._replica_check.remove()


class CompressedCollection(EmbeddingBagCollectionInterface, metaclass=ShardedByPlugin):
    """Unweighted input, the user's own configs, a device; subclasses set ``_embedding_bag_configs``
    and ``_device``. ``cost()`` reports ``tables`` whose entries have ``name, num_embeddings,
    embedding_dim, hash_rows, num_parameters, ratio`` (MEmCom, hashing); others override it.
    It takes no arguments: subclasses take the user's tables and their compression spec.

    Example::

        class MyCollection(CompressedCollection):
            def __init__(self, tables: List[EmbeddingBagConfig], device: torch.device) -> None:
                super().__init__()
                self._embedding_bag_configs, self._device = tables, device
                self.tables = [...]  # what each table became: name, num_embeddings, hash_rows, ...

            def forward(self, features: KeyedJaggedTensor) -> KeyedTensor: ...
    """

    _embedding_bag_configs: List[EmbeddingBagConfig]
    _device: torch.device

    def __init__(self) -> None:
        super().__init__()
        self._replica_check = self.register_forward_pre_hook(_warn_if_replicated)

    def is_weighted(self) -> bool:
        """Inputs carry no weights (compressed collections pool unweighted bags)."""
        return False

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        """The configs the user built the collection from (original sizes)."""
        return self._embedding_bag_configs

    @property
    def device(self) -> torch.device:
        return self._device

    def cost(self) -> Dict[str, Dict[str, float]]:
        """Per table ``n, d, m``, parameter count and achieved ratio, plus a ``total`` row."""
        return cost_report(
            {
                t.name: {
                    "n": t.num_embeddings,
                    "d": t.embedding_dim,
                    "m": t.hash_rows,
                    "parameters": t.num_parameters,
                    "uncompressed_parameters": t.num_embeddings * t.embedding_dim,
                    "ratio": t.ratio,
                }
                for t in self.tables
            }
        )
