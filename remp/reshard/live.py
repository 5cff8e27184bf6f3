"""Worker side of a live switch: the weights, and most of the KV cache, move while this worker keeps running
steps; the pause only moves the KV blocks written since and swaps the shard.

Pre-copy runs in a background thread, on the switch's own process group (so its messages never mix with the
steps' hidden states and all-reduces), in two rounds:
1. weights: the weight pieces of the plan move in chunks, every worker agreeing before each chunk whether to
   go on (an abort or a local error on any worker stops them all at the same point); the thread then
   assembles the new weight tensors, allocates the KV layers that cannot be kept, and builds the new shard's
   execution form (fused / packed linears), so none of that is left for the pause;
2. KV: the driver names blocks that are full (append-only: never written again while their request holds
   them); their slices move into the new layers, by layer, with the same agreement.
At the cut-over the driver says which of those blocks are still clean (same request, same place); only the
others move. The old shard is only read, never changed, until then. The thread keeps itself to `duty` of the
time, resting between chunks, so that serving slows down only a little.
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
from remp.planner.plan import KVPiece, weight_ranges
from remp.reshard.execute import (
    Memory,
    PieceIO,
    assemble_kv_layer,
    assemble_weight,
    can_keep_kv_layer,
    phase_groups,
)
from remp.shard_state import ShardState

PRECOPY_CHUNK_BYTES = 16 << 20  # small chunks: short bursts of copying between serving steps


class LiveSwitch:
    def __init__(
        self,
        rank: int,
        msg: PrepareSwitch,
        runner,
        group,
        report: Callable[[str, SwitchStats | None, str | None], None],
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
        old_kv = next(iter(self.io.old.kv_layers.values()), None)
        # its layers stay if its new replica takes only its old replica's blocks (the driver keeps their ids then)
        only_own = [s for s, ds in plan.routes.items() if new_replica in ds] == [old_replica]
        self.same_blocks = old_kv is not None and old_kv.shape[2] == msg.num_blocks and only_own
        self.kv_transfers = [t for t in plan.transfers if isinstance(t.piece, KVPiece)]
        self.cancel = threading.Event()
        self.weights: dict[str, torch.Tensor] = {}
        self.kv_targets: dict[int, torch.Tensor] = {}
        self.shard = None
        self.thread: threading.Thread | None = None

    # ---- rounds (each in a background thread) ------------------------------------------------------------------
    def start(self) -> None:
        self._background(self._precopy_weights, "precopied")

    def precopy_kv(self, flows: KVFlows) -> None:
        self.thread.join()
        self._background(lambda: self._copy_kv(flows), "kv_precopied")

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

    def _rest(self, busy_s: float) -> None:
        duty = self.msg.precopy_duty
        if 0 < duty < 1:
            self.cancel.wait(busy_s * (1 / duty - 1))

    def _chunks(self, transfers_of_chunks: list[list], on_chunk: Callable[[dict], None]) -> bool:
        """Move the chunks in turn (agreeing before each), handing each chunk's received buffers to on_chunk.
        Busy time counts this thread's CPU time for local work (on a busy machine its wall time is mostly
        waiting for a core) and the wall time of the transfers (their copies run on gloo's threads)."""
        io = self.io
        for transfers in transfers_of_chunks:
            cpu0, failure = time.thread_time(), None
            try:
                posts, received, sent = io.prepare(transfers)
            except Exception:
                posts, received, sent, failure = [], {}, [], traceback.format_exc()
            if not self._agree(failure is None):
                io.release(received, sent)
                if failure is not None:
                    raise RuntimeError(failure)
                return False
            wall0 = time.perf_counter()
            io.run(posts)
            wall = time.perf_counter() - wall0
            io.release({}, sent)
            on_chunk(received)
            self._rest(time.thread_time() - cpu0 + wall)
        return True

    def _precopy_weights(self) -> bool:
        plan, io = self.msg.plan, self.io
        weight_transfers = [t for t in plan.transfers if not isinstance(t.piece, KVPiece)]
        groups = phase_groups(plan, self.config, io.piece_bytes, PRECOPY_CHUNK_BYTES, weights_only=True)
        received: dict = {}

        def keep(chunk: dict) -> None:
            for key, parts in chunk.items():
                received.setdefault(key, []).extend(parts)

        if not self._chunks([[t for t in weight_transfers if t.piece.layer in g] for g in groups], keep):
            io.release(received, [])
            return False
        return self._assemble(received)

    def _assemble(self, received: dict) -> bool:
        """New weight tensors, new KV layers, the new shard's execution form: all before the pause."""
        if self.new_spec is None:
            return True
        io = self.io
        for name, (lo, hi) in weight_ranges(self.config, self.new_spec).items():
            if self.cancel.is_set():
                return False
            t0 = time.thread_time()
            parts = received.pop(name, [])
            self.weights[name] = assemble_weight(io, name, lo, hi, parts)
            io.release({name: parts}, [])
            self._rest(time.thread_time() - t0)
        for layer in self.new_spec.layers:
            if not can_keep_kv_layer(io, layer, self.new_spec.kv_heads, self.same_blocks):
                self.kv_targets[layer] = io.memory.grow(
                    new_kv_layer(
                        len(self.new_spec.kv_heads),
                        self.msg.num_blocks,
                        io.block_size,
                        self.config.head_dim,
                        io.dtype,
                        io.device,
                    )  # fmt: skip
                )
        # the execution form layer by layer (fused copies, packing), resting in between; unchanged layers reused
        model = self.runner.model  # None on a worker that joined holding nothing
        t_build, built = time.perf_counter(), model.execution_layers() if model is not None else {}
        for layer in self.new_spec.layers:
            if self.cancel.is_set():
                return False
            t0 = time.thread_time()
            built[layer] = self.runner.build_layer(self.new_spec, self.weights, layer, built.get(layer))
            self._rest(time.thread_time() - t0)
        self.shard = self.runner.build_shard(self.new_spec, self.weights, built)
        self.stats.add_time("build", time.perf_counter() - t_build)
        return True

    def _copy_kv(self, flows: KVFlows) -> bool:
        """The KV of the blocks of `flows` into the new layers at their new ids: kept heads copied locally, the
        others received; a chunk of layers at a time (chunks sized from the plan, so every worker cuts them the
        same)."""
        io = self.io
        io.use_flows(flows)
        num_layers = self.config.num_hidden_layers
        total = sum(io.piece_bytes(t.piece) for t in self.kv_transfers)
        per_chunk = max(1, num_layers * PRECOPY_CHUNK_BYTES // max(1, total))
        chunks = [range(i, min(i + per_chunk, num_layers)) for i in range(0, num_layers, per_chunk)]
        order = iter(chunks)

        def fill(received: dict) -> None:
            for layer in next(order):
                if layer in self.kv_targets:
                    assemble_kv_layer(io, layer, self.new_spec.kv_heads, self.kv_targets[layer], received)
            io.release(received, [])

        return self._chunks([[t for t in self.kv_transfers if t.piece.layer in c] for c in chunks], fill)

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
        self.weights, self.kv_targets, self.shard = {}, {}, None
