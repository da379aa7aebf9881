"""The space of allocations that meet a budget: BET's sampler and the quick heuristic.

Every table's frequency ranks are cut into a grid of segments (finer for the popular head,
geometrically spaced); an allocation gives every segment a size, non-increasing with rank, and
consecutive segments of one size form a tier. A size profile over the ranks is scaled by one
factor for all tables, found by bisection, to the largest scale whose allocation fits the
budget. Bytes are computed for many candidates at once with numpy, the same arithmetic as
``budget_bytes.table_bytes`` (a test holds the two equal).
"""

import dataclasses
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_memcom.modules.budget_allocation import (
    SIZE_STEP,
    Allocation,
    TableAllocation,
    Tier,
    candidate_dims,
)
from torchrec_memcom.modules.budget_bytes import (
    FP32_BYTES,
    INDEX_BYTES,
    Budget,
    cheapest_table,
    raise_over_budget,
    shapes_of,
    smallest_feasible_bytes,
)
from torchrec_memcom.modules.frequency import clean_cuts, frequency_ranks

# BET's four shapes and the range of their parameter (scipy's names).
DISTRIBUTIONS = {"powerlaw": 20.0, "exponential": 5.0, "normal": 20.0, "lognormal": 1.5}
TAIL_SHARING = (4, 8, 16, 32, 64)  # ids per shared row of a MEmCom tier the sampler tries
HEURISTIC_POWER = 0.25  # heuristic size ~ (count + 1) ** power, as in mixed-dim embeddings
HEURISTIC_TAIL_SHARING = 16


def size_ladder(model_dim: int, sizes: Optional[Sequence[int]] = None) -> List[int]:
    """Tier dims for a table of dim ``model_dim``: ``sizes`` (any multiples of 4 up to the model
    dim, BET's candidate set), by default 4, 8, 16, ... doubling up to the model dim, and the
    model dim.

    Every distinct size is a tier, and every tier costs a lookup and, below the model dim, a
    projection: the default keeps about log2(d / 4) + 1 sizes rather than all d / 4 (at d = 32
    the finer set gave most tables 8 tiers and a tail); pass ``sizes`` for a finer ladder.
    """
    allowed = candidate_dims(model_dim)
    if sizes is None:
        doubling = [SIZE_STEP << k for k in range(model_dim.bit_length()) if SIZE_STEP << k < model_dim]
        return sorted(set(doubling) | {model_dim}) if model_dim >= SIZE_STEP else allowed
    bad = sorted(set(sizes) - set(allowed))
    if bad:
        raise ValueError(f"sizes {bad} are not tier dims of a dim-{model_dim} table (allowed: {allowed})")
    return sorted(set(sizes))


@dataclasses.dataclass
class Candidates:
    """Allocations as arrays: ``sizes[c, t, k]`` of segment ``k`` (0 = in the MEmCom tier), so
    that bytes and features of many candidates are computed at once.

    Args:
        sizes: ``[C, T, G]`` int64, the dim of each table's segments.
        tail_dim: ``[C, T]`` int64, the dim of each table's MEmCom tier.
        tail_sharing: ``[C, T]`` int64, ids per shared row of that tier.
        bytes: ``[C]`` int64, each candidate's bytes.
        shapes: how each was drawn (``"powerlaw:3.10,normal:0.57"``: per table a shape and its
            parameter; or ``"heuristic:0.25"``).

    Example::

        candidates = space.sample(8, np.random.default_rng(0))  # an AllocationSpace's
        len(candidates), candidates.sizes.shape  # 8, (8, T, G)
        Candidates.concat([candidates, candidates.take([0])])  # 9 candidates
    """

    sizes: np.ndarray  # int64 [C, T, G]
    tail_dim: np.ndarray  # int64 [C, T]
    tail_sharing: np.ndarray  # int64 [C, T]
    bytes: np.ndarray  # int64 [C]
    shapes: List[str]  # how each was drawn

    def __len__(self) -> int:
        return len(self.sizes)

    @staticmethod
    def concat(parts: Sequence["Candidates"]) -> "Candidates":
        return Candidates(
            np.concatenate([p.sizes for p in parts]),
            np.concatenate([p.tail_dim for p in parts]),
            np.concatenate([p.tail_sharing for p in parts]),
            np.concatenate([p.bytes for p in parts]),
            [s for p in parts for s in p.shapes],
        )

    def take(self, index: Sequence[int]) -> "Candidates":
        index = list(index)
        return Candidates(
            self.sizes[index],
            self.tail_dim[index],
            self.tail_sharing[index],
            self.bytes[index],
            [self.shapes[i] for i in index],
        )


def quantile(distribution: str, alpha: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse CDF of BET's shapes at ``u`` in (0, 1), ``alpha`` broadcast against ``u``."""
    a = np.maximum(alpha, 1e-3)
    if distribution == "powerlaw":  # density a x^(a-1) on [0, 1]
        return u ** (1.0 / a)
    if distribution == "exponential":  # truncated to [0, a]
        return -np.log1p(-u * (1.0 - np.exp(-a)))
    ndtri = lambda x: torch.special.ndtri(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()  # noqa: E731
    ndtr = lambda x: torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()  # noqa: E731
    if distribution == "normal":  # truncated to [0, a]
        return ndtri(0.5 + u * (ndtr(a) - 0.5))
    if distribution == "lognormal":
        return np.exp(a * ndtri(u))
    raise ValueError(f"unknown distribution {distribution!r}")


class AllocationSpace:
    """Allocations of ``tables`` with these id ``counts`` that fit ``budget``: what the search
    samples from and the heuristic picks in.

    Raises, naming the smallest feasible budget, if no allocation fits.

    Args:
        tables: the budgeted tables' ``EmbeddingBagConfig``s.
        counts: each table's id counts, ``(num_embeddings,)``, by table name.
        budget: the ``Budget`` the tables share.
        tail: whether the rarest ids may form a MEmCom tier.
        grid: segments per table (the cuts an allocation may use).
        sizes: the tier dims to use (multiples of 4; default ``size_ladder``'s).

    Example::

        tables = [EmbeddingBagConfig(name="t0", embedding_dim=16, num_embeddings=1000, feature_names=["f0"])]
        space = AllocationSpace(tables, {"t0": torch.randint(0, 100, (1000,))}, Budget(ratio=2))
        space.heuristic().tables["t0"].tiers  # e.g. 648 rows of dim 8, 352 of dim 4
        space.sample(8, np.random.default_rng(0)).bytes  # each <= space.limit (32000)
    """

    def __init__(
        self,
        tables: Sequence[EmbeddingBagConfig],
        counts: Mapping[str, torch.Tensor],
        budget: Budget,
        tail: bool = False,
        grid: int = 64,
        sizes: Optional[Sequence[int]] = None,
    ) -> None:
        self.tables = list(tables)
        self.names = [t.name for t in tables]
        self.budget = budget
        self.tail = tail
        shapes = shapes_of(tables)
        self.limit = budget.resolve(shapes)
        self.n = np.array([t.num_embeddings for t in tables], dtype=np.int64)
        self.d = np.array([t.embedding_dim for t in tables], dtype=np.int64)
        ladders = [size_ladder(int(d), sizes) for d in self.d]
        self.ladder = np.full((len(tables), max(map(len, ladders))), np.iinfo(np.int64).max)
        for i, ladder in enumerate(ladders):
            self.ladder[i, : len(ladder)] = ladder
        self.ladder_len = np.array([len(x) for x in ladders])
        self.min_dim = self.ladder[:, 0].copy()
        by_table = dict(zip(self.names, ladders))
        floor = smallest_feasible_bytes(shapes, budget.optimizer, tail, by_table)
        if self.limit < floor:
            tail_floor = None if tail else smallest_feasible_bytes(shapes, budget.optimizer, True, by_table)
            raise_over_budget(self.limit, floor, floor, budget.optimizer, tail, tail_floor)
        # The cheapest allocation as arrays (per table one size, or a one-row MEmCom tier): what
        # `fit` falls back to where nothing larger fits.
        self.floor_size = np.zeros(len(tables), dtype=np.int64)  # 0: a one-row MEmCom tier
        self.floor_tail_dim = np.zeros(len(tables), dtype=np.int64)
        for i, ((n, d), ladder) in enumerate(zip(shapes.values(), ladders)):
            (tier,) = cheapest_table(n, d, budget.optimizer, tail, ladder).tiers
            if tier.hash_rows is None:
                self.floor_size[i] = tier.dim
            else:
                self.floor_tail_dim[i] = tier.dim
        g = max(1, min(grid, int(self.n.max())))
        self.starts = np.zeros((len(tables), g), dtype=np.int64)
        self.lengths = np.zeros((len(tables), g), dtype=np.int64)
        self.mean_counts = np.zeros((len(tables), g))
        self.clean = np.ones((len(tables), g), dtype=bool)
        self.clean_cuts: Dict[str, torch.Tensor] = {}
        for i, t in enumerate(tables):
            c = counts[t.name].to(torch.int64)
            ranks = frequency_ranks(c)
            self.clean_cuts[t.name] = clean_cuts(ranks)
            starts = np.unique(np.floor(np.geomspace(1, t.num_embeddings + 1, g + 1)[:-1]).astype(np.int64) - 1)
            k = len(starts)
            lengths = np.diff(np.append(starts, t.num_embeddings))
            by_rank = torch.empty_like(c)
            by_rank[ranks] = c
            sums = np.add.reduceat(by_rank.numpy(), starts)
            # padding segments repeat the last one and hold no ids
            self.starts[i] = np.append(starts, [starts[-1]] * (g - k))
            self.lengths[i, :k] = lengths
            self.mean_counts[i] = np.append(sums / lengths, [sums[-1] / lengths[-1]] * (g - k))
            self.clean[i] = self.clean_cuts[t.name].numpy()[self.starts[i]]

    # ---- sizes and bytes ----------------------------------------------------------------------

    def quantize(self, raw: np.ndarray, table: Optional[int] = None) -> np.ndarray:
        """Raw sizes [C, T, G] (or [C, 1, G] of one ``table``) -> tier dims: down to the ladder
        (at least its first step), 0 for the MEmCom tier."""
        which = slice(None) if table is None else slice(table, table + 1)
        ladder, lo = self.ladder[which], self.min_dim[which, None]
        steps = (raw[..., None] >= ladder[:, None, :]).sum(-1)
        # never past a table's own ladder into the padding (raw sizes can be inf at the top of `fit`)
        index = np.clip(steps - 1, 0, (self.ladder_len[which] - 1)[None, :, None])
        sizes = np.take_along_axis(np.broadcast_to(ladder[None], raw.shape[:2] + ladder.shape[1:]), index, axis=-1)
        return np.where((raw < lo) & self.tail, 0, sizes)

    def _tail_dim(self, sizes: np.ndarray, tail_dim: np.ndarray) -> np.ndarray:
        """The tail's dim, no larger than the smallest tier above it."""
        smallest = np.where(sizes > 0, sizes, np.iinfo(np.int64).max).min(axis=-1)
        return np.minimum(tail_dim, smallest)

    def bytes(self, sizes: np.ndarray, tail_dim: np.ndarray, tail_sharing: np.ndarray) -> np.ndarray:
        """Bytes [C] of allocations ``sizes`` [C, T, G]: ``table_bytes`` summed, vectorized."""
        length, d = self.lengths, self.d[:, None]
        plain = sizes > 0
        previous = np.concatenate([np.full(sizes.shape[:-1] + (1,), -1), sizes[..., :-1]], axis=-1)
        first = (sizes != previous) & (length > 0)  # first segment of a tier (the tail included)
        tables = (length * sizes).sum(-1)
        rows = (length * plain).sum(-1)
        projections = (first * plain * sizes * d * (sizes != d)).sum(-1)
        n_tail = (length * ~plain).sum(-1)
        has_tail = n_tail > 0
        dim = self._tail_dim(sizes, tail_dim)
        shared = np.where(has_tail, -(-n_tail // tail_sharing), 0)
        tables = tables + shared * dim
        scalars = n_tail
        projections = projections + has_tail * (dim != self.d) * dim * self.d
        remap = (first & ~self.clean & (self.starts > 0)).any(-1) * self.n
        optimizer = self.budget.optimizer
        state = {
            None: 0,
            "sgd": 0,
            "rowwise_adagrad": rows + shared + n_tail,
            "adagrad": tables + n_tail,
        }[optimizer]
        per_table = FP32_BYTES * (tables + scalars + projections + state) + INDEX_BYTES * remap
        return per_table.sum(-1)

    def fit(
        self, raw: np.ndarray, tail_dim: np.ndarray, tail_sharing: np.ndarray, shapes: Optional[List[str]] = None
    ) -> Candidates:
        """Scale each candidate's raw sizes [C, T, G] as far as the budget allows.

        Bisection over one log-scale per candidate keeps the largest feasible scale found; then,
        table by table (most ids first), a second bisection grows that table's scale into what
        the coarse steps of the first left over. Where even the smallest scale does not fit,
        the candidate falls back to the cheapest allocation (which fits: checked at
        construction) and grows from there table by table.
        """
        lo = np.full(len(raw), -30.0)
        hi = np.full(len(raw), 30.0)
        best = self.quantize(raw * np.exp(lo)[:, None, None])
        tight = self.bytes(best, tail_dim, tail_sharing) > self.limit
        if tight.any():
            best, tail_dim, tail_sharing = best.copy(), tail_dim.copy(), tail_sharing.copy()
            best[tight] = self.floor_size[:, None]
            rows = np.ix_(np.flatnonzero(tight), np.flatnonzero(self.floor_size == 0))
            tail_dim[rows] = self.floor_tail_dim[rows[1][0]]
            tail_sharing[rows] = self.n[rows[1][0]]
        assert (self.bytes(best, tail_dim, tail_sharing) <= self.limit).all()
        for _ in range(48):
            mid = (lo + hi) / 2
            sizes = self.quantize(raw * np.exp(mid)[:, None, None])
            fits = self.bytes(sizes, tail_dim, tail_sharing) <= self.limit
            best = np.where(fits[:, None, None], sizes, best)
            lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid)
        scaled = raw * np.exp(lo)[:, None, None]
        for t in np.argsort(-self.n, kind="stable"):
            lo_t, hi_t = np.zeros(len(raw)), np.full(len(raw), 8.0)
            for _ in range(12):
                mid = (lo_t + hi_t) / 2
                trial = scaled.copy()
                trial[:, t] *= np.exp(mid)[:, None]
                sizes = best.copy()
                sizes[:, t] = self.quantize(trial[:, t : t + 1], t)[:, 0]
                fits = self.bytes(sizes, tail_dim, tail_sharing) <= self.limit
                best = np.where(fits[:, None, None], sizes, best)
                lo_t, hi_t = np.where(fits, mid, lo_t), np.where(fits, hi_t, mid)
            scaled[:, t] *= np.exp(lo_t)[:, None]
        shapes = shapes or [""] * len(raw)
        return Candidates(best, tail_dim, tail_sharing, self.bytes(best, tail_dim, tail_sharing), shapes)

    # ---- BET's sampler and the heuristic ------------------------------------------------------

    def sample(self, num: int, rng: np.random.Generator) -> Candidates:
        """BET's table-level actions: per table a shape (power-law, truncated exponential,
        truncated normal, log-normal) with a random parameter, its sorted draw (the quantile
        function at the ranks) as sizes, a random share of the budget per table; then fit."""
        t, g = self.starts.shape
        u = 1.0 - (self.starts + 0.5) / self.n[:, None]  # descending with rank
        raw = np.empty((num, t, g))
        shapes = []
        names = list(DISTRIBUTIONS)
        for c in range(num):
            kinds = rng.choice(names, size=t)
            alphas = rng.uniform(0, [DISTRIBUTIONS[k] for k in kinds])
            for i, (kind, alpha) in enumerate(zip(kinds, alphas)):
                raw[c, i] = quantile(kind, alpha, u[i])
            shapes.append(",".join(f"{k}:{a:.2f}" for k, a in zip(kinds, alphas)))
        raw = np.maximum(raw, 1e-12)
        raw /= ((raw * self.lengths).sum(-1) / self.n)[..., None]  # mean size 1 per table
        raw *= rng.lognormal(0.0, 0.5, size=(num, t, 1)) * self.d[:, None]
        if self.tail:
            tail_dim = self.ladder[np.arange(t), rng.integers(0, self.ladder_len, size=(num, t))]
            sharing = rng.choice(np.array(TAIL_SHARING), size=(num, t))
        else:
            tail_dim = np.ones((num, t), dtype=np.int64)
            sharing = np.ones((num, t), dtype=np.int64)
        return self.fit(raw, tail_dim, sharing, shapes)

    def heuristic_candidates(self, power: float = HEURISTIC_POWER) -> Candidates:
        """Quick allocation without search: size ~ (count + 1) ** power, scaled to the budget.

        With a tail, ids that would fall below the smallest size share rows of a MEmCom tier
        (16 ids per row) at the smallest dim of their table. Sizes must not grow with rank, so a
        segment gets at least the size of every less popular one (this only matters for the
        frequency-ranked id 0, ranked first whatever its count).
        """
        raw = np.maximum.accumulate(((self.mean_counts + 1.0) ** power)[..., ::-1], axis=-1)[..., ::-1]
        tail_dim = self.min_dim[None].copy()
        sharing = np.full((1, len(self.names)), HEURISTIC_TAIL_SHARING)
        return self.fit(raw[None], tail_dim, sharing, [f"heuristic:{power}"])

    def heuristic(self, power: float = HEURISTIC_POWER) -> Allocation:
        """``heuristic_candidates`` as an ``Allocation``."""
        return self.allocation(self.heuristic_candidates(power), 0, {"kind": "heuristic", "power": power})

    # ---- arrays <-> allocations ---------------------------------------------------------------

    def allocation(self, candidates: Candidates, index: int, meta: Optional[Mapping] = None) -> Allocation:
        """Candidate ``index`` as an ``Allocation`` (tiers = runs of equal size)."""
        sizes = candidates.sizes[index]
        tail_dims = self._tail_dim(sizes, candidates.tail_dim[index])
        tables = {}
        for i, name in enumerate(self.names):
            tiers: List[Tier] = []
            n_tail = 0
            for size, rows in zip(sizes[i], self.lengths[i]):
                if rows == 0:
                    continue
                if size == 0:
                    n_tail += int(rows)
                elif tiers and tiers[-1].dim == size:
                    tiers[-1] = Tier(tiers[-1].rows + int(rows), int(size))
                else:
                    tiers.append(Tier(int(rows), int(size)))
            if n_tail:
                sharing = int(candidates.tail_sharing[index, i])
                tiers.append(Tier(n_tail, int(tail_dims[i]), -(-n_tail // sharing)))
            tables[name] = TableAllocation(tuple(tiers))
        info = {
            "budget": dataclasses.asdict(self.budget),
            "budget_bytes": self.limit,
            "bytes": int(candidates.bytes[index]),
            **(meta or {}),
        }
        return Allocation(tables, info)

    def features(self, candidates: Candidates) -> Tuple[torch.Tensor, torch.Tensor]:
        """The set of (frequency, size) pairs of each candidate, for the fitness predictor.

        Elements ``[C, T, G, 4]``: log count of the segment's ids, size / d, in the MEmCom tier,
        log table size (both logs scaled to [0, 1]); weights ``[T, G]``: share of the table's ids.
        """
        sizes = candidates.sizes
        tail_dims = self._tail_dim(sizes, candidates.tail_dim)
        size = np.where(sizes > 0, sizes, tail_dims[..., None]) / self.d[:, None]
        count = np.log1p(self.mean_counts) / max(np.log1p(self.mean_counts.max()), 1e-9)
        rows = np.log1p(self.n) / np.log1p(self.n.max())
        elements = np.stack(
            np.broadcast_arrays(count[None], size, (sizes == 0).astype(np.float64), rows[None, :, None]),
            axis=-1,
        )
        weights = self.lengths / self.n[:, None]
        return torch.from_numpy(elements).float(), torch.from_numpy(weights).float()
