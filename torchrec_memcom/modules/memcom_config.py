"""`MEmComConfig`: how one table is compressed by MEmCom, and the arithmetic of its size."""

from dataclasses import dataclass
from typing import Optional

HASHES = ("mod", "mix")


@dataclass
class MEmComConfig:
    """Compression spec of a MEmCom table (Pansare et al., MLSys 2022).

    Entity ``i`` of a table with ``n`` ids and dim ``d`` is ``U[h(i)] * w[i]`` with a shared
    ``m x d`` table ``U`` and one scalar per entity. Give either ``ratio`` (the compression
    ratio ``n*d / (m*d + n)`` asked for; ``m`` is solved for it) or ``num_hash_rows`` (``m``).

    hash: "mod" (the paper's ``i mod m``) or "mix" (a seeded bijection of ``[0, n)`` before the
        mod, for ids with structure such as multiples of ``m``).
    init_weight: initial value of every per-entity scalar.
    min_rows: tables with fewer than this many rows stay uncompressed.
    """

    ratio: Optional[float] = None
    num_hash_rows: Optional[int] = None
    hash: str = "mod"
    init_weight: float = 1.0
    min_rows: int = 0

    def __post_init__(self) -> None:
        if (self.ratio is None) == (self.num_hash_rows is None):
            raise ValueError("MEmComConfig needs exactly one of `ratio` or `num_hash_rows`")
        if self.ratio is not None and self.ratio < 1.0:
            raise ValueError(f"MEmComConfig.ratio must be >= 1, got {self.ratio}")
        if self.num_hash_rows is not None and self.num_hash_rows < 1:
            raise ValueError(f"MEmComConfig.num_hash_rows must be >= 1, got {self.num_hash_rows}")
        if self.hash not in HASHES:
            raise ValueError(f"MEmComConfig.hash must be one of {HASHES}, got {self.hash!r}")
        if self.min_rows < 0:
            raise ValueError(f"MEmComConfig.min_rows must be >= 0, got {self.min_rows}")

    def compresses(self, num_embeddings: int) -> bool:
        """Whether a table of this many rows is compressed (``min_rows`` leaves small ones)."""
        return num_embeddings >= self.min_rows

    def hash_rows(self, num_embeddings: int, embedding_dim: int, table: str) -> int:
        """``m`` for a table of ``n`` rows and dim ``d``: within 1% of ``ratio``, or an error."""
        n, d = num_embeddings, embedding_dim
        if self.num_hash_rows is not None:
            if self.num_hash_rows > n:
                raise ValueError(
                    f"table {table!r}: num_hash_rows={self.num_hash_rows} exceeds its {n} rows"
                )
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
