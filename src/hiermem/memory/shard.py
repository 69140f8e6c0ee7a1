"""A bank sharded over the ranks of a job: who may update which block, and the reduction of shared blocks.

data/sharding.py gives every block of the tree the set of ranks that fetch it. A block fetched by one rank
only (every block of an owned subtree) is that rank's alone: its gradient stays local, only that rank updates
it and writes it into a checkpoint, and on the other ranks it stays bit-identical. A block fetched by several
ranks (the levels above the owned subtrees, a leaf shared by several ranks, the generic block) is replicated on
them; after backward its gradient is summed among exactly those ranks (one process group per distinct set of
ranks, made with dist.new_group), together with a count of the rows that fetched it, so that every replica
applies the same lazy AdamW step to the blocks the global batch fetched, and only to them. So the bytes a step
all-reduces for memory are those of the shared blocks, never those of the owned subtrees.

A rank's bank holds exactly the blocks it fetches (held_blocks: its owned and its shared ones, with their
moments and step counts; memory/bank.py `held`): a block fetched by no rank is never updated, so it stays in
the store as it was made, and no rank needs it in memory.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from hiermem.memory.fetch import BlockGrads
from hiermem.memory.spec import BankSpec


def held_blocks(sharers: dict[str, dict[int, tuple[int, ...]]], rank: int) -> dict[str, np.ndarray]:
    """Per part, the ascending ids of the blocks `rank` fetches: the ones its bank shard holds."""
    return {k: np.array(sorted(n for n, ranks in nodes.items() if rank in ranks), np.int64)
            for k, nodes in sharers.items()}


class ShardReducer:
    """sharers: per part, node id -> the ranks that fetch it (sorted). All ranks must build it together (it
    creates the process groups); comm_bytes["memory"] counts the bytes it all-reduces."""

    def __init__(self, spec: BankSpec, sharers: dict[str, dict[int, tuple[int, ...]]], rank: int, world: int,
                 comm_device: torch.device, comm_bytes: dict[str, int]):
        self.rank, self.comm_device, self.comm_bytes = rank, comm_device, comm_bytes
        self.mine = {k: np.zeros(spec.part_shape(k)[0], bool) for k in spec.part_keys()}  # blocks I may update
        self.block_shapes = {k: spec.part_shape(k)[1:] for k in spec.part_keys()}
        by_set: dict[tuple[int, ...], dict[str, list[int]]] = {}
        for key, nodes in sharers.items():
            for node, ranks in nodes.items():
                if rank in ranks:
                    self.mine[key][node] = True
                if len(ranks) > 1:
                    by_set.setdefault(ranks, {}).setdefault(key, []).append(node)
        self.groups = []  # (ranks, process group, {part: sorted shared ids}) of the sets this rank is in
        for ranks in sorted(by_set):  # every rank creates every group, in the same order
            group = dist.new_group(list(ranks)) if len(ranks) < world else dist.group.WORLD
            if rank in ranks:
                ids = {k: np.array(sorted(v), np.int64) for k, v in sorted(by_set[ranks].items())}
                self.groups.append((ranks, group, ids))
        self.shared = {k: np.zeros_like(m) for k, m in self.mine.items()}
        for _, _, ids in self.groups:
            for k, v in ids.items():
                self.shared[k][v] = True

    def reduce(self, bg: BlockGrads, rows: dict[str, torch.Tensor]) -> tuple[BlockGrads, torch.Tensor]:
        """The gradients this rank applies: its owned blocks' own, plus every shared block that a sharer
        fetched, summed over the sharers. rows: per part, the rows of this rank's batch that fetched each
        block of bg. Also returns this rank's share of the squared gradient norm (owned blocks, and the shared
        blocks on the lowest rank of each set), to be summed over the job."""
        dev = next(iter(bg.grads.values())).device if bg.grads else self.comm_device
        ids_out, grads_out = {}, {}
        sq = torch.zeros((), device=dev)
        for key, ids in bg.ids.items():  # owned blocks: local
            keep = torch.from_numpy(~self.shared[key][ids.numpy()])
            ids_out[key], grads_out[key] = [ids[keep]], [bg.grads[key][keep.to(dev)]]
            sq = sq + grads_out[key][0].pow(2).sum()
        for ranks, group, shared in self.groups:
            sizes = {k: int(np.prod(self.block_shapes[k])) for k in shared}
            n_blocks = sum(len(v) for v in shared.values())
            numel = sum(len(v) * sizes[k] for k, v in shared.items())
            buf = torch.zeros(numel + n_blocks, device=self.comm_device)
            off, coff = 0, numel
            for key, sid in shared.items():
                span = len(sid) * sizes[key]
                if key in bg.ids and len(bg.ids[key]):
                    local = bg.ids[key].numpy()
                    pos = np.searchsorted(sid, local)
                    hit = (pos < len(sid)) & (sid[np.minimum(pos, len(sid) - 1)] == local)
                    if hit.any():
                        dense = buf[off:off + span].view(len(sid), -1)
                        hit_t = torch.from_numpy(hit)
                        dense[torch.from_numpy(pos[hit])] = bg.grads[key][hit_t.to(dev)].reshape(
                            int(hit.sum()), -1).to(self.comm_device)
                        buf[coff + torch.from_numpy(pos[hit])] = rows[key][hit_t].float().to(self.comm_device)
                off, coff = off + span, coff + len(sid)
            dist.all_reduce(buf, group=group)
            self.comm_bytes["memory"] += buf.numel() * buf.element_size()
            off, coff = 0, numel
            for key, sid in shared.items():
                span = len(sid) * sizes[key]
                used = buf[coff:coff + len(sid)] > 0
                g = buf[off:off + span].view(len(sid), *self.block_shapes[key])[used].to(dev)
                ids_out.setdefault(key, []).append(torch.from_numpy(sid)[used.cpu()])
                grads_out.setdefault(key, []).append(g)
                if self.rank == ranks[0]:
                    sq = sq + g.pow(2).sum()
                off, coff = off + span, coff + len(sid)
        out = BlockGrads({}, {})
        for key in ids_out:
            ids = torch.cat(ids_out[key])
            order = torch.argsort(ids)
            out.ids[key], out.grads[key] = ids[order], torch.cat(grads_out[key])[order.to(dev)]
        return out, sq


__all__ = ["ShardReducer", "held_blocks"]
