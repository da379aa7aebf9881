"""TorchRec's own managed collisions (``ManagedCollisionEmbeddingBagCollection``, MCH with LFU
eviction) as a method of ``compress()``, for the benchmarks: the in-ecosystem alternative a
TorchRec user would compare against, sized to the same bytes as the other methods at a ratio.

It is registered by the benchmarks only (``register()``), not shipped as a method: it changes
which ids share rows while training (evictions), so a model trained with it is not what our
export and budget tools handle.
"""

import dataclasses
from typing import Dict, List

import torch
from torch import nn
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.mc_embeddingbag import ManagedCollisionEmbeddingBagCollectionSharder
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    DistanceLFU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

NAME = "managed_collision"
# Per slot besides its row: MCH's sorted raw id and remapped id (int64 each) and the LFU counts
# (int64): the state MCHManagedCollisionModule keeps per slot.
SLOT_STATE_BYTES = 8 + 8 + 8


@dataclasses.dataclass
class MCConfig:
    """``ratio``: the table's fp32 bytes over those of the slots (rows plus their MCH state)."""

    ratio: float = 16.0
    eviction_interval: int = 1

    def __post_init__(self) -> None:
        if self.ratio < 1:
            raise ValueError(f"MCConfig.ratio must be >= 1, got {self.ratio}")


def slots(num_embeddings: int, dim: int, ratio: float) -> int:
    """Slots at the bytes a ratio allows: n*d*4/ratio over (d*4 + the slot's MCH state)."""
    return max(1, int(num_embeddings * dim * 4 / ratio // (dim * 4 + SLOT_STATE_BYTES)))


class ManagedCollisionBags(nn.Module):
    """An MC-EBC with the EBC interface (``forward`` -> KeyedTensor), so that DLRM and our
    mixed collections take it as they take any collection."""

    def __init__(self, tables: List[EmbeddingBagConfig], configs: Dict[str, MCConfig], device: torch.device):
        super().__init__()
        sized = [
            dataclasses.replace(t, num_embeddings=slots(t.num_embeddings, t.embedding_dim, configs[t.name].ratio))
            for t in tables
        ]
        modules = {
            t.name: MCHManagedCollisionModule(
                zch_size=s.num_embeddings,
                device=torch.device("cpu") if device.type == "meta" else device,
                eviction_policy=DistanceLFU_EvictionPolicy(),
                eviction_interval=configs[t.name].eviction_interval,
                input_hash_size=t.num_embeddings,
            )
            for t, s in zip(tables, sized)
        }
        self.mc = ManagedCollisionEmbeddingBagCollection(
            EmbeddingBagCollection(sized, device=device),
            ManagedCollisionCollection(modules, sized),
            return_remapped_features=False,
        )
        self._configs = list(tables)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.mc(features)[0]

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    @property
    def device(self) -> torch.device:
        return self.mc._embedding_module.device


def register() -> None:
    """Add the method to ``compress()``'s registry (once)."""
    from torchrec_memcom.registry import CompressionMethod, method_names, register_method

    if NAME not in method_names():
        register_method(
            CompressionMethod(
                name=NAME,
                config=MCConfig,
                collection=ManagedCollisionBags,
                build=ManagedCollisionBags,
                sharder=lambda fused: ManagedCollisionEmbeddingBagCollectionSharder(
                    EmbeddingBagCollectionSharder(fused_params=fused)
                ),
            )
        )
