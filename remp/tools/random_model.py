"""Write random-initialised checkpoints as Hugging Face directories (config.json, safetensors, a small byte-level
BPE tokenizer) of the families remp runs: Llama, Qwen2 (q/k/v bias), Qwen3 (q/k norm), Mixtral (experts), as
transformers names and loads them. Used by the tests and benchmarks: remp never downloads models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

BYTE_VOCAB = 256
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]
ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
}
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def tiny_config(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": BYTE_VOCAB + len(SPECIALS),
        "hidden_size": 96,
        "intermediate_size": 160,
        "num_hidden_layers": 4,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
        "bos_token_id": BYTE_VOCAB,
        "eos_token_id": BYTE_VOCAB + 1,
        "torch_dtype": "float32",
    }
    model_type = overrides.get("model_type", "llama")
    cfg["architectures"] = [ARCHITECTURES[model_type]]
    if model_type == "mixtral":
        cfg.update(num_local_experts=3, num_experts_per_tok=2, sliding_window=None)
    cfg.update(overrides)
    if "head_dim" not in overrides:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return cfg


def random_weights(cfg: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    H, I, D = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv, V = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]
    model_type = cfg.get("model_type", "llama")
    bias = model_type == "qwen2" or cfg.get("attention_bias", False)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).to(dtype)

    w = {"model.embed_tokens.weight": rand(V, H, std=1.0), "model.norm.weight": 1 + rand(H, std=0.1)}
    if not cfg.get("tie_word_embeddings"):
        w["lm_head.weight"] = rand(V, H, std=0.2)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + rand(H, std=0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + rand(H, std=0.1)
        w[p + "self_attn.q_proj.weight"] = rand(nq * D, H, std=0.2)
        w[p + "self_attn.k_proj.weight"] = rand(nkv * D, H, std=0.2)
        w[p + "self_attn.v_proj.weight"] = rand(nkv * D, H, std=0.2)
        w[p + "self_attn.o_proj.weight"] = rand(H, nq * D, std=0.1)
        if bias:
            w[p + "self_attn.q_proj.bias"] = rand(nq * D, std=0.2)
            w[p + "self_attn.k_proj.bias"] = rand(nkv * D, std=0.2)
            w[p + "self_attn.v_proj.bias"] = rand(nkv * D, std=0.2)
        if model_type == "qwen3":
            w[p + "self_attn.q_norm.weight"] = 1 + rand(D, std=0.1)
            w[p + "self_attn.k_norm.weight"] = 1 + rand(D, std=0.1)
        if model_type == "mixtral":
            # a router spread wide enough that each token's top k are clear (no near-ties between experts)
            w[p + "block_sparse_moe.gate.weight"] = rand(cfg["num_local_experts"], H, std=0.3)
            for e in range(cfg["num_local_experts"]):
                q = f"{p}block_sparse_moe.experts.{e}."
                w[q + "w1.weight"] = rand(I, H, std=0.1)
                w[q + "w3.weight"] = rand(I, H, std=0.1)
                w[q + "w2.weight"] = rand(H, I, std=0.1)
        else:
            w[p + "mlp.gate_proj.weight"] = rand(I, H, std=0.1)
            w[p + "mlp.up_proj.weight"] = rand(I, H, std=0.1)
            w[p + "mlp.down_proj.weight"] = rand(H, I, std=0.1)
    return w


def write_tokenizer(path: Path) -> None:
    """A byte-level BPE with no merges: one token per byte, so any text round-trips, plus ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHATML
    fast.save_pretrained(str(path))


def write_random_llama(
    path: str | Path, seed: int = 0, num_shards: int = 1, dtype: torch.dtype = torch.float32, **overrides: Any
) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(**overrides)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    weights = random_weights(cfg, seed, dtype)
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    if num_shards == 1:
        save_file(weights, str(path / "model.safetensors"))
    else:
        names = list(weights)
        weight_map = {}
        for s in range(num_shards):
            fname = f"model-{s + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {n: weights[n] for n in names[s::num_shards]}
            save_file(part, str(path / fname))
            weight_map.update({n: fname for n in part})
        total = sum(t.nbytes for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / "model.safetensors.index.json").write_text(json.dumps(index))
    write_tokenizer(path)
    return path
