"""All-reduce (and gather) through shared memory for the workers of one machine (CPU).

gloo's all-reduce over loopback costs about a millisecond per call, and a TP step makes two per layer. Here
each worker owns a slot in one shared segment: it writes its partial sums, publishes a sequence number, waits
for its group's peers to publish the same one, and sums the slots in rank order (so every rank gets bitwise
the same result). Two slots per worker, used alternately, let a fast worker start the next call while a slow
one still reads the previous. A worker publishes (epoch, calls in that epoch) as two int64 words, compared in
that order, so values from before a switch are never mistaken for current ones, however many calls or
topologies came before.
"""

from __future__ import annotations

import os
import time
from multiprocessing import shared_memory

import torch


class PeerLost(RuntimeError):
    """A worker of the group died while this one waited for it."""


class ShmSegment:
    """Created by the driver; attached by name in each worker."""

    def __init__(self, world_size: int, max_elems: int, name: str | None = None):
        self.world_size, self.max_elems = world_size, max_elems
        self.flag_bytes = 8 * (2 * world_size + 1)  # (epoch, seq) per worker, then the driver's count of losses
        size = self.flag_bytes + world_size * 2 * max_elems * 8  # float64 room: exact for float64 models
        if name is None:
            self.shm = shared_memory.SharedMemory(create=True, size=size)
            self.shm.buf[: self.flag_bytes] = bytes(self.flag_bytes)
        else:
            self.shm = shared_memory.SharedMemory(name=name)
        self.name = self.shm.name

    def peer_lost(self) -> None:
        """Driver: a worker died; workers waiting in an all-reduce give up (PeerLost) instead of spinning."""
        lost = torch.frombuffer(self.shm.buf, dtype=torch.int64, count=2 * self.world_size + 1)
        lost[2 * self.world_size] += 1

    def close(self, unlink: bool = False) -> None:
        self.shm.close()
        if unlink:
            self.shm.unlink()


class ShmAllReduce:
    def __init__(self, segment: ShmSegment, rank: int):
        self.seg, self.rank = segment, rank
        words = torch.frombuffer(segment.shm.buf, dtype=torch.int64, count=2 * segment.world_size + 1)
        self.flags, self.lost = words[: 2 * segment.world_size].view(-1, 2), words[2 * segment.world_size :]
        self.lost_seen = int(self.lost[0])  # workers lost before this world began
        self.data = torch.frombuffer(
            segment.shm.buf,
            dtype=torch.uint8,
            offset=segment.flag_bytes,
            count=segment.world_size * 2 * segment.max_elems * 8,
        )
        self.members: list[int] = []
        self.epoch, self.seq = 0, 0

    def set_group(self, members: list[int], epoch: int) -> None:
        """Called by every worker at a topology change, with the same epoch everywhere, once every member of the
        old group is done with its calls (the switch's commit, a regroup): an epoch's first call may use the slot
        of the last call before it."""
        self.members, self.epoch, self.seq = sorted(members), epoch, 0

    def _slot(self, rank: int, parity: int, dtype: torch.dtype, n: int) -> torch.Tensor:
        per = self.seg.max_elems * 8
        start = (rank * 2 + parity) * per
        return self.data[start : start + n * dtype.itemsize].view(dtype)

    def _publish_and_wait(self, peers: list[int]) -> None:
        """Publish this call's (epoch, seq), then wait until `peers` have reached it. seq is written before the
        epoch, and read after it: a peer that looks between the two stores sees the old epoch beside the new seq,
        which is below anything of the new epoch, and looks again. (The other order would show the new epoch beside
        the old epoch's last seq, a count of calls not made yet: a peer could run ahead while this worker is
        descheduled between the stores, and overwrite slots still being read.)"""
        self.flags[self.rank, 1] = self.seq
        self.flags[self.rank, 0] = self.epoch
        for peer in peers:
            spins = 0
            while not self._reached(peer):
                spins += 1
                if spins < 64:
                    os.sched_yield()
                else:
                    time.sleep(0.00002)  # peers may share this core: stop competing for it
                    if int(self.lost[0]) != self.lost_seen:
                        raise PeerLost(f"worker {peer} of this group was lost")

    def _reached(self, peer: int) -> bool:
        epoch = int(self.flags[peer, 0])  # read in the order they are written
        return epoch > self.epoch or (epoch == self.epoch and int(self.flags[peer, 1]) >= self.seq)

    def __call__(self, t: torch.Tensor) -> None:
        """In-place sum of t over the group."""
        acc = torch.float64 if t.dtype == torch.float64 else torch.float32
        n = t.numel()
        if n > self.seg.max_elems:
            raise ValueError(f"all-reduce of {n} elements exceeds the shared buffer ({self.seg.max_elems})")
        self.seq += 1
        parity = self.seq & 1
        self._slot(self.rank, parity, acc, n).copy_(t.reshape(-1))
        self._publish_and_wait(self.members)
        total = self._slot(self.members[0], parity, acc, n).clone()
        for peer in self.members[1:]:
            total += self._slot(peer, parity, acc, n)
        t.copy_(total.view(t.shape))

    def gather(self, t: torch.Tensor, root: int) -> list[torch.Tensor] | None:
        """Every member's 2-D `t` (float32 or float64, the same shape everywhere) -> on `root`, one per member
        in member order; None elsewhere. In chunks of rows that fit a slot. Every member waits for every other,
        as in the all-reduce: a member may still be reading the slots of the call before."""
        rows, width = t.shape
        step = max(1, self.seg.max_elems // width)
        out = [t.new_empty(rows, width) for _ in self.members] if self.rank == root else None
        for lo in range(0, rows, step):
            chunk = t[lo : lo + step]
            self.seq += 1
            parity = self.seq & 1
            self._slot(self.rank, parity, t.dtype, chunk.numel()).copy_(chunk.reshape(-1))
            self._publish_and_wait(self.members)
            if out is not None:
                for part, peer in zip(out, self.members):
                    part[lo : lo + len(chunk)] = self._slot(peer, parity, t.dtype, chunk.numel()).view(chunk.shape)
        return out
