"""Training configs: YAML files mapped onto small dataclasses, strictly (errors name the key)."""

import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import yaml

from torchrec_memcom.compression import CompressionSpec
from torchrec_memcom.data.manifest import MANIFEST, features_of, load_manifest
from torchrec_memcom.data.schema import CAT_NAMES


@dataclasses.dataclass
class SynthConfig:
    """Generate Criteo-shaped data into ``data.path`` if it is not there yet (``memcom data synth``'s
    settings), so that a config alone runs anywhere.

    Args:
        rows: the rows to generate (all splits).
        seed: the click model's seed.
        max_cardinality: the cap on each feature's distinct ids.
    """

    rows: int = 200_000
    seed: int = 0
    max_cardinality: int = 100_000


@dataclasses.dataclass
class DataConfig:
    """A folder made by ``memcom data convert`` or ``memcom data synth`` (``format: parquet``), or
    TorchRec's preprocessed Criteo npy files (``format: torchrec_npy``; needs
    ``embeddings.num_embeddings``, ids hashed modulo it).

    Args:
        path: the data folder.
        format: "parquet" or "torchrec_npy".
        synthetic: generate the data first if ``path`` has none (``parquet`` only).
        train_split: the split trained on.
        eval_split: the split evaluated on.
    """

    path: str = "runs/data/synthetic"
    format: str = "parquet"
    synthetic: Optional[SynthConfig] = None
    train_split: str = "train"
    eval_split: str = "val"

    def __post_init__(self) -> None:
        if self.format not in ("parquet", "torchrec_npy"):
            raise ValueError(f"data.format: expected parquet or torchrec_npy, got {self.format!r}")
        if self.format == "torchrec_npy" and self.synthetic is not None:
            raise ValueError("data.synthetic generates Parquet data: it does not go with data.format torchrec_npy")


@dataclasses.dataclass
class ModelConfig:
    """The DLRM over the tables: TorchRec's ``DLRM`` or ``DLRM_DCN``.

    Args:
        arch: "DLRM" or "DLRM_DCN".
        dense_arch_layer_sizes: the dense arch (``embeddings.dim`` is appended as its last layer).
        over_arch_layer_sizes: the over arch; its last layer has size 1.
        dcn_num_layers: the cross net's layers (``DLRM_DCN``).
        dcn_low_rank_dim: the cross net's low rank (``DLRM_DCN``).
    """

    arch: str = "DLRM"  # or DLRM_DCN
    dense_arch_layer_sizes: List[int] = dataclasses.field(default_factory=lambda: [64, 16])
    over_arch_layer_sizes: List[int] = dataclasses.field(default_factory=lambda: [64, 32, 1])
    dcn_num_layers: int = 3
    dcn_low_rank_dim: int = 16

    def __post_init__(self) -> None:
        if self.arch not in ("DLRM", "DLRM_DCN"):
            raise ValueError(f"model.arch: expected DLRM or DLRM_DCN, got {self.arch!r}")
        if self.over_arch_layer_sizes[-1:] != [1]:
            raise ValueError("model.over_arch_layer_sizes: the last layer must have size 1")
        for key in ("dense_arch_layer_sizes", "over_arch_layer_sizes", "dcn_num_layers", "dcn_low_rank_dim"):
            value = getattr(self, key)
            if any(n < 1 for n in (value if isinstance(value, list) else [value])):
                raise ValueError(f"model.{key}: sizes must be >= 1, got {value}")


@dataclasses.dataclass
class EmbeddingsConfig:
    """``num_embeddings``: one size per categorical feature of the data (in its order), or
    ``from_data`` (the data's id spaces); ``compression`` is checked when built
    (``CompressionSpec``), so that a typo in its params stops the launcher, not every rank of
    the job.

    Args:
        dim: every table's embedding dim (a multiple of 4).
        num_embeddings: one size per categorical feature, or "from_data".
        compression: which method compresses which tables (``CompressionSpec``).
    """

    dim: int = 16
    num_embeddings: Union[str, List[int]] = "from_data"
    compression: CompressionSpec = dataclasses.field(default_factory=CompressionSpec)

    def __post_init__(self) -> None:
        if isinstance(self.num_embeddings, str) and self.num_embeddings != "from_data":
            raise ValueError(f"embeddings.num_embeddings: expected 'from_data' or a list, got {self.num_embeddings!r}")
        if isinstance(self.num_embeddings, list) and min(self.num_embeddings, default=1) < 1:
            raise ValueError(f"embeddings.num_embeddings: sizes must be >= 1, got {self.num_embeddings}")
        if self.dim < 1 or self.dim % 4:
            raise ValueError(f"embeddings.dim: must be a positive multiple of 4, got {self.dim}")


def _check_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):  # `lr: inf` would train to NaN
        raise ValueError(f"{key}: must be a finite number > 0, got {value}")


@dataclasses.dataclass
class SparseOptimizerConfig:
    """The tables' optimizer, fused into FBGEMM's backward: sgd, adagrad or rowwise_adagrad.

    Args:
        type: "sgd", "adagrad" or "rowwise_adagrad".
        lr: the learning rate.
        eps: Adagrad's eps (unused by sgd).
    """

    type: str = "rowwise_adagrad"
    lr: float = 0.05
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.type not in ("sgd", "adagrad", "rowwise_adagrad"):
            raise ValueError(f"optimizer.sparse.type: expected sgd, adagrad or rowwise_adagrad, got {self.type!r}")
        for key in ("lr", "eps"):
            _check_positive(f"optimizer.sparse.{key}", getattr(self, key))


@dataclasses.dataclass
class DenseOptimizerConfig:
    """The optimizer of what the tables' fused optimizer does not train: the dense layers.

    Args:
        type: "sgd", "adagrad" or "adam".
        lr: the learning rate.
    """

    type: str = "adagrad"  # or sgd, adam
    lr: float = 0.05

    def __post_init__(self) -> None:
        if self.type not in ("sgd", "adagrad", "adam"):
            raise ValueError(f"optimizer.dense.type: expected sgd, adagrad or adam, got {self.type!r}")
        _check_positive("optimizer.dense.lr", self.lr)


@dataclasses.dataclass
class OptimizerConfig:
    """The two optimizers of a run: the tables' (fused) and the dense layers'.

    Args:
        sparse: the tables' optimizer.
        dense: the dense layers' optimizer.
    """

    sparse: SparseOptimizerConfig = dataclasses.field(default_factory=SparseOptimizerConfig)
    dense: DenseOptimizerConfig = dataclasses.field(default_factory=DenseOptimizerConfig)


@dataclasses.dataclass
class TrainConfig:
    """How long to train, and when to evaluate and checkpoint.

    Args:
        batch_size: rows per batch on each rank.
        epochs: passes over the train split.
        steps: if set, the steps to train, overriding ``epochs``.
        eval_every: steps between evaluations (0: at the end only).
        eval_batches: the cap of batches per evaluation (None: the whole split).
        seed: the seed of the model's initialisation and of the data's shuffle.
        run_dir: where ``results.json`` goes.
        checkpoint_dir: where checkpoints go and a run resumes from (None: none are written).
        checkpoint_every: steps between checkpoints (0: at the end only); needs ``checkpoint_dir``.

    Example::

        config = load_config("configs/synthetic_memcom.yaml")  # a RunConfig
        config.train.batch_size  # 512
        dataclasses.replace(config.train, steps=100)
    """

    batch_size: int = 512
    epochs: int = 1
    steps: Optional[int] = None
    eval_every: int = 0
    eval_batches: Optional[int] = None
    seed: int = 0
    run_dir: str = "runs/train"
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        for key in ("batch_size", "epochs"):
            if getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("steps", "eval_batches"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every"):
            if getattr(self, key) < 0:
                raise ValueError(f"train.{key}: must be >= 0, got {getattr(self, key)}")
        if self.checkpoint_every and not self.checkpoint_dir:
            raise ValueError("train.checkpoint_every: set train.checkpoint_dir, where the checkpoints go")


@dataclasses.dataclass
class RunConfig:
    """A run config: the YAML file's top-level keys (``load_config`` reads one).

    Args:
        data: the data.
        model: the DLRM.
        embeddings: the tables and their compression.
        optimizer: the sparse and dense optimizers.
        train: the training loop.
    """

    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    embeddings: EmbeddingsConfig = dataclasses.field(default_factory=EmbeddingsConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        # The data's features when it is there already; else Criteo's (what synth and convert make).
        manifest = Path(self.data.path) / MANIFEST
        if manifest.is_file():
            check_features(self, features_of(load_manifest(self.data.path)).sparse, f"{self.data.path}'s")
        else:
            check_features(self, CAT_NAMES, "Criteo's")


def check_features(config: RunConfig, features: List[str], whose: str) -> None:
    """Per-feature settings fit the data's categorical ``features`` (tables are ``t_<feature>``)."""
    sizes = config.embeddings.num_embeddings
    if isinstance(sizes, list) and len(sizes) != len(features):
        raise ValueError(
            f"embeddings.num_embeddings: expected {len(features)} sizes (one per feature of "
            f"{whose} {features[0]} .. {features[-1]}), got {len(sizes)}"
        )
    tables = [f"t_{f}" for f in features]
    unknown = sorted(set(config.embeddings.compression.tables) - set(tables))
    if unknown:
        raise ValueError(
            f"embeddings.compression.tables.{unknown[0]}: no such table ({whose} {tables[0]} .. {tables[-1]})"
        )


def _build(tp: Any, value: Any, key: str) -> Any:
    """``value`` as type ``tp``, recursing into dataclasses, lists, dicts and unions."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _build(option, value, key)
            except (TypeError, ValueError) as e:
                errors.append(str(e))
        raise ValueError(errors[-1] if len(errors) == 1 else f"{key}: {value!r} fits none of {args}")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp) if f.init}
        unknown = sorted(set(value) - names)
        if unknown:
            where = f"{key}." if key else ""
            raise ValueError(f"unknown key {where}{unknown[0]} (known: {sorted(names)})")
        kwargs = {k: _build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        try:
            return tp(**kwargs)
        except ValueError as e:
            msg = str(e)
            leaf = key.rsplit(".", 1)[-1] if key else ""
            if leaf and not msg.startswith(key) and msg.startswith(f"{leaf}."):
                # a dataclass naming its own fields (CompressionSpec: "compression.params.x")
                msg = key + msg[len(leaf) :]
            raise ValueError(msg if key in ("", None) or msg.startswith(key) else f"{key}: {msg}") from None
    if origin in (list, List):
        if not isinstance(value, list):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_build(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{key}: expected a mapping, got {value!r}")
        return {k: _build(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:  # YAML 1.1 reads "1e-8" as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, str, bool) and type(value) is tp:
        return value
    raise ValueError(f"{key}: expected {tp.__name__}, got {value!r}")


def load_config(path: Union[str, Path]) -> RunConfig:
    """Read a YAML run config; errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read config: {e}") from None
    try:
        return _build(RunConfig, raw, "")
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def as_dict(config: RunConfig) -> Dict[str, Any]:
    return dataclasses.asdict(config)
