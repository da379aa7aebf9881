"""BET's search: sample allocations that meet the budget, rank them with the fitness predictor,
label the most promising by short training, refit, repeat; keep the best labelled one.

Labels are expensive (a training run each) and the predictor cheap, so every round scores a
fresh pool of sampled allocations and labels only the few it ranks highest. The heuristic
allocation is labelled first, so the search returns nothing worse than it on the labels.
"""

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

from torchrec_memcom.budget.predictor import FitnessPredictor
from torchrec_memcom.budget.space import AllocationSpace, Candidates
from torchrec_memcom.modules.budget_allocation import Allocation


@dataclasses.dataclass
class SearchSettings:
    """How ``search`` spends its labels: labels cost a training run each, so these set its time.

    Args:
        rounds: predictor rounds after the initial labels.
        initial: labels before the first fit (the heuristic and random samples).
        per_round: labels per round.
        pool: samples scored per round.
        seed: the seed of the sampler and of the predictor.
        metric: the label's key to maximise.

    Example::

        best, labels = search(space, label, SearchSettings(rounds=1, pool=100))
    """

    rounds: int = 3
    initial: int = 3
    per_round: int = 2
    pool: int = 500
    seed: int = 0
    metric: str = "auc"


@dataclasses.dataclass
class Labelled:
    """One trained candidate: what ``search`` returns and records in the allocation's ``meta``.

    Args:
        round: the round that labelled it (0: the initial labels).
        shape: how it was drawn (``Candidates.shapes``).
        bytes: its bytes under the budget's accounting.
        predicted: the predictor's score (None for the initial labels).
        metrics: what the label returned (``train_and_evaluate``'s metrics).

    Example::

        best, labels = search(space, label, SearchSettings())
        [(x.round, x.metrics["auc"]) for x in labels]  # every label, in order
    """

    round: int
    shape: str
    bytes: int
    predicted: Optional[float]
    metrics: Dict[str, float]


def search(
    space: AllocationSpace,
    label: Callable[[Allocation], Dict[str, float]],
    settings: SearchSettings,
    log: Callable[[str], None] = print,
) -> Tuple[Allocation, List[Labelled]]:
    """The best labelled allocation (its ``meta`` records the search) and every label."""
    rng = np.random.default_rng(settings.seed)
    start = time.perf_counter()
    done: List[Candidates] = []
    labelled: List[Labelled] = []

    def run(candidates: Candidates, round: int, predicted: Optional[torch.Tensor]) -> None:
        for i in range(len(candidates)):
            metrics = label(space.allocation(candidates, i))
            done.append(candidates.take([i]))
            labelled.append(
                Labelled(
                    round,
                    candidates.shapes[i],
                    int(candidates.bytes[i]),
                    None if predicted is None else float(predicted[i]),
                    metrics,
                )
            )
            guess = "" if predicted is None else f" (predicted {float(predicted[i]):+.2f})"
            log(
                f"round {round} label {len(labelled)}: {settings.metric} "
                f"{metrics[settings.metric]:.4f}{guess}, {int(candidates.bytes[i])} bytes "
                f"[{time.perf_counter() - start:.0f}s]"
            )

    first = [space.heuristic_candidates()]
    if settings.initial > 1:
        first.append(space.sample(settings.initial - 1, rng))
    run(Candidates.concat(first), 0, None)
    predictor = FitnessPredictor(seed=settings.seed)
    for round in range(1, settings.rounds + 1):
        pool = space.sample(settings.pool, rng)
        seen = Candidates.concat(done)
        elements, weights = space.features(seen)
        predictor.fit(elements, weights, torch.tensor([x.metrics[settings.metric] for x in labelled]))
        pool_elements, _ = space.features(pool)
        scores = predictor.predict(pool_elements, weights)
        chosen: List[int] = []
        for i in torch.argsort(scores, descending=True).tolist():
            if not _duplicate(pool, i, seen, chosen):
                chosen.append(i)
            if len(chosen) == settings.per_round:
                break
        if not chosen:
            log(f"round {round}: the pool holds only allocations labelled already")
        run(pool.take(chosen), round, scores[chosen])
    best = max(range(len(labelled)), key=lambda i: labelled[i].metrics[settings.metric])
    meta = {
        "kind": "search",
        "best": {"label": best + 1, settings.metric: labelled[best].metrics[settings.metric]},
        "settings": dataclasses.asdict(settings),
        "labels": [dataclasses.asdict(x) for x in labelled],
        "seconds": time.perf_counter() - start,
    }
    return space.allocation(done[best], 0, meta), labelled


def _duplicate(pool: Candidates, i: int, seen: Candidates, chosen: List[int]) -> bool:
    """Whether pool member ``i`` repeats a labelled or already chosen allocation."""
    same = lambda a, b: np.array_equal(a, b)  # noqa: E731
    key = (pool.sizes[i], pool.tail_dim[i], pool.tail_sharing[i])
    others = [(seen.sizes[k], seen.tail_dim[k], seen.tail_sharing[k]) for k in range(len(seen))]
    others += [(pool.sizes[k], pool.tail_dim[k], pool.tail_sharing[k]) for k in chosen]
    return any(all(same(a, b) for a, b in zip(key, other)) for other in others)
