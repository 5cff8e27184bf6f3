"""The policy inside the engine: a profile measured on the real engine, and a switch the policy starts runs
live while requests are served, with the tokens of a run without it (float64 tiny model)."""

import pytest
from prometheus_client import generate_latest

from remp import LLMEngine, SamplingParams
from remp.entrypoints.metrics import ServerMetrics
from remp.policy.measured import Profile, measure
from remp.topology import Shape

PROMPTS = [[(i * 31 + k * 7) % 250 + 1 for k in range(20 + 9 * i)] for i in range(6)]


def generate(engine: LLMEngine) -> dict:
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=0)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), prompt_token_ids=p, sampling_params=params)
    out = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                c = o.outputs[0]
                out[o.request_id] = (c.token_ids, c.cumulative_logprob)
    return out


@pytest.fixture(scope="module")
def profile(tiny_llama, tmp_path_factory):
    engine = LLMEngine(model=str(tiny_llama), dtype="float64", tensor_parallel_size=2, worker_timeout_s=60)
    try:
        prof = measure(engine, [(2, 1), (1, 2)], "test machine", engine_start_s=1.5)
        assert (engine.topology.tp, engine.topology.pp) == (2, 1), "profiling returns to the start topology"
        reference = generate(engine)
    finally:
        engine.shutdown()
    path = prof.save(tmp_path_factory.mktemp("profile") / "p.json")
    return path, reference


def test_profile_fits_every_candidate_from_measured_steps(profile):
    prof = Profile.load(profile[0])
    assert set(prof.fits) == set(prof.kv_capacity_tokens) == {"TP2xPP1", "TP1xPP2"}
    for name, fit in prof.fits.items():
        rows = [r for r in prof.samples if r["topology"] == name]
        assert len(rows) == 6 and all(r["stage_s"] > 0 for r in rows)
        assert fit[0] >= 0 and fit[1] >= 0 and sum(fit) > 0
        assert prof.kv_capacity_tokens[name] > 0
    assert prof.switch_bandwidth_Bps > 0 and prof.engine_start_s == 1.5


def test_policy_switch_is_live_and_changes_no_token(tiny_llama, profile):
    path, reference = profile
    engine = LLMEngine(
        model=str(tiny_llama),
        dtype="float64",
        tensor_parallel_size=2,
        topology_policy="auto",
        topology_candidates="TP1xPP2",
        perf_profile=str(path),
        policy_interval_s=0.0,
        policy_min_dwell_s=0.0,
        worker_timeout_s=60,
    )
    try:
        runner = engine.policy
        # the decision itself is the policy's own test; here: what the engine does with a "switch"
        runner.policy._weigh = lambda *args: (Shape(1, 2), "gain", "forced by the test")
        out = generate(engine)
        while engine.switching is not None:
            engine.advance_switch(wait_s=0.05)
        assert (engine.topology.tp, engine.topology.pp) == (1, 2)
        reports = [r for r in engine.stats.switches if r.cause == "policy"]
        assert len(reports) == 1 and reports[0].mode == "live"
        assert out.keys() == reference.keys()
        for k, (ids, lp) in reference.items():
            assert out[k][0] == ids
            assert out[k][1] == pytest.approx(lp, abs=1e-9)
        assert runner.policy.counts["switch"] == 1 and runner.policy.counts["stay"] >= 1
        state = runner.to_json()
        assert state["candidates"] == ["TP1xPP2"] and [d["action"] for d in state["decisions"]][-1] == "switch"
        metrics = ServerMetrics("m")
        metrics.on_step(engine, [])
        text = generate_latest(metrics.registry).decode()
        assert 'remp:topology_policy_decisions_total{action="switch",model_name="m"} 1.0' in text
        assert 'remp:topology_switches_total{mode="live",model_name="m"} 1.0' in text
    finally:
        engine.shutdown()


def test_policy_needs_a_pool_and_known_candidates(tiny_llama, profile):
    with pytest.raises(ValueError, match="needs a pool"):
        LLMEngine(model=str(tiny_llama), dtype="float64", topology_policy="auto", perf_profile=str(profile[0]))
    with pytest.raises(ValueError, match="unknown candidate"):
        LLMEngine(
            model=str(tiny_llama),
            dtype="float64",
            tensor_parallel_size=2,
            topology_policy="auto",
            topology_candidates="TP3xPP1",
            perf_profile=str(profile[0]),
        )
