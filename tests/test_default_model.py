"""The bundled SmolLM2-135M GGUF in float32 against Hugging Face transformers loading the same file."""

import pytest
import torch

from remp import LLM, SamplingParams
from remp.model.reader import default_model_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "List three colors: red,",
]
N_TOKENS = 32


@pytest.fixture(scope="module")
def hf_model():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)


@pytest.fixture(scope="module")
def llm():
    with LLM(dtype="float32") as llm:
        yield llm


def test_greedy_and_logprobs_match_transformers(llm, hf_model):
    tok = llm.get_tokenizer()
    params = SamplingParams(max_tokens=N_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
    outs = llm.generate(PROMPTS, params)  # batched: exercises mixed prefill/decode steps
    for prompt, out in zip(PROMPTS, outs, strict=True):
        assert len(out.outputs[0].token_ids) == len(out.outputs[0].logprobs) == N_TOKENS, prompt
        ids = tok.encode(prompt)
        full = ids + out.outputs[0].token_ids
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([full])).logits[0].double(), -1)
        # transformers' greedy continuation, token by token, teacher-forced on the same prefix
        ref_greedy = ref[len(ids) - 1 : len(full) - 1].argmax(-1).tolist()
        assert out.outputs[0].token_ids == ref_greedy, prompt
        for i, step in enumerate(out.outputs[0].logprobs):
            for tid, lp in step.items():
                assert lp.logprob == pytest.approx(float(ref[len(ids) - 1 + i, tid]), abs=2e-3)


def test_chat_answers(llm):
    out = llm.chat(
        [{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=40, temperature=0)
    )[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason == "stop"
