"""Worker side of a live switch: the weights move while this worker keeps running steps; the pause only moves
the KV cache and swaps the shard.

Pre-copy runs in a background thread, on the switch's own process group (so its messages never mix with the
steps' hidden states and all-reduces): the weight pieces of the plan move in chunks, every worker agreeing
before each chunk whether to go on (an abort or a local error on any worker stops them all at the same
point); the thread then assembles the new weight tensors, allocates the KV layers that cannot be kept, and
builds the new shard's execution form (fused / packed linears), so none of that is left for the pause. It
keeps itself to `duty` of the wall time, sleeping between chunks, so that serving slows down only a little.
The old shard is only read, never changed, until the cut-over.
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
from remp.messages import PrepareSwitch
from remp.switch.execute import (
    Memory,
    PieceIO,
    ShardState,
    SwitchStats,
    assemble_kv_layer,
    assemble_weight,
    can_keep_kv_layer,
    phase_groups,
)
from remp.switch.plan import KVPiece, weight_ranges

PRECOPY_CHUNK_BYTES = 16 << 20  # small chunks: short bursts of copying between serving steps


class Cancelled(Exception):
    pass


class LiveSwitch:
    def __init__(
        self,
        rank: int,
        msg: PrepareSwitch,
        runner,
        group,
        on_precopied: Callable[[SwitchStats | None, str | None], None],
    ):
        self.rank, self.msg, self.runner, self.group = rank, msg, runner, group
        self.config = runner.reader.config
        self.on_precopied = on_precopied  # (stats, None) when done; (None, error) when this worker failed
        self.stats = SwitchStats()
        self.memory = Memory(self.stats)
        self.io = PieceIO(
            rank, self.config, runner.state(), [], runner.block_size, runner.dtype, runner.device, group,
            self.stats, self.memory, runner.reader,
        )  # fmt: skip
        plan = msg.plan
        self.new_spec = plan.new.spec(self.config, rank) if plan.new.coordinate(rank) is not None else None
        old_kv = next(iter(self.io.old.kv_layers.values()), None)
        self.same_blocks = old_kv is not None and old_kv.shape[2] == msg.num_blocks
        self.cancel = threading.Event()
        self.weights: dict[str, torch.Tensor] = {}
        self.kv_targets: dict[int, torch.Tensor] = {}
        self.shard = None
        self.thread = threading.Thread(target=self._precopy, name="remp-precopy", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # ---- background -------------------------------------------------------------------------------------
    def _agree(self, ok: bool) -> bool:
        """Every worker says whether it can go on; all go on only if all can (and nobody was told to abort)."""
        flag = torch.tensor([int(ok and not self.cancel.is_set())], dtype=torch.int32, device=self.runner.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)
        return bool(flag.item())

    def _rest(self, cpu_s: float) -> None:
        """Sleep so that this thread's CPU time stays `duty` of the wall time (CPU, not wall time, is what
        it takes from the steps; on a busy machine its wall time is mostly waiting for a core)."""
        duty = self.msg.precopy_duty
        if 0 < duty < 1:
            self.cancel.wait(cpu_s * (1 / duty - 1))

    def _precopy(self) -> None:
        t0, error = time.perf_counter(), None
        # The main thread holds the GIL between its torch calls; with the default 5 ms switch interval each of
        # this thread's many small Python steps could wait that long for it.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-4)
        try:
            received = self._move_weights()
            if received is not None:
                self._assemble(received)
        except Exception:  # a failure here must not end the worker: the old shard keeps serving
            error = traceback.format_exc()
        finally:
            sys.setswitchinterval(interval)
        self.stats.add_time("precopy", time.perf_counter() - t0)
        if self.cancel.is_set():
            return  # the main thread answers the abort
        if error is not None or self.shard is None and self.new_spec is not None:
            self.on_precopied(None, error or "pre-copy stopped: another worker failed")
        else:
            self.on_precopied(self.stats, None)

    def _move_weights(self) -> dict | None:
        """Every weight piece of the plan into this worker's staging buffers; None if the workers stopped."""
        plan, io = self.msg.plan, self.io
        weight_transfers = [t for t in plan.transfers if not isinstance(t.piece, KVPiece)]
        received: dict = {}
        for phases in phase_groups(plan, self.config, io.piece_bytes, PRECOPY_CHUNK_BYTES, weights_only=True):
            t0, failure = time.thread_time(), None
            try:
                posts, chunk, sent = io.prepare([t for t in weight_transfers if t.piece.layer in phases])
            except Exception:
                posts, chunk, sent, failure = [], {}, [], traceback.format_exc()
            if not self._agree(failure is None):
                io.release(chunk, sent)
                io.release(received, [])
                if failure is not None:
                    raise RuntimeError(failure)
                return None
            io.run(posts)
            io.release({}, sent)
            for key, parts in chunk.items():
                received.setdefault(key, []).extend(parts)
            self._rest(time.thread_time() - t0)
        return received

    def _assemble(self, received: dict) -> None:
        """New weight tensors, new KV layers, the new shard's execution form: all before the pause."""
        if self.new_spec is None:
            return
        io = self.io
        for name, (lo, hi) in weight_ranges(self.config, self.new_spec).items():
            if self.cancel.is_set():
                return
            t0 = time.thread_time()
            parts = received.pop(name, [])
            self.weights[name] = assemble_weight(io, name, lo, hi, parts)
            for _, buf in parts:
                io.memory.release(buf)
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
        t0 = time.perf_counter()
        self.shard = self.runner.build_shard(self.new_spec, self.weights)
        self.stats.add_time("build", time.perf_counter() - t0)

    # ---- main thread ------------------------------------------------------------------------------------------
    def commit(self, used_blocks: list[int], new_block_ids: list[int]) -> tuple[ShardState, object, SwitchStats]:
        """The pause: the KV of the blocks in use moves, the new KV layers are filled. Returns the new state and
        the shard built during pre-copy."""
        self.thread.join()
        io, stats = self.io, self.stats
        io.use_blocks(used_blocks)
        received_before = stats.bytes_received
        t0 = time.perf_counter()
        received, sent = io.exchange([t for t in self.msg.plan.transfers if isinstance(t.piece, KVPiece)])
        stats.bytes_received_in_pause = stats.bytes_received - received_before
        kv_layers = {}
        if self.new_spec is not None:
            new_ids = torch.tensor(new_block_ids, dtype=torch.long, device=io.device)
            for layer in self.new_spec.layers:
                target = self.kv_targets.get(layer)
                kv_layers[layer] = (
                    io.old.kv_layers[layer]
                    if target is None
                    else assemble_kv_layer(io, layer, self.new_spec.kv_heads, target, new_ids, received)
                )
        io.release(received, sent)
        stats.add_time("kv", time.perf_counter() - t0)
        return ShardState(self.new_spec, self.weights, kv_layers), self.shard, stats

    def abort(self) -> None:
        """Stop pre-copy (all workers stop at the same chunk) and drop everything staged."""
        self.cancel.set()
        self.thread.join()
        self.weights, self.kv_targets, self.shard = {}, {}, None
