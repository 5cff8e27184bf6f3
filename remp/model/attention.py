"""Paged attention over a varlen batch that mixes prefill chunks and decode tokens.

Tokens of all sequences are flattened into one batch for the projections. For attention, sequences are
grouped (decode: one query; prefill: several), padded within the group, and their keys/values gathered from
the paged cache through the block tables; one scaled_dot_product_attention call per group and layer. The
q heads that share a KV head are folded into the query axis ([kv, B, group*Q, D]), so GQA needs no copy of K/V.
The cache is head-major ([kv_heads, blocks, block_size, D] per layer): gathers copy contiguous rows, and a
TP shard's heads are a contiguous slice.

On CPU every group goes to a native kernel that reads the blocks in place (`remp/kernels/paged_attention.cpp`:
3x faster or more than gather + matmuls at decode, and a prefill step 2% faster than with flash attention for
first chunks, which spends its time copying into the padded layout); the torch paths above stay for other
devices and where no compiler is available.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from remp.kernels import attention as native


class SeqChunk(NamedTuple):
    """One sequence's share of a step: tokens to compute now, starting at position `start_pos`."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool  # logits of the last token are wanted (prompt complete)
    # prompt logprobs: (top-k, the next prompt token of each of the chunk's first len(targets) tokens)
    prompt_logprobs: tuple[int, tuple[int, ...]] | None = None


@dataclass
class AttnGroup:
    token_index: torch.Tensor  # [B*Qmax] flat token feeding each padded query row
    out_rows: torch.Tensor  # [Tg] padded rows that are real tokens, in order
    token_rows: torch.Tensor  # [Tg] flat token index of each of those rows
    block_tables: torch.Tensor  # [B, blocks]
    mask: torch.Tensor  # [B, group*Qmax, blocks*block_size] True = attend
    starts: torch.Tensor  # [B] flat index of each sequence's first token in this step
    qlens: torch.Tensor  # [B] its tokens in this step
    ctxs: torch.Tensor  # [B] its context once they are in
    batch: int
    qmax: int
    fresh: bool  # every chunk starts at position 0: causal over its own tokens, nothing read from the cache


@dataclass
class AttnMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] cache slot written by each token
    groups: list[AttnGroup]
    logits_rows: torch.Tensor  # flat token indices whose logits are wanted: the sampled ones, then prompt rows
    num_tokens: int
    num_sampled: int = 0  # the first rows of logits_rows are sampled; the others give prompt logprobs

    def to(self, device: torch.device) -> AttnMetadata:
        if device.type == "cpu":
            return self
        move = lambda t: t.to(device, non_blocking=True)
        groups = [
            AttnGroup(*(move(x) if isinstance(x, torch.Tensor) else x for x in vars(g).values())) for g in self.groups
        ]
        return AttnMetadata(
            move(self.positions), move(self.slot_mapping), groups, move(self.logits_rows), self.num_tokens,
            self.num_sampled,
        )  # fmt: skip


def build_metadata(chunks: list[SeqChunk], block_size: int, q_per_kv: int) -> AttnMetadata:
    positions, slots, logits_rows, prompt_rows = [], [], [], []
    starts, t = [], 0
    for c in chunks:
        n = len(c.token_ids)
        pos = range(c.start_pos, c.start_pos + n)
        positions.extend(pos)
        slots.extend(c.block_table[p // block_size] * block_size + p % block_size for p in pos)
        starts.append(t)
        if c.prompt_logprobs is not None:
            prompt_rows.extend(range(t, t + len(c.prompt_logprobs[1])))
        t += n
        if c.sample:
            logits_rows.append(t - 1)
    decode = [i for i, c in enumerate(chunks) if len(c.token_ids) == 1]
    first = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1 and c.start_pos == 0]
    later = [i for i, c in enumerate(chunks) if len(c.token_ids) > 1 and c.start_pos > 0]
    groups = [
        _group([chunks[i] for i in idx], [starts[i] for i in idx], block_size, q_per_kv, idx is first)
        for idx in (decode, first, later)
        if idx
    ]
    return AttnMetadata(
        torch.tensor(positions, dtype=torch.long),
        torch.tensor(slots, dtype=torch.long),
        groups,
        torch.tensor(logits_rows + prompt_rows, dtype=torch.long),
        t,
        len(logits_rows),
    )


def _group(chunks: list[SeqChunk], starts: list[int], block_size: int, q_per_kv: int, fresh: bool) -> AttnGroup:
    qlens = torch.tensor([len(c.token_ids) for c in chunks])
    ctx = torch.tensor([c.start_pos + len(c.token_ids) for c in chunks])
    batch, qmax = len(chunks), int(qlens.max())
    nblocks = max(-(-int(c) // block_size) for c in ctx)
    tables = torch.zeros(batch, nblocks, dtype=torch.long)
    for b, c in enumerate(chunks):
        used = -(-(c.start_pos + len(c.token_ids)) // block_size)
        tables[b, :used] = torch.tensor(c.block_table[:used])
    i = torch.arange(qmax)
    q_i = torch.minimum(i[None, :], qlens[:, None] - 1)  # padded rows repeat the last query
    token_index = (torch.tensor(starts)[:, None] + q_i).reshape(-1)
    q_pos = ctx[:, None] - qlens[:, None] + q_i  # [B, Qmax] absolute positions
    keys = torch.arange(nblocks * block_size)
    mask = keys[None, None, :] <= q_pos[:, :, None]  # causal, and within the context
    mask = mask[:, None].expand(batch, q_per_kv, qmax, keys.numel())
    valid = (i[None, :] < qlens[:, None]).reshape(-1)
    out_rows = torch.nonzero(valid).squeeze(1)
    return AttnGroup(
        token_index=token_index,
        out_rows=out_rows,
        token_rows=token_index[out_rows],
        block_tables=tables,
        mask=mask.reshape(batch, q_per_kv * qmax, -1),
        starts=torch.tensor(starts),
        qlens=qlens,
        ctxs=ctx,
        batch=batch,
        qmax=qmax,
        fresh=fresh,
    )


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """k, v: [T, kv_heads, D] -> cache slots. Caches are head-major: [kv_heads, num_blocks, block_size, D]."""
    kvh, D = k_cache.shape[0], k_cache.shape[-1]
    k_cache.view(kvh, -1, D).index_copy_(1, slots, k.transpose(0, 1))
    v_cache.view(kvh, -1, D).index_copy_(1, slots, v.transpose(0, 1))


def _gather(cache: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """[kvh, NB, bs, D] gathered through block tables [B, n] -> [kvh, B, n * bs, D], contiguous.
    index_select copies whole blocks (advanced indexing is ~10x slower), one head at a time: along the first
    dimension it is ~2x faster than along the second."""
    kvh, _, bs, D = cache.shape
    idx = tables.view(-1)
    out = cache.new_empty(kvh, idx.numel(), bs, D)
    for h in range(kvh):
        torch.index_select(cache[h], 0, idx, out=out[h])
    return out.view(kvh, tables.shape[0], tables.shape[1] * bs, D)


def paged_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttnMetadata
) -> torch.Tensor:
    """q: [T, kv_heads, q_per_kv, D], this step's k, v: [T, kv_heads, D] -> [T, kv_heads * q_per_kv * D]. The new
    K/V must already be written to the cache."""
    T, kvh, group, D = q.shape
    out = q.new_empty(T, kvh * group * D)
    if native.available(q.dtype, q.device):  # every group, first chunks included: the new K/V are in the cache
        for g in meta.groups:
            native.paged_attention_into(out, q, k_cache, v_cache, g.starts, g.qlens, g.ctxs, g.block_tables)
        return out
    for g in meta.groups:
        B, Q = g.batch, g.qmax
        if g.fresh:  # [B, heads, Q, D]; query head h reads KV head h // group, as enable_gqa does
            qg, kg, vg = (x.index_select(0, g.token_index).view(B, Q, -1, D).transpose(1, 2) for x in (q, k, v))
            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True, enable_gqa=True)
            out[g.token_rows] = o.transpose(1, 2).reshape(B * Q, kvh * group * D).index_select(0, g.out_rows)
            continue
        qg = q.index_select(0, g.token_index).view(B, Q, kvh, group, D).permute(2, 0, 3, 1, 4)
        qg = qg.reshape(kvh, B, group * Q, D)
        kg, vg = _gather(k_cache, g.block_tables), _gather(v_cache, g.block_tables)
        if Q == 1:
            o = _small_attention(qg, kg, vg, g.mask)
        else:
            o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask)  # [kvh, B, group*Q, D]
        o = o.view(kvh, B, group, Q, D).permute(1, 3, 0, 2, 4).reshape(B * Q, kvh * group * D)
        out[g.token_rows] = o.index_select(0, g.out_rows)
    return out


def _small_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q k^T) v for decode: at a handful of query rows per sequence this beats the CPU
    flash kernel several times over. Softmax runs in float32 (float64 for float64 models)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q, k.transpose(-1, -2)).to(acc) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.masked_fill_(~mask, float("-inf")), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)
