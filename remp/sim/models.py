"""The models the H100 figures cover, as ModelConfigs (their Hugging Face config.json values): the simulator
needs their shapes for the planner and the memory, never their weights."""

from __future__ import annotations

from remp.config import ModelConfig
from remp.model.families import config_from_hf

LLAMA_2 = {
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32
    ),
    "llama-2-70b": dict(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    ),
}


def model_config(name: str) -> ModelConfig:
    if name not in LLAMA_2:
        raise ValueError(f"unknown model {name!r} for simulation; choose from {', '.join(LLAMA_2)}")
    return config_from_hf(
        dict(
            architectures=["LlamaForCausalLM"],
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
            torch_dtype="float16",
            **LLAMA_2[name],
        )
    )
