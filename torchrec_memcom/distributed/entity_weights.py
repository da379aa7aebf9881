"""Per-entity scalars of MEmCom, sharded with their shared table and updated sparsely in backward.

A table's slot ``s = k * m + row`` (``row < m``, ``k < K = ceil(n/m)``) is routed by ``input_dist``
to the rank holding shared ``row``, carrying ``k`` as the KJT weight (exact in fp32). A rank that
holds shared rows ``[o, o + r)`` stores the scalars of exactly those slots as a flat ``K * r``
vector, entry ``k * r + (row - o)``, so a lookup needs no further communication:

- table-wise / row-wise: every slot lives on one rank; the fused optimizer updates touched
  entries in backward, as FBGEMM does for embedding rows.
- column-wise: each column shard needs every scalar, so the ranks holding shards of the table keep
  replicas and sum their partial gradients (a sparse all-gather of the touched entries only)
  before the identical update; the state dict shows the lowest such rank's copy.
- data-parallel: a small replicated table; the scalars are a dense parameter trained by the dense
  optimizer under DDP, exactly like the DP table itself.

The state dict shows each table's scalars as one ShardedTensor ``entity_weights.T`` of shape
``(n,)`` indexed by slot, whatever the sharding.

``ShardedEntityWeights`` owns the storage and composes the parts: ``scalar_layout`` (where the
scalars live), ``scalar_update`` (the lookup whose backward updates them), ``scalar_replicas``
(replicas kept identical), ``scalar_state`` (the ShardedTensor state dict) and
``scalar_optimizer`` (the fused optimizer facade).
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.optim.fused import EmptyFusedOptimizer

from torchrec_memcom.distributed.scalar_layout import LocalLayout, TableLayout
from torchrec_memcom.distributed.scalar_optimizer import EntityWeightOptimizer
from torchrec_memcom.distributed.scalar_replicas import Replicas
from torchrec_memcom.distributed.scalar_state import copy_block, sharded_tensor
from torchrec_memcom.distributed.scalar_update import FusedLookup, StepRates, sparse_step


class ShardedEntityWeights(nn.Module):
    """This rank's scalars of every compressed table, their state dict and their update.

    All fused tables' scalars on this rank live in one flat tensor (``fused``), the
    data-parallel ones in another (``dense``), so a lookup is one gather per KJT and the
    update one scatter per step, whatever the number of tables.

    Args:
        layouts: per compressed table, where its scalars live (``scalar_layout.table_layout``).
        rank, world_size: this rank and the number of ranks.
        device: where this rank's scalars live.
        process_group: the sharding's process group.

    Example::

        layouts = {t.name: table_layout(t, plan[t.name], world_size, device, fused_params) for t in tables}
        weights = ShardedEntityWeights(layouts, rank, world_size, device, env.process_group)
        anchor, scalars = weights.lookup_fused([idx], [1.0])  # backward updates the scalars
    """

    def __init__(
        self,
        layouts: Dict[str, TableLayout],
        rank: int,
        world_size: int,
        device: torch.device,
        process_group: Optional[dist.ProcessGroup],
    ) -> None:
        super().__init__()
        self.layouts = layouts
        self._rank = rank
        self._process_group = process_group
        self._local = LocalLayout(layouts, rank, device)
        self.fused = nn.Parameter(torch.empty(self._local.sizes["fused"], device=device), requires_grad=False)
        # Trained in backward: keep it out of the dense optimizer (TorchRec's convention).
        self.fused._in_backward_optimizers = [EmptyFusedOptimizer()]  # type: ignore[attr-defined]
        self.dense = nn.Parameter(torch.empty(self._local.sizes["dense"], device=device))
        rules = {n: layout.fused_rule for n, layout in layouts.items() if not layout.dense}
        kinds = {n: rule.adagrad for n, rule in rules.items()}
        if len(set(kinds.values())) > 1:
            raise ValueError(
                f"the MEmCom tables of one collection must all train with SGD or all with "
                f"(row-wise) Adagrad; got Adagrad per table {kinds}"
            )
        self.momentum: Optional[torch.Tensor] = torch.zeros_like(self.fused) if any(kinds.values()) else None
        # per local fused table: its param group (lr) in the fused optimizer, and its eps
        fused = list(rules)
        self._rates = StepRates(
            self._local,
            [fused.index(n) for n in self._local.fused],
            [rules[n].eps for n in self._local.fused],
            self.fused.dtype,
        )
        self._replicas = Replicas(layouts, self._local, rank, world_size, device, process_group)
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        keys = {n: f"entity_weights.{n}" for n in fused}
        self._optimizer = EntityWeightOptimizer(
            {keys[n]: self.sharded(n, self.fused) for n in fused},
            {keys[n]: rules[n].lr for n in fused},
            {keys[n]: self.sharded(n, self.momentum) for n in fused} if self.momentum is not None else {},
            on_load=self._broadcast_momentum,
        )

    def extra_repr(self) -> str:
        return f"tables={sorted(self.layouts)}, fused={self.fused.numel()}, dense={self.dense.numel()}"

    @property
    def storage(self) -> Dict[str, torch.Tensor]:
        """Per table this rank holds: its ``K * r`` scalars (a view of the flat tensor)."""
        return {n: self._local.view(n, self._flat_of(n)) for n in self._local.slices}

    def _flat_of(self, name: str) -> torch.Tensor:
        return self.dense if self.layouts[name].dense else self.fused

    @property
    def needs_anchor(self) -> bool:
        """Whether outputs must carry the anchor (replicas sync in backward on every rank)."""
        return self._replicas.sync_group is not None

    # ---- lookup -------------------------------------------------------------------------

    def address(self, name: Optional[str]) -> Tuple[int, int, bool]:
        """``(start, rows)`` so that a slot arriving as (k, local row) sits at
        ``start + k * rows + row`` of its flat tensor, and whether the table is data-parallel;
        ``(0, 0, False)`` for a table without scalars on this rank."""
        if name is None or name not in self._local.slices:
            return 0, 0, False
        block = self.layouts[name].local_block(self._rank)
        assert block is not None
        return self._local.slices[name][0], block.rows, self.layouts[name].dense

    def lookup_dense(self, idx: torch.Tensor) -> torch.Tensor:
        """Data-parallel scalars at ``idx`` (of ``dense``), trained by the dense optimizer."""
        return self.dense[idx]

    def lookup_fused(
        self, indices: Sequence[torch.Tensor], scales: Sequence[float]
    ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """Fused scalars at ``indices``, and an anchor scalar.

        ``scales``: TorchRec scales per-sample-weight gradients of model-parallel lookups by
        the world size (for DDP-averaged feature processors); dividing by it keeps the scalars
        on the same gradient convention as their shared rows. With column-wise replicas, add
        ``0 * anchor`` to the module output: backward then reaches the update on every rank,
        even one without lookups, so the replica sync never waits on a missing rank.
        """
        anchor, *out = FusedLookup.apply(self._anchor, self.fused, self.apply_gradients, list(scales), *indices)
        return anchor, out

    # ---- in-backward update ---------------------------------------------------------------

    @torch.no_grad()
    def apply_gradients(self, idx: torch.Tensor, grad: torch.Tensor) -> None:
        """Sum gradients per touched entry (across replicas too) and update those entries."""
        if self._replicas.sync_group is not None:
            idx, grad = self._replicas.sync(idx, grad)
        lr, eps = self._rates(idx, self._optimizer.param_groups)
        sparse_step(self.fused.data, self.momentum, idx, grad, lr, eps)

    # ---- state dict ------------------------------------------------------------------------

    def sharded(self, name: str, flat: Optional[torch.Tensor]) -> ShardedTensor:
        """``(n,)`` ShardedTensor whose local shards are views of ``name``'s part of ``flat``."""
        local = self._local.view(name, flat) if flat is not None and name in self._local.slices else None
        return sharded_tensor(self.layouts[name], local, self._rank, self.fused.dtype, self._process_group)

    def _save_to_state_dict(self, destination: Dict[str, Any], prefix: str, keep_vars: bool) -> None:
        for name in self.layouts:
            destination[prefix + name] = self.sharded(name, self._flat_of(name))

    def _load_from_state_dict(
        self,
        state_dict: Dict[str, Any],
        prefix: str,
        local_metadata: Dict[str, Any],
        strict: bool,
        missing_keys: List[str],
        unexpected_keys: List[str],
        error_msgs: List[str],
    ) -> None:
        for name in self.layouts:
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                continue
            self.load_table(name, state_dict[key])

    @torch.no_grad()
    def load_table(self, name: str, value: Any) -> None:
        """Fill this rank's entries from a full ``(n,)`` tensor or a ShardedTensor of ``(n,)``.

        A ShardedTensor carries only the owner's copy of replicated blocks: holders then receive
        it by broadcast, so every rank must call this in the same order (load_state_dict does).
        """
        layout = self.layouts[name]
        n = layout.table.num_embeddings
        if tuple(value.shape) != (n,):
            raise ValueError(f"entity_weights.{name}: expected shape ({n},), got {tuple(value.shape)}")
        block = layout.local_block(self._rank)
        local = None
        if block is not None:
            local = self._local.view(name, self._flat_of(name)).detach()
            copy_block(layout, block, local, value)
        if isinstance(value, ShardedTensor):
            self.broadcast_replicas(name, local)

    def broadcast_replicas(self, name: str, local: Optional[torch.Tensor]) -> None:
        """Copy the owner's entries of every replicated block to the other holders."""
        self._replicas.broadcast(name, local)

    def _broadcast_momentum(self) -> None:
        """Hand the owner's Adagrad state of column-wise replicas to every holder (SGD has none)."""
        if self.momentum is None:
            return
        for name in self._replicas.names:
            self.broadcast_replicas(name, self._local.view(name, self.momentum) if name in self._local.slices else None)

    @property
    def fused_optimizer(self) -> EntityWeightOptimizer:
        return self._optimizer
