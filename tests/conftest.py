import pytest

from remp.tools.random_model import write_random_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """6 q heads / 2 KV heads, 4 layers, float32 safetensors."""
    return write_random_llama(tmp_path_factory.mktemp("tiny_llama"), seed=1)


@pytest.fixture(scope="session")
def tiny_llama_sharded(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tiny_llama_sharded"), seed=1, num_shards=3)


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    return write_random_llama(
        tmp_path_factory.mktemp("tiny_qwen2"),
        seed=2,
        model_type="qwen2",
        num_attention_heads=9,
        num_key_value_heads=3,
        hidden_size=72,
        tie_word_embeddings=True,
    )


@pytest.fixture(scope="session")
def tiny_llama3_rope(tmp_path_factory):
    return write_random_llama(
        tmp_path_factory.mktemp("tiny_llama3"),
        seed=3,
        num_attention_heads=4,
        num_key_value_heads=4,
        hidden_size=64,
        max_position_embeddings=1024,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    """q/k norm; head_dim 16 x 8 heads != hidden 96 (an explicit head_dim)."""
    return write_random_llama(
        tmp_path_factory.mktemp("tiny_qwen3"), seed=4, model_type="qwen3", num_attention_heads=8, head_dim=16
    )


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory):
    """3 experts, top 2: TP2 splits them 2+1, TP4 leaves one rank without experts."""
    return write_random_llama(tmp_path_factory.mktemp("tiny_mixtral"), seed=5, model_type="mixtral")
