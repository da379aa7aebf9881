"""Slot maps of MEmCom: entity id -> slot ``s`` in ``[0, n)``; the shared row is ``s mod m``.

"mod" is the identity slot (the paper's ``h(i) = i mod m``). "mix" is a bijection of ``[0, n)``
(a murmur-style finaliser on the next power of two, cycle-walked back into range), so ids with
structure still spread over the shared rows while every entity keeps its own scalar.
"""

from typing import Tuple, Union

import torch

_MUL1 = 0x2545F4914F6CDD1D
_MUL2 = 0x7FB5D329728EA185
Const = Union[int, torch.Tensor]


def mix_constants(num_embeddings: int) -> Tuple[int, int, int, int]:
    """``(mask, shift, mul1, mul2)`` of the "mix" bijection for a table of ``num_embeddings``."""
    bits = max(1, (num_embeddings - 1).bit_length())
    if bits > 31:
        raise ValueError(f"hash 'mix' supports tables of at most 2**31 rows, got {num_embeddings}")
    mask = (1 << bits) - 1
    return mask, max(1, bits // 2), _MUL1 & mask | 1, _MUL2 & mask | 1


def _mix_bits(x: torch.Tensor, mask: Const, shift: Const, mul1: Const, mul2: Const) -> torch.Tensor:
    """A bijection of ``[0, 2**bits)``: odd multiplies and xor-shifts, all modulo ``2**bits``."""
    for mul in (mul1, mul2):
        x = x ^ (x >> shift)
        x = (x * mul) & mask
    return x ^ (x >> shift)


def mix_slots(
    ids: torch.Tensor, num_embeddings: Const, mask: Const, shift: Const, mul1: Const, mul2: Const
) -> torch.Tensor:
    """The "mix" slot of every id; the table's size and ``mix_constants`` may be per-id tensors,
    so that one pass maps the ids of several tables."""
    out = _mix_bits(ids, mask, shift, mul1, mul2)
    # Cycle walking: re-apply the bijection to values that left [0, n); each pass keeps at least
    # half of the remaining ones in range, so this ends after a few passes.
    outside = out >= num_embeddings
    while bool(outside.any()):
        out = torch.where(outside, _mix_bits(out, mask, shift, mul1, mul2), out)
        outside = out >= num_embeddings
    return out


def slots(ids: torch.Tensor, num_embeddings: int, hash: str) -> torch.Tensor:
    """Slot of every id; a bijection of ``[0, num_embeddings)`` for both hashes."""
    if hash == "mod":
        return ids
    return mix_slots(ids, num_embeddings, *mix_constants(num_embeddings))
