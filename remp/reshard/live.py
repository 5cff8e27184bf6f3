"""Worker side of a live switch: the weights, and most of the KV cache, move while this worker keeps running
steps; the pause only moves the KV blocks written since and swaps the shard.

Pre-copy runs in a background thread, on the switch's own process group (so its messages never mix with the
steps' hidden states and all-reduces), in two rounds:
1. weights: the weight pieces of the plan move a chunk of layers at a time, every worker agreeing before each
   chunk whether to go on (an abort or a local error on any worker stops them all at the same point), received
   in place where a piece is a contiguous part of its new tensor; after each chunk its layers are assembled,
   their KV layers allocated, their execution form (fused / packed linears) built and run once on the batch
   sizes the new topology will see (its kernels are made on a first call), so none of that is left for the
   pause or the first step after it;
2. KV: the driver names blocks that are full (append-only: never written again while their request holds
   them); their slices move into the new layers, by layer, with the same agreement.
At the cut-over the driver says which of those blocks are still clean (same request, same place); only the
others move. The old shard is only read, never changed, until then. The thread works in short bursts and rests
between them as `pacing.Pacer` says: serving keeps its speed, and each round ends by its deadline.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable

import torch
import torch.distributed as dist

from remp.kv_cache import new_kv_layer
from remp.messages import KVFlows, PrepareSwitch, SwitchStats
from remp.model.decoder import Layer
from remp.model.layer_ops import layer_ops
from remp.model.schema import tensor_layer
from remp.planner.plan import KVPiece, Transfer, WeightPiece, weight_ranges
from remp.reshard.execute import (
    Memory,
    NewTensors,
    PieceIO,
    assemble_kv_layer,
    assemble_weight,
    can_keep_kv_layer,
    phase_groups,
)
from remp.reshard.pacing import Pacer, StepClock
from remp.shard_state import ShardState

PRECOPY_CHUNK_BYTES = 8 << 20  # small chunks (about a layer): short bursts of copying between serving steps


class LiveSwitch:
    def __init__(
        self,
        rank: int,
        msg: PrepareSwitch,
        runner,
        group,
        report: Callable[[str, SwitchStats | None, str | None], None],
        steps: StepClock | None = None,
    ):
        self.rank, self.msg, self.runner, self.group = rank, msg, runner, group
        self.config = runner.reader.config
        self.report = report  # (stage, stats, error) when a round is done or failed on this worker
        self.stats = SwitchStats()
        self.memory = Memory(self.stats)
        plan = msg.plan
        old_replica, new_replica = plan.old.replica_of(rank), plan.new.replica_of(rank)
        self.io = PieceIO(
            rank, self.config, runner.state(), {}, runner.block_size, runner.dtype, runner.device, group,
            self.stats, self.memory, runner.reader, old_replica, new_replica,
        )  # fmt: skip
        self.new_spec = plan.new.spec(self.config, rank) if new_replica is not None else None
        self.new_ranges = weight_ranges(self.config, self.new_spec)
        old_kv = next(iter(self.io.old.kv_layers.values()), None)
        # its layers stay if its new replica takes only its old replica's blocks (the driver keeps their ids then)
        only_own = [s for s, ds in plan.routes.items() if new_replica in ds] == [old_replica]
        self.same_blocks = old_kv is not None and old_kv.shape[2] == msg.num_blocks and only_own
        self.kv_transfers = [t for t in plan.transfers if isinstance(t.piece, KVPiece)]
        self.pacer = Pacer(msg.precopy_duty, steps)
        self.cancel = threading.Event()
        self.weights: dict[str, torch.Tensor] = {}
        self.kv_targets: dict[int, torch.Tensor] = {}
        self.built: dict = {}
        self.shard = None
        self.thread: threading.Thread | None = None

    # ---- rounds (each in a background thread) ------------------------------------------------------------------
    def start(self) -> None:
        self._background(self._precopy_weights, "precopied")

    def precopy_kv(self, flows: KVFlows, deadline_s: float = float("inf")) -> None:
        self.thread.join()
        self._background(lambda: self._copy_kv(flows, deadline_s), "kv_precopied")

    def _background(self, work: Callable[[], bool], stage: str) -> None:
        def run() -> None:
            t0, error, finished = time.perf_counter(), None, False
            # The main thread holds the GIL between its torch calls; with the default 5 ms switch interval each
            # of this thread's many small Python steps could wait that long for it.
            interval = sys.getswitchinterval()
            sys.setswitchinterval(1e-4)
            try:
                finished = work()
            except Exception:  # a failure here must not end the worker: the old shard keeps serving
                error = traceback.format_exc()
            finally:
                sys.setswitchinterval(interval)
            self.stats.add_time("precopy", time.perf_counter() - t0)
            self.stats.pace = self.pacer.summary()
            if self.cancel.is_set():
                return  # the main thread answers the abort
            if error is not None or not finished:
                self.report("failed", None, error or "pre-copy stopped: another worker failed")
            else:
                self.report(stage, self.stats, None)

        self.thread = threading.Thread(target=run, name="remp-precopy", daemon=True)
        self.thread.start()

    def _agree(self, ok: bool) -> bool:
        """Every worker says whether it can go on; all go on only if all can (and nobody was told to abort)."""
        flag = torch.tensor([int(ok and not self.cancel.is_set())], dtype=torch.int32, device=self.runner.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _rest(self, busy_s: float, units: float) -> None:
        """After a burst of `busy_s` that did `units` of the round, rest as the pacer says. Local work is busy for
        this thread's CPU time: on a busy machine its wall time is mostly waiting for a core."""
        rest = self.pacer.rest(busy_s, units)
        self.stats.add_time("precopy_busy", busy_s)
        if rest > 0:
            self.stats.add_time("precopy_rest", rest)
            self.cancel.wait(rest)

    def _move(self, transfers: list, into: NewTensors | None = None) -> dict | None:
        """One chunk's transfers (every worker agreeing first); the pieces received into buffers, or None if a
        worker cannot go on. Busy time: this thread's CPU time and the transfers' wall time (their copies run
        on gloo's threads)."""
        io, cpu0, failure = self.io, time.thread_time(), None
        try:
            posts, received, sent = io.prepare(transfers, into)
        except Exception:
            posts, received, sent, failure = [], {}, [], traceback.format_exc()
        if not self._agree(failure is None):
            io.release(received, sent)
            if failure is not None:
                raise RuntimeError(failure)
            return None
        wall0 = time.perf_counter()
        io.run(posts)
        wall = time.perf_counter() - wall0
        io.release({}, sent)
        self._rest(time.thread_time() - cpu0 + wall, self._bytes(transfers))
        return received

    def _bytes(self, transfers: list) -> int:
        """What this worker sends and receives of `transfers`: the units of the pre-copy's moves."""
        return sum(self.io.piece_bytes(t.piece) for t in transfers if self.rank in (t.src, t.dst))

    def _phase_bytes(self, phase: int) -> int:
        """The new tensors of a phase this worker assembles (and builds): the units of its local work."""
        io = self.io
        return sum(
            io.piece_bytes(WeightPiece(name, lo, hi))
            for name, (lo, hi) in self.new_ranges.items()
            if tensor_layer(name) == phase and io.old_ranges.get(name) != (lo, hi)
        )

    def _weight_chunks(self) -> list[tuple[list[int], list[list[Transfer]]]]:
        """The weights round's chunks: phases merged up to about PRECOPY_CHUNK_BYTES (phase_groups), each with its
        transfers in bursts of about that size (a larger piece, such as an embedding, cut along its range). From
        the plan and shapes alone, so every worker cuts them the same."""
        plan, io = self.msg.plan, self.io
        weight_transfers = [t for t in plan.transfers if not isinstance(t.piece, KVPiece)]
        chunks = []
        for group in phase_groups(plan, self.config, io.piece_bytes, PRECOPY_CHUNK_BYTES, weights_only=True):
            bursts, burst, size = [], [], 0
            for part in (part for t in weight_transfers if t.piece.layer in group for part in self._cut(t)):
                if burst and size + io.piece_bytes(part.piece) > PRECOPY_CHUNK_BYTES:
                    bursts.append(burst)
                    burst, size = [], 0
                burst.append(part)
                size += io.piece_bytes(part.piece)
            chunks.append((group, bursts + [burst]))
        return chunks

    def _cut(self, t: Transfer) -> list[Transfer]:
        """A weight transfer as parts of at most about PRECOPY_CHUNK_BYTES, along the piece's range."""
        p = t.piece
        n, size = p.stop - p.start, self.io.piece_bytes(p)
        if size <= PRECOPY_CHUNK_BYTES:
            return [t]
        rows = max(1, n * PRECOPY_CHUNK_BYTES // size)
        return [
            Transfer(WeightPiece(p.name, a, min(a + rows, p.stop)), t.src, t.dst) for a in range(p.start, p.stop, rows)
        ]

    def _precopy_weights(self) -> bool:
        io = self.io
        chunks = self._weight_chunks()
        moves = sum(self._bytes(b) for _, bursts in chunks for b in bursts)
        self.pacer.new_round(self.msg.deadline_s, moves + sum(self._phase_bytes(p) for g, _ in chunks for p in g))
        model = self.runner.model  # None on a worker that joined holding nothing
        self.built = model.execution_layers() if model is not None else {}
        for group, bursts in chunks:
            ranges = {n: r for n, r in self.new_ranges.items() if tensor_layer(n) in group}
            into = NewTensors(io, ranges) if self.new_spec is not None else None
            received: dict = {}
            for burst in bursts:
                got = self._move(burst, into)
                if got is None:
                    io.release(received, [])
                    return False
                for key, parts in got.items():
                    received.setdefault(key, []).extend(parts)
            for phase in group:
                if self.cancel.is_set():
                    io.release(received, [])
                    return False
                cpu0 = time.thread_time()
                self._build_phase(phase, received, into)
                self._rest(time.thread_time() - cpu0, self._phase_bytes(phase))
            io.release(received, [])
        if self.new_spec is not None:
            with self.stats.timed("build"):
                self.shard = self.runner.build_shard(self.new_spec, self.weights, self.built)
            cpu0 = time.thread_time()
            self._warm_lm_head()
            self._rest(time.thread_time() - cpu0, 0)
        return True

    def _build_phase(self, phase: int, received: dict, into: NewTensors | None) -> None:
        """A phase's new weight tensors, its KV layer where it cannot be kept, its execution form (warmed up)."""
        if self.new_spec is None:
            return
        io, spec = self.io, self.new_spec
        for name, (lo, hi) in self.new_ranges.items():
            if tensor_layer(name) == phase:
                parts = received.pop(name, [])
                self.weights[name] = assemble_weight(io, name, lo, hi, parts, into)
                io.release({name: parts}, [])
        if phase < 0 or phase not in spec.layers:
            return
        if not can_keep_kv_layer(io, phase, spec.kv_heads, self.same_blocks):
            self.kv_targets[phase] = io.memory.grow(
                new_kv_layer(
                    len(spec.kv_heads), self.msg.num_blocks, io.block_size, self.config.head_dim, io.dtype, io.device
                )
            )
        with self.stats.timed("build"):
            layer = self.runner.build_layer(spec, self.weights, phase, self.built.get(phase))
        if layer is not self.built.get(phase):
            with self.stats.timed("warm_up"):
                self._warm(layer)
        self.built[phase] = layer

    def _warm(self, layer: Layer) -> None:
        """Run a new layer's linears once per batch size the new topology will see (oneDNN makes a kernel for
        each weight shape and row count on its first call, ~0.5 ms a linear: ~100 ms over SmolLM2's layers,
        which would fall into the first step after the cut-over)."""
        io = self.io
        ops = layer_ops(io.dtype, io.device)
        for rows in self.msg.warm_rows:
            x = torch.zeros(rows, self.config.hidden_size, dtype=io.dtype, device=io.device)
            layer.qkv(x)
            layer.o(torch.zeros(rows, layer.o.source.shape[1], dtype=io.dtype, device=io.device))
            layer.mlp(x, ops)

    def _warm_lm_head(self) -> None:
        head = self.shard.lm_head
        if head is not None and head is not self.built.get(-1):
            for rows in self.msg.warm_rows:
                head(torch.zeros(rows, self.config.hidden_size, dtype=self.io.dtype, device=self.io.device))

    def _copy_kv(self, flows: KVFlows, deadline_s: float) -> bool:
        """The KV of the blocks of `flows` into the new layers at their new ids: kept heads copied locally, the
        others received; a chunk of layers at a time (chunks sized from the plan, so every worker cuts them the
        same)."""
        io = self.io
        io.use_flows(flows)
        num_layers = self.config.num_hidden_layers
        total = sum(io.piece_bytes(t.piece) for t in self.kv_transfers)
        per_chunk = max(1, num_layers * PRECOPY_CHUNK_BYTES // max(1, total))
        chunks = [range(i, min(i + per_chunk, num_layers)) for i in range(0, num_layers, per_chunk)]
        moves = [[t for t in self.kv_transfers if t.piece.layer in c] for c in chunks]
        self.pacer.new_round(deadline_s, sum(self._bytes(m) for m in moves))
        for layers, transfers in zip(chunks, moves, strict=True):
            received = self._move(transfers)
            if received is None:
                return False
            cpu0 = time.thread_time()
            for layer in layers:
                if layer in self.kv_targets:
                    assemble_kv_layer(io, layer, self.new_spec.kv_heads, self.kv_targets[layer], received)
            io.release(received, [])
            self._rest(time.thread_time() - cpu0, 0)
        return True

    # ---- main thread ------------------------------------------------------------------------------------------
    def commit(self, flows: KVFlows, clean: dict[tuple[int, int], list[int]]) -> tuple[ShardState, object, SwitchStats]:
        """The pause: the KV of the blocks in use that were not pre-copied (or changed since) moves into the
        new layers. Returns the new state and the shard built during pre-copy."""
        self.thread.join()
        io, stats = self.io, self.stats
        received_before = stats.bytes_received
        t0 = time.perf_counter()
        dirty: KVFlows = {}
        for route, (old, new) in flows.items():
            done = set(clean.get(route, ()))  # already at their new ids (the driver kept the pre-copy's ids)
            pairs = [(b, n) for b, n in zip(old, new, strict=True) if b not in done]
            dirty[route] = ([b for b, _ in pairs], [n for _, n in pairs])
        io.use_flows(dirty)
        received, sent = io.exchange(self.kv_transfers)
        t1 = time.perf_counter()
        kv_layers = {}
        if self.new_spec is not None:
            for layer in self.new_spec.layers:
                target = self.kv_targets.get(layer)
                if target is None:
                    kv_layers[layer] = io.old.kv_layers[layer]
                else:
                    kv_layers[layer] = assemble_kv_layer(io, layer, self.new_spec.kv_heads, target, received)
        io.release(received, sent)
        stats.bytes_received_in_pause = stats.bytes_received - received_before
        stats.add_time("kv_transfer", t1 - t0)
        stats.add_time("kv_assemble", time.perf_counter() - t1)
        return ShardState(self.new_spec, self.weights, kv_layers), self.shard, stats

    def abort(self) -> None:
        """Stop pre-copy (all workers stop at the same chunk) and drop everything staged."""
        self.cancel.set()
        if self.thread is not None:
            self.thread.join()
        self.drop()

    def drop(self) -> None:
        """Let go of everything staged."""
        self.weights, self.kv_targets, self.built, self.shard = {}, {}, {}, None
