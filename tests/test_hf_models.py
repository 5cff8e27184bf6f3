"""Random tiny checkpoints written as safetensors load and match Hugging Face transformers; a config feature a family
cannot run is refused, not ignored."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from remp import LLM, SamplingParams
from remp.config import UnsupportedModelError, max_model_len
from remp.model.families import config_from_hf
from remp.model.reader import open_checkpoint
from remp.tools.random_model import tiny_config

PROMPT = [256, 5, 77, 13, 200, 31, 9, 120, 64, 3, 250, 17]


def transformers_logprobs(path, token_ids, dtype=torch.float64):
    # eager experts: transformers' grouped matmul has no float64
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, experts_implementation="eager")
    with torch.no_grad():
        logits = model(torch.tensor([token_ids])).logits[0]
    return torch.log_softmax(logits, -1)


def check_against_transformers(path, n_tokens=12, dtype=torch.float64, tolerance=1e-5):
    with LLM(str(path), dtype=dtype) as llm:
        out = llm.generate(
            {"prompt_token_ids": PROMPT},
            SamplingParams(max_tokens=n_tokens, temperature=0, logprobs=5, ignore_eos=True),
        )[0]
    ids = out.outputs[0].token_ids
    ref = transformers_logprobs(path, PROMPT + ids, dtype)
    for i, tok in enumerate(ids):
        row = ref[len(PROMPT) - 1 + i]
        assert tok == int(row.argmax()), f"greedy token {i} differs"
        for tid, lp in out.outputs[0].logprobs[i].items():
            # transformers builds its RoPE tables in float32 even for float64 models: ~1e-7 differences
            assert lp.logprob == pytest.approx(float(row[tid]), abs=tolerance)


@pytest.mark.parametrize("fixture", ["tiny_qwen3", "tiny_mixtral"])
def test_float32_matches_transformers(fixture, request):
    """In float32 the native kernels run around each family's own parts (the q/k norm ahead of the fused RoPE
    and cache write; experts over the few rows routed to them)."""
    check_against_transformers(request.getfixturevalue(fixture), dtype=torch.float32, tolerance=1e-4)


@pytest.mark.parametrize(
    "fixture", ["tiny_llama", "tiny_llama_sharded", "tiny_qwen2", "tiny_llama3_rope", "tiny_qwen3", "tiny_mixtral"]
)
def test_matches_transformers(fixture, request):
    check_against_transformers(request.getfixturevalue(fixture))


def test_sharded_reader_reads_slices(tiny_llama, tiny_llama_sharded):
    single, sharded = open_checkpoint(tiny_llama), open_checkpoint(tiny_llama_sharded)
    assert sorted(single.names()) == sorted(sharded.names())
    name = "model.layers.2.self_attn.o_proj.weight"
    part = sharded.read(name, (slice(None), slice(16, 48)))
    assert part.shape == (96, 32)
    assert torch.equal(part, single.read(name)[:, 16:48])


def test_qwen2_has_bias_and_tied_embeddings(tiny_qwen2):
    cfg = open_checkpoint(tiny_qwen2).config
    assert cfg.attention_bias and cfg.tie_word_embeddings and cfg.architecture == "qwen2"


def test_llama3_rope_scaling_changes_frequencies(tiny_llama3_rope):
    from remp.model.rope import inv_frequencies

    cfg = open_checkpoint(tiny_llama3_rope).config
    assert cfg.rope_scaling["rope_type"] == "llama3"
    scaled = inv_frequencies(cfg)
    plain = inv_frequencies(type(cfg)(**{**cfg.__dict__, "rope_scaling": None}))
    assert not torch.allclose(scaled, plain)


@pytest.mark.parametrize(
    "model_type, overrides, message",
    [
        ("mixtral", {"num_experts_per_tok": 4}, "num_experts_per_tok \\(4\\)"),
        ("llama", {"quantization_config": {"quant_method": "fp8"}}, "quantized \\(fp8"),
        ("llama", {"architectures": ["Gemma3ForCausalLM"]}, "Gemma3ForCausalLM.*Qwen3ForCausalLM, MixtralForCausalLM"),
    ],
)
def test_what_a_family_cannot_run_is_refused(model_type, overrides, message):
    with pytest.raises(UnsupportedModelError, match=message):
        config_from_hf(tiny_config(model_type=model_type, **overrides))


@pytest.mark.parametrize(
    "model_type, overrides",
    [("llama", {"sliding_window": 64}), ("qwen3", {"use_sliding_window": True, "sliding_window": 64})],
)
def test_a_sliding_window_bounds_the_context(model_type, overrides):
    """Attention over the whole context is the model's windowed attention up to the window: the context is the
    window by default, and a longer one is refused, naming the window."""
    cfg = config_from_hf(tiny_config(model_type=model_type, **overrides))
    assert cfg.sliding_window == 64 and max_model_len(None, cfg) == 64 and max_model_len(48, cfg) == 48
    with pytest.raises(ValueError, match="sliding_window \\(64\\)"):
        max_model_len(65, cfg)
    off = config_from_hf(tiny_config(model_type="qwen3", use_sliding_window=False, sliding_window=64))
    assert off.sliding_window is None and max_model_len(None, off) == off.max_position_embeddings


def test_generation_config_gives_the_sampling_defaults(tmp_path):
    """As vLLM (--generation-config auto): the model's generation_config.json fills what a request leaves unset."""
    import json

    from remp.entrypoints.protocol import CompletionRequest
    from remp.model.families import config_from_hf_dir

    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    gen = {"temperature": 0.6, "top_k": 3, "repetition_penalty": 1.2, "max_new_tokens": 7, "do_sample": True}
    (tmp_path / "generation_config.json").write_text(json.dumps(gen))
    defaults = config_from_hf_dir(tmp_path).generation_defaults
    assert defaults == {"temperature": 0.6, "top_k": 3, "repetition_penalty": 1.2, "max_new_tokens": 7}
    params = CompletionRequest(prompt="a", top_k=5, max_tokens=None).sampling_params(None, None, defaults, None)
    assert (params.temperature, params.top_k, params.repetition_penalty, params.max_tokens) == (0.6, 5, 1.2, 7)
