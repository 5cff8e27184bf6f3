"""Runs one shard's forward pass over a step's chunks: weights, RoPE tables and the KV cache slice."""

from __future__ import annotations

import torch

from remp.kv_cache import KVCache
from remp.model.attention import SeqChunk, build_metadata
from remp.model.llama import LlamaShard
from remp.model.loader import load_shard_weights
from remp.model.reader import CheckpointReader
from remp.model.rope import RotaryEmbedding
from remp.sharding import ShardSpec


class ModelRunner:
    def __init__(self, reader: CheckpointReader, spec: ShardSpec, dtype: torch.dtype, num_blocks: int,
                 block_size: int, max_model_len: int, device: str = "cpu"):
        cfg = reader.config
        self.block_size = block_size
        self.dtype = dtype
        rope = RotaryEmbedding(cfg, max_model_len, dtype, reader.rope_freq_factors())
        self.model = LlamaShard(cfg, spec, load_shard_weights(reader, spec, dtype, device), rope)
        self.kv = KVCache(len(spec.layers), num_blocks, block_size, len(spec.kv_heads), cfg.head_dim, dtype, device)

    @torch.inference_mode()
    def execute(self, chunks: list[SeqChunk]) -> torch.Tensor:
        """Logits ([sampled chunks, vocab], float32 or float64) of the last token of every chunk with sample=True."""
        meta = build_metadata(chunks, self.block_size, self.model.q_per_kv)
        ids = torch.tensor([t for c in chunks for t in c.token_ids], dtype=torch.long)
        hidden = self.model.forward(self.model.embed(ids), meta, self.kv)
        logits = self.model.logits(hidden[meta.logits_rows])
        return logits.double() if self.dtype == torch.float64 else logits.float()
