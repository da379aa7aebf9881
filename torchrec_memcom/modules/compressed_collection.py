"""`CompressedCollection`: the EBC interface every compressed collection of ours shares."""

from typing import Dict, List

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollectionInterface

from torchrec_memcom.modules.collection_checks import cost_report


class CompressedCollection(EmbeddingBagCollectionInterface):
    """Unweighted input, the user's own configs, a device; subclasses set ``_embedding_bag_configs``
    and ``_device``. ``cost()`` reports ``tables`` whose entries have ``name, num_embeddings,
    embedding_dim, hash_rows, num_parameters, ratio`` (MEmCom, hashing); others override it."""

    _embedding_bag_configs: List[EmbeddingBagConfig]
    _device: torch.device

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
                for t in self.tables  # type: ignore[attr-defined]
            }
        )
