"""Bad input raises a clear error naming the problem, and the engine keeps serving."""

import json

import pytest

from remp import LLM, LLMEngine, SamplingParams
from remp.config import UnsupportedModelError


def test_missing_path():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LLM("/nonexistent/model")


def test_unsupported_architecture(tmp_path, tiny_llama):
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((tiny_llama / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        LLM(str(bad))


def test_unknown_option(tiny_llama):
    with pytest.raises(TypeError, match="max_num_seq"):
        LLM(str(tiny_llama), max_num_seq=3)


def test_kv_cache_too_small(tiny_llama):
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(str(tiny_llama), num_kv_blocks=2, max_model_len=256)


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"min_p": 2}, "min_p"), ({"n": 2}, "n"), ({"logprobs": -1}, "logprobs"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_bad_prompts_do_not_disturb_running_requests(tiny_llama):
    engine = LLMEngine(model=str(tiny_llama), dtype="float64", max_model_len=64)
    engine.add_request("ok", {"prompt_token_ids": [256, 1, 2, 3]}, SamplingParams(max_tokens=20, ignore_eos=True))
    engine.step()
    with pytest.raises(ValueError, match="max_model_len=64"):
        engine.add_request("long", {"prompt_token_ids": [1] * 64})
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", "")
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("oov", [10**6])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("ok", "again")
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    assert outs[-1].request_id == "ok" and len(outs[-1].outputs[0].token_ids) == 20


def test_generate_validates_every_prompt_first(tiny_llama):
    with LLM(str(tiny_llama), dtype="float64", max_model_len=32) as llm:
        with pytest.raises(ValueError):
            llm.generate([[256, 1], [1] * 40], SamplingParams(max_tokens=2))
        assert not llm.llm_engine.has_unfinished_requests()
        assert len(llm.generate([[256, 1]], SamplingParams(max_tokens=2))[0].outputs[0].token_ids) == 2
