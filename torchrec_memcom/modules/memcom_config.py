"""`MEmComConfig`: how one table is compressed by MEmCom, and the arithmetic of its size."""

import enum
from dataclasses import dataclass
from typing import Optional

from torchrec_memcom.modules.config_checks import check_config


class HashKind(str, enum.Enum):
    """How ids map to shared rows: ``i mod m``, or a seeded bijection of ``[0, n)`` first.

    Example::

        MEmComConfig(ratio=8, hash=HashKind.MIX.value)  # configs keep the plain string
    """

    MOD = "mod"
    MIX = "mix"


# The scalars' lr as a multiple of the table's unless set: best or within 0.001 val AUC of the best
# in the sweep over MovieLens-1M and 1M synthetic rows at dims 32 and 128 (docs/memcom.md).
DEFAULT_SCALAR_LR_SCALE = 10.0


@dataclass(frozen=True)
class ScalarRule:
    """How the per-entity scalars of a table are updated: SGD, or Adagrad (for one scalar per
    row, row-wise and exact Adagrad are the same update).

    Args:
        adagrad: Adagrad (else SGD).
        lr: the scalars' learning rate.
        eps: Adagrad's ``eps``.

    Example::

        MEmComConfig(ratio=8).scalar_rule(adagrad=True, table_lr=0.01, table_eps=1e-8)
        # ScalarRule(adagrad=True, lr=0.1, eps=1e-08)
    """

    adagrad: bool
    lr: float
    eps: float


@dataclass
class MEmComConfig:
    """Compression spec of a MEmCom table (Pansare et al., MLSys 2022).

    Entity ``i`` of a table with ``n`` ids and dim ``d`` is ``U[h(i)] * w[i]`` with a shared
    ``m x d`` table ``U`` and one scalar per entity.

    Args:
        ratio: the compression ratio ``n*d / (m*d + n)`` asked for (``m`` is solved for it,
            within 1%); give it or ``num_hash_rows``.
        num_hash_rows: ``m`` itself.
        hash: "mod" (the paper's ``i mod m``) or "mix" (a seeded bijection of ``[0, n)`` before the
            mod, for ids with structure such as multiples of ``m``).
        init_weight: initial value of every per-entity scalar.
        min_rows: tables with fewer than this many rows stay uncompressed.
        scalar_lr / scalar_lr_scale: learning rate of the scalars, absolute or as a multiple of
            the table's (at most one; default: 10x the table's, ``DEFAULT_SCALAR_LR_SCALE``, from
            a sweep on validation data; ``scalar_lr_scale=1`` trains them at the table's lr). The
            scalars follow the table's optimizer (SGD or Adagrad) with this lr.
        scalar_eps: Adagrad ``eps`` of the scalars (default: the table's).

    Example::

        MEmComConfig(ratio=16)                        # scalars at 10x the table's lr
        MEmComConfig(ratio=16, scalar_lr_scale=1.0)   # scalars at the table's lr
    """

    ratio: Optional[float] = None
    num_hash_rows: Optional[int] = None
    hash: str = HashKind.MOD.value
    init_weight: float = 1.0
    min_rows: int = 0
    scalar_lr: Optional[float] = None
    scalar_lr_scale: Optional[float] = None
    scalar_eps: Optional[float] = None

    def __post_init__(self) -> None:
        check_config(
            self, ("ratio", "num_hash_rows"), {"ratio": 1, "num_hash_rows": 1, "min_rows": 0}, {"hash": HashKind}
        )
        if self.scalar_lr is not None and self.scalar_lr_scale is not None:
            raise ValueError("MEmComConfig takes at most one of `scalar_lr` or `scalar_lr_scale`")
        for key in ("scalar_lr", "scalar_lr_scale", "scalar_eps"):
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"MEmComConfig.{key} must be > 0, got {value}")

    def scalar_rule(self, adagrad: bool, table_lr: float, table_eps: float) -> ScalarRule:
        """The scalars' update given the table's optimizer kind, lr and eps."""
        lr = (
            self.scalar_lr
            if self.scalar_lr is not None
            else table_lr * (self.scalar_lr_scale or DEFAULT_SCALAR_LR_SCALE)
        )
        eps = self.scalar_eps if self.scalar_eps is not None else table_eps
        return ScalarRule(adagrad, lr, eps)

    def compresses(self, num_embeddings: int) -> bool:
        """Whether a table of this many rows is compressed (``min_rows`` leaves small ones)."""
        return num_embeddings >= self.min_rows

    def hash_rows(self, num_embeddings: int, embedding_dim: int, table: str) -> int:
        """``m`` for a table of ``n`` rows and dim ``d``: within 1% of ``ratio``, or an error."""
        n, d = num_embeddings, embedding_dim
        if self.num_hash_rows is not None:
            if self.num_hash_rows > n:
                raise ValueError(f"table {table!r}: num_hash_rows={self.num_hash_rows} exceeds its {n} rows")
            return self.num_hash_rows
        assert self.ratio is not None
        if self.ratio >= d:
            raise ValueError(
                f"table {table!r}: MEmCom ratio {self.ratio} cannot be reached with dim {d}: "
                f"n*d / (m*d + n) stays below d={d} (the per-entity scalars alone cost n)"
            )
        m = max(1, round(n * (1.0 / self.ratio - 1.0 / d)))
        achieved = compression_ratio(n, d, m)
        if abs(achieved - self.ratio) > 0.01 * self.ratio:
            raise ValueError(
                f"table {table!r}: ratio {self.ratio} cannot be reached within 1% with n={n}, "
                f"d={d} (closest: m={m} gives {achieved:.4g})"
            )
        return m


def compression_ratio(num_embeddings: int, embedding_dim: int, hash_rows: int) -> float:
    """Achieved MEmCom ratio ``n*d / (m*d + n)``."""
    return num_embeddings * embedding_dim / (hash_rows * embedding_dim + num_embeddings)
