"""A worker's memory by kind: the kinds sum to its RSS, fused linears hold no copy of their weights, and a
sequence of switches (live and stop, the pool growing and shrinking) that ends at the start topology leaves the
workers holding what they held at the start, with no staging left between switches."""

import time

import pytest
import torch

from remp import LLMEngine, SamplingParams
from remp.memory import KINDS, Staging, shard_bytes, storage_bytes
from remp.model.linear import FusedLinear, colocate, colocated
from remp.model.reader import open_checkpoint
from remp.model_runner import ModelRunner
from remp.tools.random_model import write_random_llama
from remp.topology import Topology

MiB = 1 << 20


def test_storage_bytes_count_each_storage_once():
    a, b = torch.zeros(100, dtype=torch.float64), torch.zeros(5)
    total, keys = storage_bytes([a, a[10:], a.view(10, 10), b])
    assert total == 800 + 20 and len(keys) == 2
    assert storage_bytes([a[1:], b, torch.zeros(3)], skip=keys)[0] == 12


def test_staging_is_what_is_alive_and_not_installed():
    staging = Staging()
    a, b = staging.add(torch.zeros(100)), staging.add(torch.zeros(10))
    assert staging.bytes(frozenset()) == 440
    assert staging.bytes(frozenset(storage_bytes([a])[1])) == 40  # installed: the shard's, not staging
    del a, b
    assert staging.bytes(frozenset()) == 0


def test_colocated_weights_fuse_into_a_view():
    q, k, v = (torch.randn(n, 8, dtype=torch.float64) for n in (6, 2, 2))
    assert not colocated([q, k, v])
    views = colocate([q, k, v])
    assert colocated(views) and colocate(views) is views
    assert all(torch.equal(a, b) for a, b in zip(views, [q, k, v]))
    fused = FusedLinear(views)
    assert fused.weight.untyped_storage().data_ptr() == views[0].untyped_storage().data_ptr()
    x = torch.randn(7, 8, dtype=torch.float64)
    assert torch.allclose(fused(x), torch.cat([x @ q.T, x @ k.T, x @ v.T], 1))
    # stacked experts side by side along their rows: each expert's w1 | w3 is a view too
    w1, w3 = torch.randn(3, 4, 8), torch.randn(3, 5, 8)
    s1, s3 = colocate([w1, w3], 1)
    assert colocated([s1[2], s3[2]]) and torch.equal(s3, w3)


def test_a_float64_shard_holds_no_fused_copy(tiny_llama):
    """float64 is never packed: its execution form is views of the canonical weights, plus the RoPE tables."""
    reader = open_checkpoint(str(tiny_llama))
    spec = Topology(1, 1).spec(reader.config, 0)
    runner = ModelRunner(reader, spec, torch.float64, num_blocks=16, block_size=8, max_model_len=128)
    rope = storage_bytes([runner.rope.cos, runner.rope.sin])[0]
    assert runner.held.execution == rope
    assert runner.held.weights == sum(t.numel() * 8 for t in runner.model.weights.values())
    assert runner.held.kv == sum(t.numel() * 8 for t in runner.kv.layers)
    assert shard_bytes(runner.model.weights, [], runner.kv.layers).storages <= runner.held.storages


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """Large enough (about 55 MB of float64 weights per worker at TP2) that an old shard, or the allocator's
    free pages after the switches (about 70 MB without malloc_trim), would be far above the tolerance below."""
    return write_random_llama(
        tmp_path_factory.mktemp("small_llama"),
        seed=7,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        vocab_size=512,
    )


def memory_now(engine: LLMEngine) -> list:
    """Each worker's memory from a heartbeat sent after this call (they come every 0.5 s)."""
    time.sleep(1.2)
    engine.executor.poll()
    return engine.executor.worker_memory()


# per worker: what a step in flight, the allocator's bookkeeping and the pages of libraries and of the shared
# all-reduce segment touched since may move (measured: -5 to +12 MiB)
TOLERANCE = 16 * MiB


def test_switches_back_to_the_start_give_back_what_they_took(small_llama):
    engine = LLMEngine(
        model=str(small_llama),
        dtype="float64",
        tensor_parallel_size=2,
        max_workers=4,
        block_size=8,
        num_kv_blocks=512,
        max_model_len=256,
        max_num_batched_tokens=64,
        worker_timeout_s=60,
        switch_precopy_duty=1.0,
    )
    try:
        for i in range(4):
            prompt = [(i * 31 + k * 7) % 500 + 1 for k in range(40)]
            engine.add_request(str(i), {"prompt_token_ids": prompt}, SamplingParams(max_tokens=10_000, ignore_eos=True))
        for _ in range(8):
            engine.step()
        start = memory_now(engine)
        assert all(m is not None and m.staging == 0 for m in start)
        for m in start:  # the kinds add up to the RSS, and the shard is what the account says
            assert sum(m.kinds().values()) == m.total and m.weights > 40 * MiB and m.kv > 0
        reports = [
            engine.reconfigure(3, 1, mode="live"),  # the pool grows
            engine.reconfigure(2, 2, mode="stop"),  # and again
            engine.reconfigure(1, 4, mode="live"),
            engine.reconfigure(2, 1, mode="live"),  # and shrinks: back at the start
        ]
        for r in reports:
            assert all(m is not None and m["staging"] == 0 for m in r.memory_after), r.new_topology
        assert [(len(r.memory_before), len(r.memory_after)) for r in reports] == [(2, 3), (3, 4), (4, 4), (4, 4)]
        for _ in range(4):
            engine.step()
        end = memory_now(engine)
        assert engine.executor.pool_size == 2 and all(m.staging == 0 for m in end)
        shard = lambda ms: sorted((m.weights, m.execution, m.kv) for m in ms)
        assert shard(end) == shard(start)
        for m0, m1 in zip(sorted(start, key=lambda m: m.total), sorted(end, key=lambda m: m.total)):
            assert m1.total - m0.total < TOLERANCE, (m0, m1)
        assert set(KINDS) <= set(reports[-1].memory_after[0])
    finally:
        engine.shutdown()
