"""Criteo-shaped synthetic data drawn from a hidden click model, so the best achievable AUC is known.

Rows are i.i.d.: 26 categorical features with Criteo Kaggle's cardinalities capped at
`max_cardinality`, Zipf-like id popularity (exponent ~1.1, popular ids scattered over the id
space as hashing would) and Criteo's missing rates (a missing value is id 0, as the converter
maps it); 13 counts with Criteo-like log-normal spread and missing rates. The click probability is
sigmoid(bias + per-id effects + latent-factor interactions of feature pairs + linear dense
effects), the bias set so the mean CTR is `base_ctr`. Labels are Bernoulli draws, so ranking by
the true probability is the best possible model and its AUC (`best_auc` in the manifest) is the
ceiling a trained model can approach.

Everything derives from `seed` through numpy's PCG64: rows come in fixed chunks of CHUNK_ROWS,
each from its own generator, so output is bit-for-bit reproducible and independent of shard size.
"""

import itertools
import json
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from . import manifest as mf
from .parse import dense_transform
from .schema import CAT_NAMES, INT_NAMES, KAGGLE_CARDINALITIES, PARQUET_SCHEMA, kaggle_split
from .shards import ShardFile
from .sources import PathLike

CHUNK_ROWS = 65_536

# Measured on the real Kaggle sample (../shared/data/criteo_kaggle_sample_8k.tsv): share of
# missing values, and mean / std of log(x + 1) of the present integer features.
CAT_MISSING = [
    0,
    0,
    0.033,
    0.033,
    0,
    0.131,
    0,
    0,
    0,
    0,
    0,
    0.033,
    0,
    0,
    0,
    0.033,
    0,
    0,
    0.453,
    0.453,
    0.033,
    0.817,
    0,
    0.033,
    0.453,
    0.453,
]
INT_MISSING = [0.452, 0, 0.203, 0.203, 0.049, 0.252, 0.05, 0.001, 0.05, 0.452, 0.05, 0.777, 0.203]
INT_LOG_MEAN = [0.79, 2.11, 2.24, 1.73, 7.28, 3.6, 1.53, 2.05, 3.62, 0.37, 0.85, 0.29, 1.89]
INT_LOG_STD = [0.97, 2.13, 1.28, 0.96, 2.87, 1.8, 1.35, 1.18, 1.69, 0.39, 0.74, 0.6, 1.06]
INT_1_NEGATIVE = 0.1  # int_1 is -1 in about 10% of rows

# Logit variance budget: per-id effects, pair interactions, dense effects.
_MAIN_VARIANCE, _PAIR_VARIANCE, _DENSE_VARIANCE = 1.6, 0.8, 0.5
_NUM_PAIRS, _LATENT_DIM = 12, 8


class ClickModel:
    """The hidden generator: feature distributions and the true click probability, so that the
    best achievable AUC of the data it draws is known.

    Args:
        seed: everything derives from it (rows are bit-for-bit reproducible).
        max_cardinality: the cap on each feature's Kaggle cardinality (at least 2).
        zipf_exponent: the exponent of the ids' Zipf-like popularity.
        base_ctr: the mean click probability, in (0, 1).

    Example::

        model = ClickModel(seed=0, max_cardinality=1000)
        rows = model.chunk(0, 1024)  # raw features, labels and the true probability of 1024 rows
        roc_auc(rows["probability"], rows["label"])  # the best AUC a model can approach
    """

    def __init__(
        self, seed: int, max_cardinality: int = 100_000, zipf_exponent: float = 1.1, base_ctr: float = 0.25
    ) -> None:
        if max_cardinality < 2:
            raise ValueError("max_cardinality must be at least 2")
        if not 0 < base_ctr < 1:
            raise ValueError("base_ctr must be in (0, 1)")
        self.seed, self.max_cardinality = seed, max_cardinality
        self.zipf_exponent, self.base_ctr = zipf_exponent, base_ctr
        rng = np.random.default_rng([seed, 0])
        self.cardinalities = [max(2, min(c, max_cardinality)) for c in KAGGLE_CARDINALITIES]
        self._cdf, self._rank_to_id, self._effects, self._hex = [], [], [], []
        share = rng.gamma(0.7, size=len(CAT_NAMES))
        share /= share.sum()
        for f, card in enumerate(self.cardinalities):
            present = card - 1 if CAT_MISSING[f] else card  # id 0 is "missing" where Criteo has some
            weights = np.arange(1, present + 1, dtype=np.float64) ** -zipf_exponent
            self._cdf.append(np.cumsum(weights) / weights.sum())
            self._rank_to_id.append(rng.permutation(present) + (card - present))
            self._effects.append(rng.normal(0, np.sqrt(_MAIN_VARIANCE * share[f]), size=card))
            self._hex.append(_distinct_uint32(rng, card))
        all_pairs = list(itertools.combinations(range(len(CAT_NAMES)), 2))
        self.pairs = [all_pairs[i] for i in sorted(rng.choice(len(all_pairs), _NUM_PAIRS, replace=False))]
        self._latent = {
            f: rng.normal(0, 1, size=(self.cardinalities[f], _LATENT_DIM)).astype(np.float32)
            for f in sorted({f for pair in self.pairs for f in pair})
        }
        self._pair_scale = np.sqrt(_PAIR_VARIANCE / len(self.pairs) / _LATENT_DIM)
        self._dense_weights = rng.normal(0, 1, size=len(INT_NAMES))
        self._dense_weights *= np.sqrt(_DENSE_VARIANCE / np.sum(self._dense_weights**2))
        self.bias = 0.0
        self.bias = self._calibrate_bias()

    def params(self) -> Dict[str, Any]:
        return {
            "seed": self.seed,
            "max_cardinality": self.max_cardinality,
            "zipf_exponent": self.zipf_exponent,
            "base_ctr": self.base_ctr,
            "cardinalities": self.cardinalities,
            "interaction_pairs": self.pairs,
            "latent_dim": _LATENT_DIM,
            "bias": self.bias,
            "chunk_rows": CHUNK_ROWS,
            "logit_variance": {"per_id": _MAIN_VARIANCE, "pairs": _PAIR_VARIANCE, "dense": _DENSE_VARIANCE},
        }

    def _logit_without_bias(self, cats: np.ndarray, dense: np.ndarray) -> np.ndarray:
        logit = np.zeros(cats.shape[1])
        for f, ids in enumerate(cats):
            logit += self._effects[f][ids]
        for f, g in self.pairs:
            logit += self._pair_scale * np.einsum("ij,ij->i", self._latent[f][cats[f]], self._latent[g][cats[g]])
        standardized = (dense - np.array(INT_LOG_MEAN)[:, None]) / np.array(INT_LOG_STD)[:, None]
        return logit + self._dense_weights @ standardized

    def _calibrate_bias(self) -> float:
        """Bias giving mean click probability base_ctr on a fixed calibration sample."""
        cats, ints, _ = self._features(np.random.default_rng([self.seed, 1]), 4 * CHUNK_ROWS)
        z = self._logit_without_bias(cats, dense_transform(ints))
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if np.mean(_sigmoid(z + mid)) < self.base_ctr else (lo, mid)
        return (lo + hi) / 2

    def _features(self, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw ids [26, n], raw counts [13, n] (0 where missing) and the missing mask [13, n]."""
        cats = np.empty((len(CAT_NAMES), n), dtype=np.int64)
        for f in range(len(CAT_NAMES)):
            u = rng.random(n)
            missing = u < CAT_MISSING[f]
            ranks = np.searchsorted(self._cdf[f], (u - CAT_MISSING[f]) / (1 - CAT_MISSING[f]))
            ranks = np.minimum(ranks, len(self._cdf[f]) - 1)
            cats[f] = np.where(missing, 0, self._rank_to_id[f][ranks])
        ints = np.empty((len(INT_NAMES), n), dtype=np.int64)
        missing = np.empty((len(INT_NAMES), n), dtype=bool)
        for j in range(len(INT_NAMES)):
            z = rng.normal(INT_LOG_MEAN[j], INT_LOG_STD[j], size=n)
            ints[j] = np.rint(np.expm1(np.clip(z, 0, 30)))
            missing[j] = rng.random(n) < INT_MISSING[j]
        ints[1][rng.random(n) < INT_1_NEGATIVE] = -1
        ints[missing] = 0
        return cats, ints, missing

    def chunk(self, index: int, n: int) -> Dict[str, np.ndarray]:
        """Rows of generation chunk `index` (n <= CHUNK_ROWS): raw features, labels, true probability."""
        rng = np.random.default_rng([self.seed, 2, index])
        cats, ints, missing_int = self._features(rng, n)
        dense = dense_transform(ints)
        probability = _sigmoid(self.bias + self._logit_without_bias(cats, dense))
        label = (rng.random(n) < probability).astype(np.int8)
        return {
            "cats": cats,
            "ints": ints,
            "missing_int": missing_int,
            "dense": dense,
            "label": label,
            "probability": probability,
        }

    def rows(self, total: int) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
        """(first row, chunk) over rows [0, total)."""
        for index, start in enumerate(range(0, total, CHUNK_ROWS)):
            yield start, self.chunk(index, min(CHUNK_ROWS, total - start))

    def hex_strings(self, feature: int, ids: np.ndarray) -> pa.Array:
        """Criteo-style 8-hex-digit raw values of ids (id 0 empty where it means missing)."""
        values = self._hex[feature][ids]
        nibbles = (values[:, None] >> np.arange(28, -4, -4, dtype=np.uint32)) & 15
        chars = np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles]
        arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), len(ids), [None, pa.py_buffer(chars.tobytes())])
        strings = arr.cast(pa.binary()).cast(pa.string())
        if CAT_MISSING[feature]:
            strings = pc.if_else(pa.array(ids == 0), pa.scalar(None, pa.string()), strings)
        return strings


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _distinct_uint32(rng: np.random.Generator, n: int) -> np.ndarray:
    """n distinct random nonzero uint32 values (the raw hex ids)."""
    values = np.zeros(0, np.uint32)
    while len(values) < n:
        draw = rng.integers(1, 2**32, size=2 * n + 16, dtype=np.uint32)
        _, first = np.unique(np.concatenate([values, draw]), return_index=True)
        values = np.concatenate([values, draw])[np.sort(first)]
    return values[:n]


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order].astype(bool)
    distinct = np.r_[True, s[1:] != s[:-1]]
    first = np.flatnonzero(distinct)
    size = np.diff(np.r_[first, len(s)])
    ranks = (first + (size + 1) / 2)[np.cumsum(distinct) - 1]
    positives = int(y.sum())
    negatives = len(y) - positives
    if not positives or not negatives:
        return float("nan")
    return float((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def _log_loss(probability: np.ndarray, labels: np.ndarray) -> float:
    return float(-np.mean(np.where(labels == 1, np.log(probability), np.log1p(-probability))))


def _split_of_rows(rows: int) -> Dict[str, Tuple[int, int]]:
    return {s: r for s, r in kaggle_split(rows).items() if r[1] > r[0]}


def synthesize(
    rows: int,
    out_dir: PathLike,
    seed: int = 0,
    *,
    max_cardinality: int = 100_000,
    zipf_exponent: float = 1.1,
    base_ctr: float = 0.25,
    rows_per_shard: int = 1_000_000,
    progress: bool = True,
    overwrite: bool = False,
) -> Dict[str, Any]:
    """Write `rows` synthetic rows as a data folder (same format as `convert`); returns the manifest.

    Rows are split like Kaggle (first 6/7 train, last 1/7 halved into val and test); the manifest
    records the generator parameters and, per split, `best_auc` / `best_logloss` of the true
    click probabilities. num_embeddings of each feature is its (capped) cardinality.
    """
    from tqdm import tqdm

    if rows < 1:
        raise ValueError("rows must be positive")
    out = Path(out_dir)
    model = ClickModel(seed, max_cardinality, zipf_exponent, base_ctr)
    config = json.loads(json.dumps({"version": 1, "rows": rows, "rows_per_shard": rows_per_shard, **model.params()}))
    if (out / mf.MANIFEST).is_file() and not overwrite:
        existing = mf.load_manifest(out)
        if existing.get("config") == config:
            return existing
        raise ValueError(f"{out} already holds data from other inputs or options; use --overwrite")
    if (out / mf.STATE).is_file() and not overwrite:
        raise ValueError(
            f"{out} holds an unfinished conversion ({mf.STATE}): finish it by re-running the "
            "same `memcom data convert`, write elsewhere, or use --overwrite to discard it"
        )
    mf.clear(out)
    splits = _split_of_rows(rows)
    shards: Dict[str, list] = {s: [] for s in splits}
    probability = {s: np.empty(b - a) for s, (a, b) in splits.items()}
    labels = {s: np.empty(b - a, np.int8) for s, (a, b) in splits.items()}
    current: Optional[ShardFile] = None
    bar = tqdm(total=rows, desc="synth", unit=" rows", unit_scale=True, disable=not progress)
    for start, chunk in model.rows(rows):
        table = pa.Table.from_arrays(
            [pa.array(chunk["label"])] + [pa.array(d) for d in chunk["dense"]] + [pa.array(c) for c in chunk["cats"]],
            schema=PARQUET_SCHEMA,
        )
        for split, (a, b) in splits.items():
            lo, hi = max(a, start), min(b, start + table.num_rows)
            while lo < hi:
                offset = lo - a
                index, within = divmod(offset, rows_per_shard)
                if current is None:
                    current = ShardFile(out, split, index)
                stop = min(hi, lo + rows_per_shard - within)
                current.write(table.slice(lo - start, stop - lo))
                probability[split][offset : offset + stop - lo] = chunk["probability"][lo - start : stop - start]
                labels[split][offset : offset + stop - lo] = chunk["label"][lo - start : stop - start]
                if stop - a == min(b - a, (index + 1) * rows_per_shard):
                    shards[split].append({"path": current.close(), "rows": current.rows})
                    current = None
                lo = stop
        bar.update(table.num_rows)
    bar.close()
    return mf.finish(
        out,
        shards,
        dict(zip(CAT_NAMES, model.cardinalities)),
        {
            "kind": "synth",
            "config": config,
            "mode": "synthetic",
            "generator": model.params(),
            "rows_read": rows,
            "rows_written": rows,
            "rows_skipped": 0,
            "best_auc": {s: roc_auc(probability[s], labels[s]) for s in splits},
            "best_logloss": {s: _log_loss(probability[s], labels[s]) for s in splits},
            "missing_categorical": "id 0 (for the features Criteo has missing values in)",
        },
    )


def write_synthetic_tsv(
    path: PathLike,
    rows: int,
    seed: int = 0,
    *,
    max_cardinality: int = 100_000,
    zipf_exponent: float = 1.1,
    base_ctr: float = 0.25,
    progress: bool = True,
) -> None:
    """The same rows `synthesize` draws, as raw Criteo TSV (gzip if `path` ends in .gz).

    Categorical ids become 8-hex-digit raw values, integers raw counts; missing values are empty
    fields. Converting it gives the same labels and dense values and the same ids up to renaming.
    """
    from tqdm import tqdm

    model = ClickModel(seed, max_cardinality, zipf_exponent, base_ctr)
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    bar = tqdm(total=rows, desc="synth tsv", unit=" rows", unit_scale=True, disable=not progress)
    with pa.output_stream(str(path), compression="detect") as stream:
        for _, chunk in model.rows(rows):
            columns = [pa.array(chunk["label"])]
            columns += [pa.array(v, mask=m) for v, m in zip(chunk["ints"], chunk["missing_int"])]
            columns += [model.hex_strings(f, ids) for f, ids in enumerate(chunk["cats"])]
            pacsv.write_csv(
                pa.Table.from_arrays(columns, names=[f"c{i}" for i in range(len(columns))]), stream, options
            )
            bar.update(len(chunk["label"]))
    bar.close()
