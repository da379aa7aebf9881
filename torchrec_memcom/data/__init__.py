"""Data path on pyarrow: convert Criteo TSV (or MovieLens) to Parquet shards, synthesize, count ids, load batches.

Exports are resolved lazily, so importing `torchrec_memcom.data` (and the `memcom data` CLI)
imports nothing heavy until a name is used; the loader imports torch and torchrec only when it
builds batches.
"""

from typing import TYPE_CHECKING

from torchrec_memcom.lazy import lazy_getattr

if TYPE_CHECKING:
    from .converter import CriteoFormatError, convert
    from .loader import CriteoParquetLoader
    from .manifest import features_of, load_frequencies, load_manifest
    from .movielens import MovieLensFormatError, convert_movielens
    from .schema import CAT_NAMES, INT_NAMES, LABEL_NAME, Features, kaggle_split
    from .sources import CriteoReadError
    from .synth import roc_auc, synthesize, write_synthetic_tsv

_EXPORTS = {
    "convert": "converter",
    "CriteoFormatError": "converter",
    "CriteoReadError": "sources",
    "CriteoParquetLoader": "loader",
    "load_manifest": "manifest",
    "load_frequencies": "manifest",
    "features_of": "manifest",
    "convert_movielens": "movielens",
    "MovieLensFormatError": "movielens",
    "Features": "schema",
    "synthesize": "synth",
    "write_synthetic_tsv": "synth",
    "roc_auc": "synth",
    "kaggle_split": "schema",
    "LABEL_NAME": "schema",
    "INT_NAMES": "schema",
    "CAT_NAMES": "schema",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
