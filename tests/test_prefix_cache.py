"""Prefix caching: blocks found by the hash of their content chain are shared by reference; the cache survives
topology switches (cached blocks move with the KV) and a lost worker (lost KV is dropped, a shared prefix is
recomputed once); outputs are those of a run without the cache (float64, tiny model)."""

import os
import signal

import pytest

from remp import LLMEngine, SamplingParams
from remp.block_pool import BlockPool
from remp.request import Request
from remp.scheduler import Scheduler
from tests.test_reconfigure import ENGINE, assert_same

BS = 8
SYSTEM = [256] + [(k * 7 + 3) % 256 for k in range(3 * BS - 1)]  # three full blocks shared by every prompt


def request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, None, tokens, SamplingParams(max_tokens=8), max_tokens=8)


def computed(sched: Scheduler, batch) -> None:
    """What the engine does with a step: the tokens scheduled are computed, their full blocks cached, and a
    request whose every token is computed samples one more."""
    for req, n in batch.scheduled:
        req.num_computed_tokens += n
        sched.cache_computed(req)
        if req.num_uncomputed_tokens == 0:
            req.token_ids.append(42)


# ---- the block pool and the scheduler, without processes ---------------------------------------------------
def test_a_shared_prefix_is_computed_once_and_shared_by_reference():
    sched = Scheduler(16, BS, 8, 1000, enable_prefix_caching=True)
    a, b = request("a", SYSTEM + [1, 2]), request("b", SYSTEM + [3])
    sched.add(a)
    computed(sched, sched.schedule())
    sched.add(b)
    batch = sched.schedule()
    assert [(r.request_id, n) for r, n in batch.scheduled] == [("a", 1), ("b", 1)]  # b: only its own token
    assert b.block_ids[:3] == a.block_ids[:3] and all(sched.pool.refs[x] == 2 for x in a.block_ids[:3])
    assert (sched.pool.queries, sched.pool.hits) == (a.num_prompt_tokens + b.num_prompt_tokens, 3 * BS)
    for r in (a, b):
        sched.free(r)
    assert sched.pool.num_free == 16 and set(sched.pool.refs) == {0}
    assert len(sched.pool.cached_free()) == 3  # the prefix outlives its requests, findable


def test_a_prompt_found_whole_still_computes_its_last_token():
    sched = Scheduler(16, BS, 8, 1000, enable_prefix_caching=True)
    a = request("a", SYSTEM)
    sched.add(a)
    computed(sched, sched.schedule())
    sched.free(a)
    b = request("b", list(SYSTEM))
    sched.add(b)
    (only,) = sched.schedule().scheduled
    assert only == (b, BS) and b.num_computed_tokens == 2 * BS  # two blocks found, the third recomputed


def test_a_preempted_request_does_not_free_blocks_another_holds():
    sched = Scheduler(16, BS, 8, 1000, enable_prefix_caching=True)
    a, b = request("a", SYSTEM + [1]), request("b", SYSTEM + [2])
    sched.add(a)
    computed(sched, sched.schedule())
    sched.add(b)
    computed(sched, sched.schedule())
    shared = a.block_ids[:3]
    sched.preempt(b)
    assert all(sched.pool.refs[x] == 1 for x in shared) and not set(shared) & set(sched.pool._free)
    fresh = sched.pool.allocate(sched.pool.num_free)  # take every free block: none of a's
    assert not set(fresh) & set(a.block_ids)


def test_the_least_recently_freed_cached_block_is_evicted_first():
    pool = BlockPool(3, caching=True)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, [b"x", b"y", b"z"], strict=True):
        pool.cache(b, h)
    pool.release([blocks[0]])
    pool.release([blocks[1], blocks[2]])  # a sequence: its last block is freed first, its first last
    assert pool.cached_free() == [blocks[1], blocks[2], blocks[0]]  # most recent first
    assert pool.allocate(1) == [blocks[0]] and not pool.is_cached(b"x") and pool.lookup([b"y"]) == [blocks[1]]


def test_renaming_keeps_hashes_and_the_lru_order():
    pool = BlockPool(8, caching=True)
    blocks = pool.allocate(4)
    for b, h in zip(blocks, [b"a", b"b", b"c", b"d"], strict=True):
        pool.cache(b, h)
    pool.release(blocks[2:])  # c, d free and cached; a, b held
    new = BlockPool.merged(4, True, [(pool, {blocks[0]: 3, blocks[1]: 2, blocks[2]: 1, blocks[3]: 0})], [[3, 2]])
    assert new.lookup([b"a", b"b"]) == [3, 2] and new.refs[3] == new.refs[2] == 1
    assert new.cached_free() == [1, 0] and new.num_free == 2  # c freed after d: most recent first


def test_a_request_waits_for_a_block_another_is_computing():
    """Two requests with the same long prefix arriving together: the second waits while the first computes the
    prefix, then finds it in the cache (computed once, not twice)."""
    sched = Scheduler(32, BS, 8, 2 * BS, enable_prefix_caching=True)  # the prefix takes two steps
    a, b = request("a", SYSTEM + [1]), request("b", SYSTEM + [2])
    sched.add(a)
    sched.add(b)
    scheduled = []
    while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):
        batch = sched.schedule()
        scheduled += [(r.request_id, n) for r, n in batch.scheduled]
        computed(sched, batch)
    assert sum(n for rid, n in scheduled if rid == "b") == 1  # b computed only its own last token
    assert sched.pool.hits == 3 * BS


# ---- the engine: identical outputs, through switches and a lost worker --------------------------------------
PROMPTS = [SYSTEM + [(i * 13 + k) % 256 for k in range(n)] for i, n in enumerate([2, 11, 5, 19, 1, 9])]


def params(i):
    if i % 2:
        return SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=40 + i, ignore_eos=True, logprobs=1)
    return SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=1)


def serve(path, caching: bool, tp=1, pp=1, steps=None, between=None, **kw):
    """Two waves of the shared-prefix prompts (the second after the first finished); steps: {step: action} in
    the first wave, `between` the waves."""
    engine = LLMEngine(
        model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, enable_prefix_caching=caching,
        **{**ENGINE, "max_num_batched_tokens": 64, **kw},
    )  # fmt: skip
    outs, steps = {}, dict(steps or {})
    try:
        for wave in range(2):
            if wave and between is not None:
                between(engine)
            for i, p in enumerate(PROMPTS):
                engine.add_request(f"{wave}-{i}", {"prompt_token_ids": p}, params(i))
            while engine.has_unfinished_requests():
                if (action := steps.pop(engine.num_steps, None)) is not None:
                    action(engine)
                outs.update({o.request_id: o.outputs[0] for o in engine.step() if o.finished})
        assert not steps, f"the run ended before steps {sorted(steps)}"
        pool = engine.scheduler.pool
        assert pool.num_free == pool.num_blocks and set(pool.refs) == {0}  # every reference returned
        return outs, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def uncached(tiny_llama):
    return serve(tiny_llama, False)[0]


def test_cache_on_gives_the_tokens_of_cache_off(tiny_llama, uncached):
    out, engine = serve(tiny_llama, True)
    assert_same(uncached, out)
    # the first prompt computes the prefix; every other request of both waves finds it
    assert engine.scheduler.pool.hits >= (2 * len(PROMPTS) - 1) * len(SYSTEM)


def test_the_cache_moves_with_live_switches(tiny_llama, uncached):
    hits = {}

    def to_tp4(engine):
        hits["before"] = engine.scheduler.pool.hits
        report = engine.reconfigure(4, 1)
        assert report.kv_blocks_moved >= len(SYSTEM) // BS  # the cached prefix, free now, moved too

    # TP2 -> TP2xPP2 in the first wave (shared blocks referenced), -> TP4 between the waves (all cached, free)
    out, engine = serve(tiny_llama, True, tp=2, max_workers=4, steps={3: lambda e: e.reconfigure(2, 2)}, between=to_tp4)
    assert_same(uncached, out)
    assert [r.new_topology for r in engine.stats.switches] == ["TP2xPP2", "TP4xPP1"]
    # every request of the second wave, after the last switch, still finds the prefix (and more)
    assert engine.scheduler.pool.hits - hits["before"] >= len(PROMPTS) * len(SYSTEM)


def test_a_lost_worker_drops_lost_kv_and_recomputes_the_prefix_once(tiny_llama, uncached):
    seen = {}

    def kill(engine):
        seen["hits"] = engine.scheduler.pool.hits
        os.kill(engine.executor.procs[1].pid, signal.SIGKILL)

    out, engine = serve(tiny_llama, True, tp=2, steps={4: kill})
    assert_same(uncached, out)
    (recovery,) = [r for r in engine.stats.switches if r.cause == "worker_lost"]
    assert recovery.recomputed_tokens > 0
    # the requeued requests recompute the prefix once: all but the first find it again
    assert engine.scheduler.pool.hits - seen["hits"] >= (2 * len(PROMPTS) - 1) * len(SYSTEM)


def test_shared_blocks_split_between_replicas(tiny_llama, uncached):
    """TP2xPP2 -> DP2xTP2 with the shared prefix in use: requests that share its blocks go to both replicas (each
    gets a copy); back to one replica between the waves, the cache still serves the second wave."""

    def to_one(engine):
        engine.reconfigure(2, 2)

    steps = {3: lambda e: e.reconfigure(2, 1, data_parallel_size=2)}
    out, engine = serve(tiny_llama, True, tp=2, pp=2, steps=steps, between=to_one)
    assert_same(uncached, out)
    assert [r.new_topology for r in engine.stats.switches] == ["DP2xTP2xPP1", "TP2xPP2"]
