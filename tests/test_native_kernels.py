"""The native kernels give what their torch references give, in float64 to 1e-12, in float32 and bfloat16 to their
precision. Paged attention (against the torch paths: flash for first chunks, gather through the block tables and
masked softmax for the rest): decode tokens, first and later prefill chunks longer than its row tile, contexts
that end mid-block, q read through strides as the model passes it. The fused layer ops: residual add + RMSNorm,
SiLU * up, RoPE + cache write. Sampling: greedy, temperature, banned tokens, NaN rows. Bounds checks, and
independence from the thread count and the batch."""

import math
import os
import shutil
import time

import numpy as np
import pytest
import torch

from remp.cpu_features import cpu_features
from remp.kernels import attention as native
from remp.kernels import build
from remp.kernels import layer_ops as native_ops
from remp.model import attention
from remp.model.attention import SeqChunk, build_metadata, paged_attention, write_kv
from remp.model.families import config_from_hf
from remp.model.layer_ops import TorchOps
from remp.model.rope import RotaryEmbedding
from remp.tools.random_model import tiny_config

KVH, BS, BLOCKS = 3, 4, 160


def _case(dtype: torch.dtype, group: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(BLOCKS, generator=g).tolist()
    # (tokens now, start position): decode tokens, later chunks (one of 23 tokens: 23 * group rows span several
    # tiles of the kernel), and a first chunk (flash attention on the torch path)
    specs = [(1, 9), (1, 0), (23, 17), (1, 62), (5, 6), (12, 0), (1, 33)]
    chunks, used = [], 0
    for n, start in specs:
        nblocks = -(-(start + n) // BS)
        chunks.append(SeqChunk([1] * n, start, perm[used : used + nblocks], True))
        used += nblocks
    meta = build_metadata(chunks, BS, group)
    T = meta.num_tokens
    # q as the model passes it: the first heads of a [T, q + k heads, D] tensor, so rows are strided
    qk = torch.randn(T, KVH * group + KVH, D, generator=g).to(dtype)
    q = qk[:, : KVH * group].view(T, KVH, group, D)
    k, v = (torch.randn(T, KVH, D, generator=g).to(dtype) for _ in range(2))
    kv = torch.randn(2, KVH, BLOCKS, BS, D, generator=g).to(dtype)
    write_kv(kv[0], kv[1], meta.slot_mapping, k, v)
    return q, k, v, kv[0], kv[1], meta


@pytest.mark.parametrize(
    "dtype, group, D, tol",
    [
        (torch.float64, 3, 64, 1e-12),
        (torch.float64, 1, 128, 1e-12),
        (torch.float64, 2, 24, 1e-12),
        (torch.float32, 3, 64, 2e-6),  # the 8-lane path (AVX2) from here on, but for D 24
        (torch.float32, 1, 128, 2e-6),
        (torch.float32, 8, 64, 2e-6),
        (torch.float32, 2, 24, 2e-6),
        (torch.bfloat16, 3, 64, 2e-2),
        (torch.bfloat16, 2, 128, 2e-2),
    ],
)
def test_native_kernel_matches_the_torch_path(monkeypatch, dtype, group, D, tol):
    assert native.available(dtype, torch.device("cpu"))
    q, k, v, k_cache, v_cache, meta = _case(dtype, group, D)
    fast = paged_attention(q, k, v, k_cache, v_cache, meta)
    monkeypatch.setattr(attention.native, "available", lambda *_: False)
    slow = paged_attention(q, k, v, k_cache, v_cache, meta)
    torch.testing.assert_close(fast.double(), slow.double(), rtol=0, atol=tol)


# (rtol, atol): bf16 within one unit in the last place (exp differs far below it)
TOLERANCE = {torch.float64: (1e-12, 1e-12), torch.float32: (2e-6, 2e-6), torch.bfloat16: (8e-3, 1e-6)}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_fused_layer_ops_match_torch(dtype):
    assert native_ops.available(dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)
    close = lambda a, b: torch.testing.assert_close(
        a.double(), b.double(), rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1]
    )
    T, H, I, qh, kvh, D = 37, 96, 160, 6, 2, 16
    # RMSNorm after the residual add, and on its own (a shard's first norm); the residual is updated in place
    for delta in (rnd(T, H), None):
        res_a, res_b, w = rnd(T, H, scale=3), None, rnd(H)
        res_b = res_a.clone()
        close(native_ops.add_rms_norm(res_a, delta, w, 1e-5), TorchOps.add_rms_norm(res_b, delta, w, 1e-5))
        close(res_a, res_b)
    # SiLU over a range where exp over- and underflows
    gate_up = rnd(T, 2 * I, scale=30)
    close(native_ops.silu_mul(gate_up), TorchOps.silu_mul(gate_up))
    # RoPE on q and k in place, then k and v into the cache at scattered slots
    cfg = config_from_hf(tiny_config())  # 6 q heads, 2 KV heads of 16
    rope = RotaryEmbedding(cfg, 512, dtype)
    cos, sin = rope.tables(torch.randint(0, 512, (T,), generator=g))
    slots = torch.randperm(40 * 4, generator=g)[:T]
    qkv_a = rnd(T, (qh + 2 * kvh) * D)
    qkv_b = qkv_a.clone()
    cache_a = rnd(2, kvh, 40, 4, D)
    cache_b = cache_a.clone()
    native_ops.rope_cache(qkv_a, cos, sin, qh, kvh, cache_a[0], cache_a[1], slots)
    TorchOps.rope_cache(qkv_b, cos, sin, qh, kvh, cache_b[0], cache_b[1], slots)
    close(qkv_a, qkv_b)
    close(cache_a, cache_b)


def test_the_kernels_build_where_a_compiler_is():
    # what keeps the fast path from quietly turning into the fallback on a machine that can build it
    assert shutil.which("c++"), "no C++ compiler on this machine"
    assert all(build.load(source) is not None for source in build.SOURCES)
    cpu = cpu_features()
    if {"avx2", "fma"} <= cpu.flags:  # ... nor attention's vector path into its plain loops
        assert build.load("paged_attention.cpp").remp_paged_attention_simd8() == 1


def test_a_new_build_sweeps_the_stale_ones_of_its_kernel(monkeypatch, tmp_path):
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path))
    folder = tmp_path / "kernels"
    folder.mkdir()
    month_ago = time.time() - (build.STALE_DAYS + 1) * 86400
    files = {name: folder / name for name in ("sampling-0ld.so", "sampling-recent.so", "layer_ops-0ld.so", "tmpx.so")}
    for name, path in files.items():
        path.write_bytes(b"")
        if name != "sampling-recent.so":
            os.utime(path, (month_ago, month_ago))
    assert build.load.__wrapped__("sampling.cpp") is not None
    left = {p.name for p in folder.iterdir()}
    assert {"sampling-recent.so", "layer_ops-0ld.so"} <= left  # used lately / another kernel's: kept
    assert not {"sampling-0ld.so", "tmpx.so"} & left  # unused for a month / left by a killed build: gone
    built = next(p for p in folder.glob("sampling-*.so") if p.name != "sampling-recent.so")
    os.utime(built, (month_ago, month_ago))
    build.load.__wrapped__("sampling.cpp")  # loading a cached build keeps it fresh
    assert time.time() - built.stat().st_mtime < 3600


def test_without_a_working_compiler_the_torch_path_runs(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path))
    assert build.load.__wrapped__("paged_attention.cpp") is None
    assert "no C++ compiler" in caplog.text
    broken = tmp_path / "cxx"
    broken.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CXX", str(broken))
    assert build.load.__wrapped__("paged_attention.cpp") is None
    assert "broken compiler" in caplog.text
    monkeypatch.delenv("CXX")  # a working compiler again: only the switch turns the kernels off
    for off in ("0", "false", "off"):
        monkeypatch.setenv("REMP_NATIVE_KERNELS", off)
        assert build.load.__wrapped__("paged_attention.cpp") is None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_sampling_matches_the_torch_path(monkeypatch, dtype):
    from remp import sampler
    from remp.sampling_params import SamplingParams

    assert sampler.native.available(dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(2)
    B, V = 24, 5000
    logits = (torch.randn(B, V, generator=g) * 4).to(dtype)
    logits[5, 100:] = float("-inf")  # a temperature row with most of its vocabulary banned
    logits[6, 7] = logits[6, 9] = logits[6].max() + 1  # a tie for the greedy token (row 6): the lower id wins
    logits[9, 300] = logits[9, 4000] = logits[9].max() + 1  # ... past the kernel's first block of 256
    params = [
        SamplingParams(temperature=0.0 if i % 3 == 0 else 0.3 + 0.1 * i, seed=i, logprobs=2 if i == 4 else None)
        for i in range(B)
    ]
    gens = lambda: [sampler.make_generator(1000 + i) for i in range(B)]
    fast = sampler.sample(logits.clone(), params, gens())
    monkeypatch.setattr(sampler.native, "available", lambda *_: False)
    slow = sampler.sample(logits.clone(), params, gens())
    assert fast.token_ids == slow.token_ids
    assert params[6].greedy and fast.token_ids[6] == 7 and fast.token_ids[9] == 300
    assert fast.ranks == slow.ranks
    assert not params[5].greedy and fast.token_ids[5] < 100
    torch.testing.assert_close(torch.tensor(fast.logprobs), torch.tensor(slow.logprobs), rtol=0, atol=1e-5)
    assert fast.top_logprobs[4][0][0] == slow.top_logprobs[4][0][0]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_sampling_never_draws_a_banned_or_weightless_token(dtype):
    from remp.kernels import sampling

    logits = torch.full((5, 1000), float("-inf"), dtype=dtype)
    logits[:, 500] = logits[:, 997] = 0.0
    logits[:, 3] = -1e4  # finite, but e^-20000 has no weight in either dtype: u = 0 must not pick it
    temps = torch.tensor([0.5] * 5, dtype=torch.float64)
    u = torch.tensor([0.0, 0.4999, 0.5001, 1 - 1e-12, 1.0], dtype=torch.float64)  # both ends of each interval
    token, logprob, rank = sampling.sample(logits, temps, u)
    assert token.tolist() == [500, 500, 997, 997, 997]  # never 3, never a banned id, never the last id 999
    torch.testing.assert_close(logprob, torch.full((5,), math.log(0.5), dtype=torch.float64), rtol=0, atol=1e-6)
    assert rank.tolist() == [1, 1, 1, 1, 1]


def test_native_sampling_of_nan_and_infinite_rows_follows_torch(monkeypatch):
    from remp import sampler
    from remp.sampling_params import SamplingParams

    logits = torch.randn(4, 300)
    logits[0] = float("nan")  # all NaN: the worker must not crash
    logits[1, 17] = float("nan")  # one NaN: argmax takes it, as torch's does
    logits[2] = float("-inf")  # nothing left to sample
    logits[3, 40] = float("inf")
    params = [SamplingParams(temperature=0.0)] * 4
    fast = sampler.sample(logits.clone(), params, [None] * 4)
    monkeypatch.setattr(sampler.native, "available", lambda *_: False)
    slow = sampler.sample(logits.clone(), params, [None] * 4)
    assert fast.token_ids == slow.token_ids == [0, 17, 0, 40]
    assert all(math.isnan(lp) for lp in fast.logprobs) and all(math.isnan(lp) for lp in slow.logprobs)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_native_bitmask_and_logprob_rank_match_torch(dtype):
    from remp.guided.bitmask import unpack_allowed
    from remp.kernels import sampling

    g = torch.Generator().manual_seed(3)
    B, V = 6, 1000
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype)
    rng = np.random.default_rng(3)
    words = rng.integers(-(2**31), 2**31, (3, 30), dtype=np.int64).astype(np.int32)  # 960 bits: 40 past the mask
    words[0, :5] = -1  # whole words allowed
    words[1, 5:9] = 0  # whole words not
    rows = [4, 0, 2]
    got = logits.clone()
    sampling.apply_bitmask(got, rows, words)
    want = logits.clone()
    want[rows] = want[rows].masked_fill(~torch.from_numpy(unpack_allowed(words, V)), float("-inf"))
    assert torch.equal(got, want)

    got[5, 10] = float("nan")  # as torch: a NaN row has NaN logprobs, rank 1
    tokens = [int(got[r].argmax()) if k == 0 else int(torch.nonzero(got[r] > -1e9)[k]) for k, r in enumerate(rows)]
    lp, rank = sampling.logprob_rank(got, [*rows, 5], [*tokens, 3])
    ref = torch.log_softmax(got.double(), -1)
    for k, (r, t) in enumerate(zip(rows, tokens)):
        assert lp[k].item() == pytest.approx(ref[r, t].item(), abs=1e-5 if dtype == torch.float32 else 1e-12)
        assert rank[k].item() == int((got[r] > got[r, t]).sum()) + 1
    assert math.isnan(lp[3].item()) and rank[3].item() == 1
    with pytest.raises(ValueError):
        sampling.logprob_rank(got, [6], [0])


def test_a_row_samples_the_same_whatever_its_batch_mates():
    """The path (native or torch) is chosen per row: a batch-mate with top-k changes nothing for the others."""
    from remp import sampler
    from remp.sampling_params import SamplingParams

    logits = torch.randn(3, 4000, generator=torch.Generator().manual_seed(5))
    plain = [SamplingParams(temperature=0.0, logprobs=1), SamplingParams(temperature=0.7, seed=3)]
    alone = sampler.sample(logits[:2].clone(), plain, [None, sampler.make_generator(3)])
    mixed = sampler.sample(logits.clone(), [*plain, SamplingParams(top_k=50)], [None, sampler.make_generator(3), None])
    assert alone.token_ids == mixed.token_ids[:2]
    assert alone.logprobs == mixed.logprobs[:2] and alone.ranks == mixed.ranks[:2]


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("K", [576, 20])  # 20: a tail past the vectors of 8
def test_small_linear_matches_torch(dtype, tol, K):
    from remp.kernels import small_linear as native_linear
    from remp.model.linear import FusedLinear

    g = torch.Generator().manual_seed(K)
    parts = [torch.randn(n, K, generator=g).to(dtype) for n in (37, 8, 5)]  # fused segments of any length
    bias = [torch.randn(n, generator=g).to(dtype) for n in (37, 8, 5)]
    lin = FusedLinear(parts, bias)
    assert lin.small is not None
    wide = torch.randn(6, 2 * K, generator=g).to(dtype)
    for rows in range(1, 6):  # 1-4 through the kernel, 5 through oneDNN or matmul
        x = wide[:rows, :K]  # rows strided, as a slice of a wider activation
        ref = x.double() @ torch.cat(parts).double().T + torch.cat(bias).double()
        torch.testing.assert_close(lin(x).double(), ref, rtol=tol, atol=tol * K**0.5)
    assert lin(wide[:0, :K]).shape == (0, 50)  # no rows: not the kernel's
    with pytest.raises(ValueError, match="rows"):
        native_linear.small_linear(wide[:5, :K], lin.small)
    assert FusedLinear([parts[0].double()]).small is None  # float64 stays with torch (the exactness tests)
    assert FusedLinear([parts[0].T.contiguous().T]).small is None  # not row-major: oneDNN or matmul


def test_kernels_refuse_metadata_outside_the_cache():
    q, k, v, k_cache, v_cache, meta = _case(torch.float32, 3, 64)
    g = next(grp for grp in meta.groups if not grp.fresh)
    out = torch.empty(q.shape[0], q[0].numel())
    args = (g.starts, g.qlens, g.ctxs)
    with pytest.raises(ValueError, match="outside"):  # a block id past the cache
        native.paged_attention_into(out, q, k_cache, v_cache, *args, g.block_tables + BLOCKS)
    with pytest.raises(ValueError, match="outside"):  # a context past its block table
        native.paged_attention_into(out, q, k_cache, v_cache, g.starts, g.qlens, g.ctxs + 100, g.block_tables)
    with pytest.raises(ValueError, match="unexpected"):  # int32 block tables
        native.paged_attention_into(out, q, k_cache, v_cache, *args, g.block_tables.int())
    T, D = 4, 16
    qkv, cos, sin = torch.zeros(T, 10 * D), torch.ones(T, D), torch.zeros(T, D)
    cache = torch.zeros(2, 2, 3, 4, D)
    with pytest.raises(ValueError, match="outside"):
        native_ops.rope_cache(qkv, cos, sin, 6, 2, cache[0], cache[1], torch.tensor([0, 1, 2, 12]))


def test_kernel_results_do_not_depend_on_threads_or_batch():
    """What keeps switches exact: each output depends only on its own row or (sequence, head)."""
    q, k, v, k_cache, v_cache, meta = _case(torch.float32, 3, 64)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2):
            torch.set_num_threads(n)
            outs.append(paged_attention(q, k, v, k_cache, v_cache, meta))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1])
    # one sequence alone gives bit for bit what it gave in the batch
    chunk = SeqChunk([1], 62, list(range(16)), True)
    batch = [SeqChunk([1], 9, list(range(16, 19)), True), chunk, SeqChunk([1], 33, list(range(19, 28)), True)]
    qq = torch.randn(3, KVH, 3, 64)
    alone = paged_attention(qq[1:2], k, v, k_cache, v_cache, build_metadata([chunk], BS, 3))
    together = paged_attention(qq, k, v, k_cache, v_cache, build_metadata(batch, BS, 3))
    assert torch.equal(alone[0], together[1])


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_the_torch_fallback_generates_what_the_kernels_do(fixture, request, monkeypatch):
    """The whole forward and sampler on the torch ops (as on a GPU, or without a compiler) against the native
    kernels, float64: chunked prefill, decode, greedy and seeded sampling."""
    from remp import LLM, SamplingParams
    from remp.kernels import sampling

    path = request.getfixturevalue(fixture)
    prompts = [{"prompt_token_ids": list(range(3 + 7 * i, 3 + 7 * i + n))} for i, n in enumerate((5, 23, 40))]
    params = [
        SamplingParams(max_tokens=12, temperature=0.0, logprobs=1),
        SamplingParams(max_tokens=12, temperature=0.8, seed=7, logprobs=1),
    ]

    def run():
        with LLM(str(path), dtype="float64", max_num_batched_tokens=32) as llm:
            return [o.outputs[0] for p in params for o in llm.generate(prompts, p)]

    fast = run()
    for module in (native, native_ops, sampling):
        monkeypatch.setattr(module, "available", lambda *_: False)
    slow = run()
    for a, b in zip(fast, slow, strict=True):
        assert a.token_ids == b.token_ids
        assert a.cumulative_logprob == pytest.approx(b.cumulative_logprob, abs=1e-9)
