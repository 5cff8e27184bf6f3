"""Worker-side communication: torch.distributed (gloo on CPU, NCCL on CUDA), TP groups per topology (built
once and cached), point-to-point hidden-state transfers between pipeline stages."""

from __future__ import annotations

from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from remp.config import ModelConfig
from remp.shm_allreduce import ShmAllReduce, ShmSegment
from remp.topology import Topology


class WorkerComm:
    def __init__(
        self,
        rank: int,
        world_size: int,
        init_method: str,
        timeout_s: float,
        device: torch.device,
        shm: ShmSegment | None = None,
        epoch: int = 0,
        nodes: tuple[int, ...] | None = None,
    ):
        """init_method: store://HOST:PORT/PREFIX, the driver's TCP store (remp/rendezvous.py), where each
        generation of the pool meets under its own prefix. nodes[rank]: each worker's node."""
        self.rank, self.device, self.nodes = rank, device, nodes
        # Same-machine CPU workers sum through shared memory: gloo costs ~1 ms per call over loopback.
        self.shm_all_reduce = ShmAllReduce(shm, rank) if shm is not None and device.type == "cpu" else None
        self._shm_group = False  # this topology's TP group is all on this node: it sums through shared memory
        self.epoch = epoch
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = timedelta(seconds=timeout_s)
        where, prefix = init_method.removeprefix("store://").split("/", 1)
        host, port = where.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
        dist.init_process_group(
            backend, store=dist.PrefixStore(prefix, store), rank=rank, world_size=world_size, timeout=timeout
        )
        self.world_size = world_size
        self._groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
        self.switch_group: dist.ProcessGroup | None = None
        self._sends: deque = deque()  # in-flight isends (work, tensor kept alive until done)
        self.tp_group = None
        self.prev = self.next = None

    def prepare_topology(self, topology: Topology) -> None:
        """Create the process groups a topology needs (cached), and once the group switches move pieces on.
        Collective over the whole world: every worker calls it, with the same topology, in the same order."""
        for replica in range(topology.dp):
            for stage in range(topology.pp):
                key = tuple(sorted(topology.stage_workers(stage, replica)))
                if len(key) > 1 and key not in self._groups:
                    self._groups[key] = dist.new_group(list(key))
        if self.switch_group is None:
            # its own group: pre-copy runs in a thread while steps use the default group
            self.switch_group = dist.new_group(list(range(self.world_size)))

    def use_topology(self, topology: Topology, config: ModelConfig, dtype: torch.dtype) -> None:
        """Route steps by this topology (its groups prepared): TP group, previous and next stage, all inside this
        worker's replica."""
        self.hidden_size, self.dtype = config.hidden_size, dtype
        self.epoch += 1
        replica = topology.replica_of(self.rank)
        if replica is None:
            self.tp_group = self.prev = self.next = None
            return
        topology = topology.replica(replica)
        stage, tp_rank = topology.coordinate(self.rank)
        group = topology.stage_workers(stage)
        self.tp_group = self._groups.get(tuple(sorted(group)))
        # across nodes the TP group sums through the backend; shared memory only joins workers of one machine
        self._shm_group = self.shm_all_reduce is not None and (
            self.nodes is None or len({self.nodes[w] for w in group}) == 1
        )
        if self._shm_group:
            self.shm_all_reduce.set_group(group, self.epoch)
        # the vocabulary slice of each member of the group, in the group's rank order (sorted workers)
        self._vocab = [topology.spec(config, w).vocab for w in sorted(group)]
        self._sampler = topology.worker(stage, 0)
        self.prev = topology.worker(stage - 1, tp_rank) if stage > 0 else None
        self.next = topology.worker(stage + 1, tp_rank) if stage < topology.pp - 1 else None
        self._max_sends = topology.pp

    def all_reduce(self, t: torch.Tensor) -> None:
        if self._shm_group:
            self.shm_all_reduce(t)
        elif t.dtype == torch.bfloat16 and self.device.type == "cpu":
            acc = t.float()  # gloo has no bfloat16 sum; reducing in float32 is also the more exact choice
            dist.all_reduce(acc, group=self.tp_group)
            t.copy_(acc)
        else:
            dist.all_reduce(t, group=self.tp_group)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Last stage: each TP rank's logits for its vocabulary slice -> whole rows on the sampler (TP rank 0),
        None on the others. Slices are padded to one width, as a gather needs."""
        width = max(len(v) for v in self._vocab)
        buf = logits if logits.shape[1] == width else F.pad(logits, (0, width - logits.shape[1]))
        buf = buf.contiguous()
        if self._shm_group and width <= self.shm_all_reduce.seg.max_elems:  # a row fits a slot
            parts = self.shm_all_reduce.gather(buf, self._sampler)
        elif self.rank == self._sampler:
            parts = [torch.empty_like(buf) for _ in self._vocab]
            dist.gather(buf, parts, dst=self._sampler, group=self.tp_group)
        else:
            dist.gather(buf, None, dst=self._sampler, group=self.tp_group)
            parts = None
        if parts is None:
            return None
        order = sorted(range(len(parts)), key=lambda i: self._vocab[i].start)
        return torch.cat([parts[i][:, : len(self._vocab[i])] for i in order], dim=1)

    def recv_hidden(self, num_tokens: int) -> torch.Tensor:
        buf = torch.empty(num_tokens, self.hidden_size, dtype=self.dtype, device=self.device)
        dist.recv(buf, src=self.prev)
        return buf

    def send_hidden(self, hidden: torch.Tensor) -> None:
        # Asynchronous so this stage can start the next micro-batch while the next stage receives.
        hidden = hidden.contiguous()
        self._sends.append((dist.isend(hidden, dst=self.next), hidden))
        while len(self._sends) > self._max_sends:
            self._sends.popleft()[0].wait()

    def close(self) -> None:
        for work, _ in self._sends:
            try:
                work.wait()
            except Exception:  # the receiver is gone (a lost worker): nothing to finish
                pass
        self._sends.clear()
        # drop every reference to the groups, so that their connections close (peers waiting on them error out)
        self._groups.clear()
        self.switch_group = self.tp_group = None
        if dist.is_initialized():
            dist.destroy_process_group()
