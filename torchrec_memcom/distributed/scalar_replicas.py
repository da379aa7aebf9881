"""Replicas of the scalars, kept identical on the ranks that hold them.

Each column shard of a table needs every scalar of its rows, so the ranks holding column shards
of a row range keep replicas, as data-parallel ranks do of a whole table. Column-wise replicas
train in backward: their partial gradients are summed by a sparse all-gather of the touched
entries only (not a dense all-reduce of the table) before every holder applies the same
update. It runs on a process group of its own so that it never interleaves with TorchRec's and
DDP's collectives on the main group. Loading hands the owner's (lowest rank's) copy of every
replicated block to the other holders by broadcast.
"""

from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from torchrec_memcom.distributed.scalar_layout import LocalLayout, TableLayout


class Replicas:
    """Gradient sync of column-wise replicas, and broadcast of any replicated block.

    Args:
        layouts: every table's layout.
        local: this rank's flat layout.
        rank, world_size: this rank and the number of ranks.
        device: where this rank's scalars live.
        process_group: the sharding's process group (broadcasts of data-parallel scalars).

    Example::

        replicas = Replicas(layouts, local, rank, world_size, device, pg)
        if replicas.sync_group is not None:
            idx, grad = replicas.sync(idx, grad)  # in backward, on every rank
    """

    def __init__(
        self,
        layouts: Dict[str, TableLayout],
        local: LocalLayout,
        rank: int,
        world_size: int,
        device: torch.device,
        process_group: Optional[dist.ProcessGroup],
    ) -> None:
        self._layouts = layouts
        self._local = local
        self._rank = rank
        self._world_size = world_size
        self._device = device
        self._process_group = process_group
        self.names: List[str] = [n for n, layout in layouts.items() if layout.replicated]
        # per table of local.fused: its position in names, or -1 if it has no replicas
        self._position = torch.tensor(
            [self.names.index(n) if n in self.names else -1 for n in local.fused], dtype=torch.int64, device=device
        )
        # per table of names: where it starts in this rank's fused flat tensor, or -1 if not held
        self._start = torch.tensor(
            [local.slices[n][0] if n in local.fused else -1 for n in self.names], dtype=torch.int64, device=device
        )
        self.sync_group: Optional[dist.ProcessGroup] = None
        if self.names:
            self.sync_group = dist.new_group(backend=dist.get_backend(process_group))

    def sync(self, idx: torch.Tensor, grad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """All-gather (table, entry, grad) of replicated tables; keep what this rank holds.

        ``idx`` indexes the fused flat tensor; the result has every rank's gradients of the
        replicas this rank holds, after this rank's own of its other tables.
        """
        local_table = self._local.table_of(idx)
        rep = self._position[local_table]
        shared = rep >= 0
        mine = torch.stack(
            [rep[shared].double(), (idx - self._local.starts[local_table])[shared].double(), grad[shared].double()]
        )
        keep_idx, keep_grad = idx[~shared], grad[~shared]
        device = self._device
        sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self._world_size)]
        dist.all_gather(sizes, torch.tensor([mine.shape[1]], device=device), group=self.sync_group)
        longest = int(max(int(s) for s in sizes))
        padded = torch.zeros((3, longest), dtype=torch.float64, device=device)
        padded[:, : mine.shape[1]] = mine
        gathered = [torch.empty_like(padded) for _ in range(self._world_size)]
        dist.all_gather(gathered, padded, group=self.sync_group)
        everything = torch.cat([g[:, : int(s)] for g, s in zip(gathered, sizes)], dim=1)
        # Map each (replicated table, entry) to this rank's flat index, if it holds the table.
        start = self._start[everything[0].long()]
        held = start >= 0
        return (
            torch.cat([keep_idx, start[held] + everything[1, held].long()]),
            torch.cat([keep_grad, everything[2, held].to(keep_grad.dtype)]),
        )

    def broadcast(self, name: str, local: Optional[torch.Tensor]) -> None:
        """Copy the owner's entries of every replicated block of ``name`` to the other holders.

        ``local``: this rank's storage of the table (or a tensor shaped like it), None if it
        holds none. Every rank must call this, in the same order.
        """
        layout = self._layouts[name]
        block = layout.local_block(self._rank)
        group = self._process_group if layout.dense else self.sync_group
        for b in layout.blocks:
            if len(b.ranks) > 1:
                buf = (
                    local
                    if local is not None and block == b
                    else torch.empty(layout.storage_size(b), device=self._device)
                )
                dist.broadcast(buf, src=b.ranks[0], group=group)
