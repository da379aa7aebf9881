"""Column names, the Parquet schema and the split rules shared by converter, synthesizer and loader.

Names equal TorchRec's (`torchrec.datasets.criteo.DEFAULT_LABEL_NAME`, `DEFAULT_INT_NAMES`,
`DEFAULT_CAT_NAMES`; a test checks it). They are repeated here so that converting data never
imports torch.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import pyarrow as pa

LABEL_NAME = "label"
INT_NAMES: List[str] = [f"int_{i}" for i in range(13)]
CAT_NAMES: List[str] = [f"cat_{i}" for i in range(26)]
COLUMN_NAMES: List[str] = [LABEL_NAME, *INT_NAMES, *CAT_NAMES]
SPLITS: Tuple[str, ...] = ("train", "val", "test")

# Distinct values per categorical feature of Criteo Kaggle train.txt (the figures TorchRec's DLRM
# example passes as --num_embeddings_per_feature); the synthesizer shapes its features like these.
KAGGLE_CARDINALITIES: List[int] = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]

# On disk: label int8 (0/1), dense float32 already log(max(x, 0) + 1), ids int64 in [0, num_embeddings).
PARQUET_SCHEMA = pa.schema(
    [pa.field(LABEL_NAME, pa.int8(), nullable=False)]
    + [pa.field(n, pa.float32(), nullable=False) for n in INT_NAMES]
    + [pa.field(n, pa.int64(), nullable=False) for n in CAT_NAMES]
)


@dataclass(frozen=True)
class Features:
    """A dataset's columns: dense (float32) and categorical (int64 ids; ``multi_hot`` ones a list
    of ids per row) feature names, in the order batches and models use them. Criteo's by default.

    Args:
        dense: the dense features' names.
        sparse: the categorical features' names (multi-hot ones included).
        multi_hot: those of ``sparse`` with a list of ids per row (a bag).

    Example::

        Features().sparse[:2]  # ["cat_0", "cat_1"]: Criteo's
        Features(dense=[], sparse=["user", "movie", "genres"], multi_hot=["genres"])
    """

    dense: List[str] = field(default_factory=lambda: list(INT_NAMES))
    sparse: List[str] = field(default_factory=lambda: list(CAT_NAMES))
    multi_hot: List[str] = field(default_factory=list)


def kaggle_split(num_rows: int) -> Dict[str, Tuple[int, int]]:
    """0-based [start, stop) row ranges of the standard Kaggle split, as in DLRM and TorchRec.

    The file is 7 days in order, cut into 7 parts (the remainder going one row each to the first
    parts); the first 6 are train, the 7th is halved into val (first, the larger half) and test.
    """
    last_day = num_rows // 7
    train = num_rows - last_day
    val = (last_day + 1) // 2
    return {"train": (0, train), "val": (train, train + val), "test": (train + val, num_rows)}
