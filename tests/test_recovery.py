"""A worker that dies is a switch onto the survivors (float64, tiny model): every request finishes with the
tokens and logprobs of a run without the failure; the engine runs on fewer workers (or, with respawn, on a
replacement); no process or shared-memory segment is left behind."""

import os
import signal

import pytest

from remp import LLMEngine
from tests.test_elastic_pool import shm_segments
from tests.test_reconfigure import ENGINE, PROMPTS, assert_same, params
from tests.test_worker_failures import wait_dead

REQUESTS = PROMPTS + [[256] + [(5 * k + 1) % 256 for k in range(21)]]  # 8 in flight


def run(path, tp, pp, kills=(), switch=None, **kw):
    """Step to the end; at step n of `kills` ((n, rank) pairs, rank in the pool at that moment, or "sampler",
    or (rank, signal)) SIGKILL (or signal) that worker; with `switch` (step, tp, pp), start a live switch then. Returns outputs, the recovery
    reports, what the switch's on_done got, and every worker pid the run had."""
    engine = LLMEngine(model=str(path), tensor_parallel_size=tp, pipeline_parallel_size=pp, **{**ENGINE, **kw})
    engine.switcher.precopy_duty = 0.05 if switch else 1.0  # a switch slow enough to be killed in
    for i, p in enumerate(REQUESTS):
        engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
    outs, pids, switched, kills = {}, set(), [], dict(kills)
    try:
        while engine.has_unfinished_requests() or engine.switching:
            pids |= {p.pid for p in getattr(engine.executor, "procs", [])}
            n = engine.num_steps
            if switch and n == switch[0] and not switched:
                engine.start_reconfigure(*switch[1:], on_done=lambda r, e: switched.append((r, e)))
                switched.append("started")
            if n in kills:
                rank, sig = kills.pop(n), signal.SIGKILL
                if isinstance(rank, tuple):
                    rank, sig = rank
                rank = engine.topology.sampler_worker if rank == "sampler" else rank
                os.kill(engine.executor.procs[rank].pid, sig)
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0]
            if not engine.has_unfinished_requests() and engine.switching:
                engine.advance_switch(0.05)
        recoveries = [r for r in engine.stats.switches if r.cause == "worker_lost"]
        return outs, recoveries, switched, pids, engine
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama):
    return run(tiny_llama, 1, 1)[0]


def check(reference, out, pids, before):
    assert_same(reference, out)
    assert not wait_dead(pids), "a worker process outlived the engine"
    assert shm_segments() <= before


@pytest.mark.parametrize(
    "tp, pp, kills, after",
    [
        (2, 2, [(3, 1)], 3),  # one of four: three go on
        (2, 2, [(3, "sampler")], 3),  # the worker that samples
        (2, 2, [(3, 2), (9, 0)], 2),  # two of four, one after the other
        (2, 1, [(4, 0)], 1),  # the last but one: TP1 remains
    ],
)
def test_lost_worker_recovered_onto_survivors(tiny_llama, reference, tp, pp, kills, after):
    before = shm_segments()
    out, recoveries, _, pids, engine = run(tiny_llama, tp, pp, kills)
    check(reference, out, pids, before)
    assert len(recoveries) == len(kills) and engine.topology.size == after == engine.executor.pool_size
    for r in recoveries:
        assert r.recomputed_tokens > 0 and r.bytes_from_checkpoint["weights"] > 0 and r.pool_size <= tp * pp


def test_replicated_kv_survives_the_loss(tiny_llama, reference):
    """TP4 over 2 KV heads: each KV head is on two workers, so a lost worker's KV has a copy on a survivor; the
    cache is kept (nothing preempted, only the steps in flight computed again) and moved to the new layout."""
    before = shm_segments()
    out, recoveries, _, pids, engine = run(tiny_llama, 4, 1, [(5, 1)])
    check(reference, out, pids, before)
    ((r,),) = [recoveries]
    assert r.preempted == [] and r.recomputed_tokens == 0 and r.bytes_from_checkpoint["kv"] == 0
    assert r.bytes_moved["kv"] > 0  # the KV in use, moved to the new layout
    assert engine.topology.size == 3 and engine.scheduler.num_preemptions == 0


def test_hung_worker_is_killed_and_recovered_from(tiny_llama, reference):
    """SIGSTOP: the worker stops answering (no heartbeat); after the hang timeout it is treated as lost."""
    before = shm_segments()
    out, recoveries, _, pids, engine = run(tiny_llama, 2, 2, [(3, (1, signal.SIGSTOP))], worker_timeout_s=3)
    check(reference, out, pids, before)
    assert len(recoveries) == 1 and engine.topology.size == 3


def test_respawn_keeps_the_topology(tiny_llama, reference):
    before = shm_segments()
    out, recoveries, _, pids, engine = run(tiny_llama, 2, 2, [(3, 1)], respawn=True)
    check(reference, out, pids, before)
    ((r,),) = [recoveries]
    assert str(engine.topology) == "TP2xPP2" and engine.executor.pool_size == 4
    assert r.new_topology == "TP2xPP2" and r.bytes_from_checkpoint["weights"] > 0
    # the replacement takes the dead worker's device (on CUDA, its GPU), not one a survivor holds
    assert sorted(p.device_slot for p in engine.executor.procs) == [0, 1, 2, 3]


def test_worker_lost_during_a_live_switch(tiny_llama, reference):
    """Killed while the weights pre-copy: the switch is called off, the survivors take over."""
    before = shm_segments()
    out, recoveries, switched, pids, engine = run(tiny_llama, 2, 2, [(4, 3)], switch=(3, 1, 4))
    check(reference, out, pids, before)
    assert len(recoveries) == 1 and engine.topology.size == 3
    assert switched[0] == "started" and switched[1][0] is None and "lost" in str(switched[1][1])


def test_failed_recovery_stops_the_engine_with_the_cause(tiny_llama, monkeypatch):
    """The survivors cannot run the model (here: no topology fits them): a clear error naming the cause, the
    engine stops, nothing hangs and no process is left."""
    import remp.switch.recovery as recovery
    from remp.engine import EngineDeadError
    from remp.executor import WorkerError

    def no_fit(*a, **k):
        raise ValueError("no topology fits the survivors' memory")

    monkeypatch.setattr(recovery, "choose_after_loss", no_fit)
    engine = LLMEngine(model=str(tiny_llama), tensor_parallel_size=2, pipeline_parallel_size=2, **ENGINE)
    pids = [p.pid for p in engine.executor.procs]
    try:
        for i, p in enumerate(REQUESTS):
            engine.add_request(str(i), {"prompt_token_ids": p}, params(i))
        engine.step()
        os.kill(pids[1], signal.SIGKILL)
        with pytest.raises(WorkerError, match="recovery failed: no topology fits"):
            for _ in range(100):
                engine.step()
        with pytest.raises(EngineDeadError):
            engine.step()
    finally:
        engine.shutdown()
    assert not wait_dead(pids)
