"""What a vLLM user asks of sampling, through the engine (float64, tiny model): penalties, logit bias and
grammar-constrained rows give the same tokens through live switches (their state lives on the driver); n > 1
sequences share the prompt's KV and differ by seed; best_of keeps the likeliest; prompt logprobs are the
model's logprobs of each prompt token, whatever the topology and the chunking."""

import json
import math
import re

import pytest

from remp import LLMEngine, SamplingParams
from remp.guided import GuidedSpec
from tests.engine_utils import assert_same_logprobs, assert_same_tokens
from tests.test_reconfigure import ENGINE

PROMPT = [256] + [(k * 29 + 5) % 256 for k in range(30)]


def run(path, requests: dict, switches=None, **kw):
    """requests: id -> (prompt ids, params); switches: {step: (tp, pp, dp)}. Returns id -> RequestOutput."""
    engine = LLMEngine(model=str(path), **{**ENGINE, "max_workers": 4, **kw})
    outs, pending = {}, sorted(switches or {})
    try:
        for rid, (ids, params) in requests.items():
            engine.add_request(rid, {"prompt_token_ids": ids}, params)
        while engine.has_unfinished_requests():
            outs.update({o.request_id: o for o in engine.step() if o.finished})
            while pending and engine.num_steps >= pending[0]:
                tp, pp, dp = switches[pending.pop(0)]
                engine.reconfigure(tp, pp, data_parallel_size=dp)
        assert not pending
        return outs
    finally:
        engine.shutdown()


SHAPED = {
    "penalties": SamplingParams(
        max_tokens=24, temperature=0, presence_penalty=0.7, frequency_penalty=0.4, repetition_penalty=1.3,
        ignore_eos=True, logprobs=1,
    ),
    "bias": SamplingParams(max_tokens=24, temperature=0.8, seed=3, logit_bias={65: 5.0, 66: -100}, ignore_eos=True),
    "regex": SamplingParams(max_tokens=40, temperature=0.9, seed=4, guided=GuidedSpec("regex", "(ab|ba)+c")),
    "choice": SamplingParams(max_tokens=20, temperature=0, guided=GuidedSpec.choice(["yes", "no", "maybe"])),
    "json": SamplingParams(
        max_tokens=60, temperature=0.7, seed=6,
        guided=GuidedSpec.json_schema({"type": "object", "properties": {"k": {"enum": ["x", "y"]}}, "required": ["k"]}),
    ),
}  # fmt: skip


def test_shaped_rows_are_identical_through_live_switches(tiny_llama):
    requests = {k: (PROMPT[: 10 + 3 * i], p) for i, (k, p) in enumerate(SHAPED.items())}
    plain = {"plain": (PROMPT[:10], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))}
    ref = run(tiny_llama, requests | plain)
    switches = {2: (2, 1, 2), 6: (1, 1, 4), 10: (1, 4, 1)}  # -> DP2xTP2 -> DP4xTP1 -> PP4
    out = run(tiny_llama, requests, switches, tensor_parallel_size=2, pipeline_parallel_size=2)
    for k in SHAPED:
        a, b = ref[k].outputs[0], out[k].outputs[0]
        assert_same_tokens(a.token_ids, b.token_ids, k)
    assert re.fullmatch("(ab|ba)+c", ref["regex"].outputs[0].text)
    assert ref["choice"].outputs[0].text in ("yes", "no", "maybe")
    assert json.loads(ref["json"].outputs[0].text) in ({"k": "x"}, {"k": "y"})
    assert 66 not in ref["bias"].outputs[0].token_ids
    assert ref["plain"].outputs[0].token_ids != ref["penalties"].outputs[0].token_ids  # the penalties did act


def test_n_sequences_share_the_prompt_and_best_of_keeps_the_likeliest(tiny_llama):
    sampled = dict(max_tokens=12, temperature=1.0, ignore_eos=True)
    requests = {
        "n": (PROMPT, SamplingParams(n=3, seed=9, logprobs=0, **sampled)),
        "best": (PROMPT, SamplingParams(n=1, best_of=3, seed=9, **sampled)),
    } | {f"alone{i}": (PROMPT, SamplingParams(seed=9 + i, **sampled)) for i in range(3)}
    outs = run(tiny_llama, requests, tensor_parallel_size=2)
    n = outs["n"].outputs
    assert [c.index for c in n] == [0, 1, 2] and len({tuple(c.token_ids) for c in n}) == 3
    for i, c in enumerate(n):  # sequence i is the one-sequence request with seed + i
        assert_same_tokens(outs[f"alone{i}"].outputs[0].token_ids, c.token_ids, f"sequence {i}")
    (kept,) = outs["best"].outputs
    assert kept.cumulative_logprob == pytest.approx(max(c.cumulative_logprob for c in n), abs=1e-9)


def test_prompt_logprobs_are_the_models_logprobs_of_each_prompt_token(tiny_llama):
    """Prompt logprobs equal, position by position, the logprob (over the whole vocabulary) of that token after
    the prompt before it; on two workers and in 4-token prefill chunks alike."""
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    every = SamplingParams(max_tokens=1, temperature=0, logprobs=260)  # the whole vocabulary
    outs = run(tiny_llama, {"p": (PROMPT[:12], params)} | {f"s{i}": (PROMPT[:i], every) for i in range(1, 12)})
    whole = outs["p"].prompt_logprobs
    chunked = run(tiny_llama, {"p": (PROMPT[:12], params)}, tensor_parallel_size=2, max_num_batched_tokens=4)
    assert whole[0] is None and len(whole) == 12
    for pos in range(1, 12):
        expected = outs[f"s{pos}"].outputs[0].logprobs[0][PROMPT[pos]]
        got = whole[pos][PROMPT[pos]]
        assert math.isclose(got.logprob, expected.logprob, abs_tol=1e-9) and got.rank == expected.rank
        assert len(whole[pos]) <= 3  # the token and the top 2
        assert_same_logprobs([whole[pos]], [chunked["p"].prompt_logprobs[pos]], 1e-9, f"position {pos}")
