"""Shared test helpers: drive an engine with switches at given steps; compare greedy outputs allowing near-ties."""

from remp import LLMEngine
from remp.outputs import CompletionOutput


def run_with_switches(engine: LLMEngine, switches: dict, mode: str = "live") -> tuple[dict, list]:
    """Step until done, calling reconfigure(*switches[n], mode=mode) once the engine has run n steps (a live
    switch runs steps of its own while it pre-copies). Returns the finished outputs by request id and the switch
    reports. Always shuts the engine down."""
    outs, reports, pending = {}, [], sorted(switches)
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0]
            while pending and engine.num_steps >= pending[0]:
                reports.append(engine.reconfigure(*switches[pending.pop(0)], mode=mode))
        assert not pending, f"the run ended before the switches at steps {pending}"
        assert engine.scheduler.pool.num_free == engine.scheduler.pool.num_blocks
    finally:
        engine.shutdown()
    return outs, reports


def assert_same_or_near_tie(ref: CompletionOutput, out: CompletionOutput, gap: float = 0.01) -> None:
    """Identical greedy tokens, or a first difference where the reference's top-2 logprobs were within `gap`
    (float32 reductions in another order may then pick the other token). Needs logprobs >= 1 in the params."""
    if out.token_ids == ref.token_ids:
        return
    i = next(k for k, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)) if a != b)
    top2 = sorted((lp.logprob for lp in ref.logprobs[i].values()), reverse=True)[:2]
    assert top2[0] - top2[1] < gap, f"diverged at token {i} without a near-tie: {top2}"
