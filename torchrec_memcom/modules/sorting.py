"""A sort on the per-step hot path of our collections, exact on every device.

torch 2.13's CPU sort of ~10^4 int64 ids takes about 15x numpy's (0.52 vs 0.035 ms measured
on 26 x 512 ids), so CPU tensors are sorted by numpy; other devices use torch's own kernels.
"""

import numpy as np
import torch


def stable_argsort(x: torch.Tensor) -> torch.Tensor:
    """Indices that sort the 1-D ``x``, equal values kept in their order."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.argsort(x.numpy(), kind="stable"))
    return torch.sort(x, stable=True).indices
