"""Paged attention's torch paths agree (the native kernel is checked against them in test_native_kernels.py): a
prompt's first chunk (causal flash over its own tokens) gives what the general
masked path over the paged cache gives, in a batch that mixes decode tokens, first chunks and later chunks."""

import dataclasses

import torch

from remp.model import attention
from remp.model.attention import SeqChunk, build_metadata, paged_attention, write_kv

KVH, GROUP, D, BS, BLOCKS = 2, 3, 16, 4, 40


def test_first_chunks_match_the_masked_path_over_the_cache(monkeypatch):
    monkeypatch.setattr(attention.native, "available", lambda *_: False)  # the torch paths, as on a GPU
    g = torch.Generator().manual_seed(0)
    # (tokens now, start position, blocks): a decode token, two first chunks of different lengths, a later chunk
    specs = [(1, 9, [0, 1, 2]), (7, 0, [3, 4]), (3, 0, [5]), (5, 6, [6, 7, 8])]
    chunks = [SeqChunk([1] * n, start, blocks, True) for n, start, blocks in specs]
    meta = build_metadata(chunks, BS, GROUP)
    assert [grp.fresh for grp in meta.groups] == [False, True, False]
    T = meta.num_tokens
    q = torch.randn(T, KVH, GROUP, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(T, KVH, D, generator=g, dtype=torch.float64) for _ in range(2))
    k_cache, v_cache = (torch.randn(KVH, BLOCKS, BS, D, generator=g, dtype=torch.float64) for _ in range(2))
    write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
    fast = paged_attention(q, k, v, k_cache, v_cache, meta)
    masked = dataclasses.replace(meta, groups=[dataclasses.replace(grp, fresh=False) for grp in meta.groups])
    torch.testing.assert_close(fast, paged_attention(q, k, v, k_cache, v_cache, masked), rtol=0, atol=1e-12)
