"""vLLM-shaped offline API: LLM.generate / chat, LLMEngine add_request / step / abort, sampling options."""

import subprocess
import sys

import pytest

from remp import LLM, LLMEngine, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama):
    with LLM(str(tiny_llama), dtype="float64", max_model_len=256) as llm:
        yield llm


def test_prompt_forms_agree(llm):
    tok = llm.get_tokenizer()
    ids = tok.encode("hello world")
    p = SamplingParams(max_tokens=8, temperature=0)
    a = llm.generate("hello world", p)[0]
    b = llm.generate(ids, p)[0]
    c = llm.generate({"prompt_token_ids": ids}, p)[0]
    d = llm.generate([{"prompt": "hello world"}], p)[0]
    assert a.outputs[0].token_ids == b.outputs[0].token_ids == c.outputs[0].token_ids == d.outputs[0].token_ids
    assert a.prompt == "hello world" and a.prompt_token_ids == ids
    assert a.outputs[0].text == tok.decode(a.outputs[0].token_ids, skip_special_tokens=True)
    assert a.outputs[0].finish_reason == "length"


def test_chat_applies_template(llm):
    msgs = [{"role": "user", "content": "hi"}]
    out = llm.chat(msgs, SamplingParams(max_tokens=4, temperature=0))[0]
    expected = llm.get_tokenizer().encode(
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False
    )
    assert out.prompt_token_ids == expected


def test_seed_reproducible_and_distinct(llm):
    p = lambda seed: SamplingParams(max_tokens=16, temperature=1.0, seed=seed, ignore_eos=True)
    a, b, c = llm.generate(["x", "x", "x"], [p(1), p(1), p(2)])
    assert a.outputs[0].token_ids == b.outputs[0].token_ids != c.outputs[0].token_ids


def test_stop_token_ids_and_strings(llm):
    free = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_tok = free.token_ids[5]
    first = free.token_ids.index(stop_tok)
    out = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok], ignore_eos=True))[
        0
    ].outputs[0]
    assert out.token_ids == free.token_ids[: first + 1] and out.stop_reason == stop_tok
    assert out.finish_reason == "stop"
    text = free.text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].strip())  # past the first token
    out = llm.generate("abc", SamplingParams(max_tokens=12, temperature=0, stop=[stop], ignore_eos=True))[0].outputs[0]
    assert out.text == text[: text.index(stop)] and out.stop_reason == stop and out.finish_reason == "stop"
    assert len(out.token_ids) < len(free.token_ids)


def test_min_tokens_and_max_model_len(llm):
    eos = llm.llm_engine.eos_token_ids
    out = llm.generate("q", SamplingParams(max_tokens=5, min_tokens=5, temperature=0))[0].outputs[0]
    assert len(out.token_ids) == 5 and not set(out.token_ids) & eos
    prompt = [256] + [7] * 250
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 256 - len(prompt) and out.outputs[0].finish_reason == "length"


def test_logprobs_top_n(llm):
    out = llm.generate("abc", SamplingParams(max_tokens=3, temperature=0, logprobs=3))[0].outputs[0]
    total = 0.0
    assert out.token_ids  # not vacuous
    for tok, step in zip(out.token_ids, out.logprobs, strict=True):
        assert step[tok].rank == 1 and len(step) == 3
        assert max(lp.logprob for lp in step.values()) == step[tok].logprob
        total += step[tok].logprob
    assert out.cumulative_logprob == pytest.approx(total)


def test_engine_step_and_abort(tiny_llama):
    engine = LLMEngine(model=str(tiny_llama), dtype="float64")
    engine.add_request("a", "hello", SamplingParams(max_tokens=50, ignore_eos=True))
    engine.add_request("b", "world", SamplingParams(max_tokens=3, ignore_eos=True))
    outs = engine.step()
    assert {o.request_id for o in outs} == {"a", "b"}
    engine.abort_request("a")
    seen = []
    while engine.has_unfinished_requests():
        seen += engine.step()
    assert {o.request_id for o in seen} == {"b"} and seen[-1].finished
    assert engine.scheduler.pool.num_free == engine.num_kv_blocks


def test_cli_generate(tiny_llama):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "remp",
            "generate",
            "--model",
            str(tiny_llama),
            "--prompt",
            "hi",
            "--max-tokens",
            "5",
            "--dtype",
            "float64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "5 tokens" in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "remp", "generate", "--model", "/nope", "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr
