"""Shared test helpers: drive an engine with switches at given steps; compare outputs, lengths included (a
truncated output never passes), exactly or allowing greedy near-ties."""

from collections.abc import Sequence

import pytest

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


def assert_same_tokens(expected: Sequence[int], actual: Sequence[int], what: str = "") -> None:
    """The same token ids, as many of them: names the first difference, or which output is the shorter."""
    expected, actual = list(expected), list(actual)
    if expected == actual:
        return
    where = f"{what}: " if what else ""
    i = next((k for k, (a, b) in enumerate(zip(expected, actual)) if a != b), None)
    if i is None:
        raise AssertionError(f"{where}{len(actual)} tokens where {len(expected)} were expected, the same up to there")
    raise AssertionError(f"{where}token {i} is {actual[i]}, expected {expected[i]}")


def assert_same_logprobs(expected: Sequence[dict], actual: Sequence[dict], tol: float = 1e-9, what: str = "") -> None:
    """Per step: the same token ids with logprobs within `tol`; as many steps on both sides."""
    assert len(actual) == len(expected), f"{what}: {len(actual)} steps of logprobs, expected {len(expected)}"
    for i, (a, b) in enumerate(zip(expected, actual, strict=True)):
        assert a.keys() == b.keys(), f"{what}: step {i}"
        for t in a:
            assert b[t].logprob == pytest.approx(a[t].logprob, abs=tol), f"{what}: step {i}, token {t}"


def assert_same_or_near_tie(ref: CompletionOutput, out: CompletionOutput, gap: float = 0.01) -> None:
    """Identical greedy tokens, or a first difference where the reference's top-2 logprobs were within `gap`
    (float32 reductions in another order may then pick the other token). Needs logprobs >= 1 in the params.
    Outputs that agree but differ in length fail: that is a truncation, not a near-tie."""
    if out.token_ids == ref.token_ids:
        return
    i = next((k for k, (a, b) in enumerate(zip(ref.token_ids, out.token_ids)) if a != b), None)
    assert i is not None, f"{len(out.token_ids)} tokens against the reference's {len(ref.token_ids)}, same up to there"
    top2 = sorted((lp.logprob for lp in ref.logprobs[i].values()), reverse=True)[:2]
    assert top2[0] - top2[1] < gap, f"diverged at token {i} without a near-tie: {top2}"
