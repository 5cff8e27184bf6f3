"""Runs one shard's part of a step: weights, RoPE tables, the KV cache slice, and (on the sampler rank) sampling.

The stage logic is here once for every topology: the first stage embeds, later stages receive hidden states
from the previous one, middle stages pass them on, every rank of the last stage computes the logits of its
slice of the vocabulary, and its TP rank 0 gathers them and samples. `comm` supplies the transfers, the TP
all-reduce and the gather; it is None in a single-worker engine.
"""

from __future__ import annotations

import time
from typing import Protocol

import torch

from remp.kv_cache import KVCache
from remp.messages import StepMsg, StepResult
from remp.model.attention import build_metadata
from remp.model.checkpoint import CheckpointReader
from remp.model.decoder import DecoderShard, Layer
from remp.model.families import family_of
from remp.model.loader import load_shard_weights
from remp.model.rope import RotaryEmbedding
from remp.sampler import SamplerOutput, prompt_logprobs, sample_rows
from remp.shard_state import ShardState
from remp.sharding import ShardSpec


class StageComm(Protocol):
    def all_reduce(self, t: torch.Tensor) -> None: ...
    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor | None: ...
    def recv_hidden(self, num_tokens: int) -> torch.Tensor: ...
    def send_hidden(self, hidden: torch.Tensor) -> None: ...


class ModelRunner:
    def __init__(
        self,
        reader: CheckpointReader,
        spec: ShardSpec | None,
        dtype: torch.dtype,
        num_blocks: int,
        block_size: int,
        max_model_len: int,
        device: str = "cpu",
        comm: StageComm | None = None,
    ):
        cfg = reader.config
        self.reader, self.block_size, self.dtype, self.comm = reader, block_size, dtype, comm
        self.family = family_of(cfg)  # its shard forward and layer builder
        self.model: DecoderShard | None = None
        self.device = torch.device(device)
        self.rope = RotaryEmbedding(cfg, max_model_len, dtype, reader.rope_freq_factors(), device)
        if spec is None:  # a worker that joins a running pool: it gets its shard from a switch
            self.install(ShardState(None, {}, {}))
            return
        kv = KVCache.allocate(len(spec.layers), num_blocks, block_size, len(spec.kv_heads), cfg.head_dim, dtype, device)
        self.install(
            ShardState(spec, load_shard_weights(reader, spec, dtype, device), dict(zip(spec.layers, kv.layers)))
        )

    def install(self, state: ShardState, shard: DecoderShard | None = None) -> None:
        """Run with this shard from now on (after loading or a switch; spec None: hold nothing, take no part in
        steps); `shard` if it was built already."""
        spec = self.spec = state.spec
        if spec is None:
            self.model = self.kv = None
            return
        self.model = shard or self.build_shard(spec, state.weights)
        self.set_comm(self.comm)
        self.kv = KVCache([state.kv_layers[i] for i in spec.layers], self.block_size)

    def set_comm(self, comm: StageComm | None) -> None:
        """Talk to the other workers through `comm` from now on (the pool changed size)."""
        self.comm = comm
        if self.model is not None:
            self.model.all_reduce = comm.all_reduce if comm is not None and self.spec.tp_size > 1 else None

    def build_shard(self, spec: ShardSpec, weights: dict[str, torch.Tensor], reuse: dict | None = None) -> DecoderShard:
        """The execution form of a shard; layers of the running shard built from the same tensors are reused."""
        if reuse is None:
            reuse = self.model.execution_layers() if self.model is not None else {}
        return self.family.shard(self.family, self.reader.config, spec, weights, self.rope, None, reuse)

    def build_layer(
        self, spec: ShardSpec, weights: dict[str, torch.Tensor], layer: int, reuse: Layer | None = None
    ) -> Layer:
        """One layer's execution form (`reuse` itself if built from the same tensors), ahead of build_shard."""
        return self.family.layer(self.reader.config, spec, weights, layer, reuse)

    def state(self) -> ShardState:
        if self.spec is None:
            return ShardState(None, {}, {})
        return ShardState(self.spec, dict(self.model.weights), dict(zip(self.spec.layers, self.kv.layers)))

    def detach(self, keep_layers: set[int]) -> tuple[ShardState, dict]:
        """Hand the shard over to a switch that consumes it as it goes: the state, and the execution form of
        the layers in `keep_layers` (to reuse). This runner holds nothing until install()."""
        state, layers = self.state(), self.model.execution_layers() if self.model is not None else {}
        self.model = self.kv = None
        return state, {i: layers[i] for i in keep_layers if i in layers}

    @torch.inference_mode()
    def run(self, msg: StepMsg) -> StepResult | None:
        t0 = time.perf_counter()
        meta = build_metadata(msg.chunks, self.block_size, self.model.q_per_kv).to(self.device)
        if self.spec.is_first_stage:
            ids = torch.tensor([t for c in msg.chunks for t in c.token_ids], dtype=torch.long, device=self.device)
            hidden = self.model.embed(ids)
        else:
            hidden = self.comm.recv_hidden(meta.num_tokens)
        hidden = self.model.forward(hidden, meta, self.kv)
        if not self.spec.is_last_stage:
            self.comm.send_hidden(hidden)
            return None
        if not len(meta.logits_rows):  # only partial prefill chunks: nothing to sample, but the driver awaits one
            sampled = SamplerOutput([], [], [], None)
            return StepResult(msg.step_id, sampled, time.perf_counter() - t0) if self.spec.is_sampler else None
        logits = self.model.logits(hidden[meta.logits_rows])
        logits = logits.double() if self.dtype == torch.float64 else logits.float()
        if self.spec.tp_size > 1:  # each TP rank computed its slice of the vocabulary
            logits = self.comm.gather_vocab(logits)
        if not self.spec.is_sampler:
            return None
        n = meta.num_sampled
        sampled = sample_rows(logits[:n], msg.rows) if n else SamplerOutput([], [], [], None)
        prompt = prompt_logprobs(logits[n:], msg.chunks) if len(logits) > n else None
        return StepResult(msg.step_id, sampled, time.perf_counter() - t0, prompt)
