"""BET's fitness predictor: a DeepSets network over the set of (frequency, size) pairs.

An allocation is a set of tables, each a set of ids with a frequency and a size; the predictor
must not depend on the order of either, so it is DeepSets twice (Zaheer et al., 2017):
``f(A) = rho(mean_t psi(sum_k w_tk phi(x_tk)))``, with ``x_tk`` the features of a group of ids
of table ``t`` that share frequency and size (a segment of ranks) and ``w_tk`` its share of the
table's ids, which makes the inner sum the mean of ``phi`` over the table's ids.
"""

from typing import Optional

import torch
from torch import nn


def _mlp(sizes: list) -> nn.Sequential:
    layers: list = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


class DeepSetsFitness(nn.Module):
    """``elements [C, T, G, F]``, ``weights [T, G]`` -> fitness ``[C]``: the DeepSets network,
    invariant to the order of tables and of the groups of ids within one.

    Args:
        features: ``F``, the features of a group of ids (``AllocationSpace.features``: 4).
        hidden: the width of ``phi``, ``psi`` and ``rho``.

    Example::

        net = DeepSetsFitness(features=4)
        net(torch.rand(8, 2, 64, 4), torch.full((2, 64), 1 / 64)).shape  # (8,)
    """

    def __init__(self, features: int, hidden: int = 32) -> None:
        super().__init__()
        self.phi = _mlp([features, hidden, hidden])
        self.psi = _mlp([hidden, hidden, hidden])
        self.rho = _mlp([hidden, hidden, 1])

    def forward(self, elements: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        tables = (torch.relu(self.phi(elements)) * weights[None, :, :, None]).sum(dim=2)
        return self.rho(torch.relu(self.psi(tables)).mean(dim=1)).squeeze(-1)


class FitnessPredictor:
    """Fits ``DeepSetsFitness`` to labelled allocations and ranks unlabelled ones.

    Labels are standardised; the loss is squared error plus a pairwise logistic ranking loss
    (the search only needs the order). Every fit starts from the same seeded initialisation.

    Args:
        hidden: the width of the ``DeepSetsFitness`` network.
        epochs: full-batch Adam steps per fit.
        lr: Adam's lr.
        seed: the seed of every fit's initialisation.

    Example::

        elements, weights = space.features(candidates)  # an AllocationSpace and its samples
        predictor = FitnessPredictor().fit(elements, weights, labels)  # labels [C], e.g. AUCs
        predictor.predict(elements, weights)  # [C], higher is better
    """

    def __init__(self, hidden: int = 32, epochs: int = 400, lr: float = 3e-3, seed: int = 0) -> None:
        self.hidden, self.epochs, self.lr, self.seed = hidden, epochs, lr, seed
        self.model: Optional[DeepSetsFitness] = None

    def fit(self, elements: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor) -> "FitnessPredictor":
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(self.seed)
        self.model = DeepSetsFitness(elements.shape[-1], self.hidden)
        torch.random.set_rng_state(generator_state)
        y = labels.float()
        y = (y - y.mean()) / (y.std() if len(y) > 1 and float(y.std()) > 0 else 1.0)
        optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=1e-4)
        better = (y[:, None] > y[None, :]).float()
        for _ in range(self.epochs):
            pred = self.model(elements, weights)
            diff = pred[:, None] - pred[None, :]
            ranking = (nn.functional.softplus(-diff) * better).sum() / better.sum().clamp(min=1)
            loss = nn.functional.mse_loss(pred, y) + ranking
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return self

    @torch.no_grad()
    def predict(self, elements: torch.Tensor, weights: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """Predicted fitness (in standardised label units) of each candidate."""
        if self.model is None:
            raise RuntimeError("fit the predictor before predicting")
        return torch.cat([self.model(e, weights) for e in elements.split(chunk)])
