"""Shared test helpers: drive an engine with switches at given steps; compare greedy outputs allowing near-ties."""

from remp import LLMEngine
from remp.outputs import CompletionOutput


def run_with_switches(engine: LLMEngine, switches: dict, mode: str = "switch") -> tuple[dict, list]:
    """Step until done, calling reconfigure(*switches[n], mode=mode) after step n. Returns the finished
    outputs by request id and the switch reports. Always shuts the engine down."""
    outs, reports, step = {}, [], 0
    try:
        while engine.has_unfinished_requests():
            for o in engine.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0]
            step += 1
            if step in switches:
                reports.append(engine.reconfigure(*switches[step], mode=mode))
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
