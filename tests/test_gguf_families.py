"""GGUF files of Qwen3 and Mixtral, written as llama.cpp's converter writes them (Qwen3 as "qwen3" with its q/k
norms; Mixtral as a "llama" with experts, stacked, and q/k rows permuted), read as the very model of their
safetensors: the same config and, for every shard, the same tensors."""

import json

import gguf
import numpy as np
import pytest
import torch

from remp.config import UnsupportedModelError
from remp.model.gguf_reader import GGUFReader
from remp.model.loader import load_shard_weights
from remp.model.reader import open_checkpoint
from remp.topology import Topology

BLOCK = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
EXPERTS = {"w1": "ffn_gate_exps.weight", "w3": "ffn_up_exps.weight", "w2": "ffn_down_exps.weight"}


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k permutation (its llama converter): per head, (first half, second half) -> pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(src, path, arch: str) -> None:
    cfg = json.loads((src / "config.json").read_text())
    reader = open_checkpoint(src)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    if "num_local_experts" in cfg:
        w.add_expert_count(cfg["num_local_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
    w.add_tensor("token_embd.weight", reader.read("model.embed_tokens.weight").numpy())
    w.add_tensor("output_norm.weight", reader.read("model.norm.weight").numpy())
    w.add_tensor("output.weight", reader.read("lm_head.weight").numpy())
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        for hf, name in BLOCK.items():
            if reader.has(prefix + hf):
                t = reader.read(prefix + hf).numpy()
                if arch == "llama" and hf.startswith(("self_attn.q_proj", "self_attn.k_proj")):
                    heads = cfg["num_attention_heads" if "q_proj" in hf else "num_key_value_heads"]
                    t = permute(t, heads)
                w.add_tensor(f"blk.{i}.{name}", t)
        for hf, name in EXPERTS.items():
            if reader.has(f"{prefix}block_sparse_moe.experts.0.{hf}.weight"):
                experts = range(cfg["num_local_experts"])
                stacked = [reader.read(f"{prefix}block_sparse_moe.experts.{e}.{hf}.weight") for e in experts]
                w.add_tensor(f"blk.{i}.{name}", torch.stack(stacked).numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("model, arch", [("tiny_qwen3", "qwen3"), ("tiny_mixtral", "llama")])
def test_gguf_reads_as_its_safetensors(model, arch, request, tmp_path, monkeypatch):
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path / "cache"))
    src = request.getfixturevalue(model)
    write_gguf(src, tmp_path / "model.gguf", arch)
    ours, theirs = GGUFReader(tmp_path / "model.gguf"), open_checkpoint(src)
    a, b = ours.config, theirs.config
    assert a.architecture == b.architecture
    for field in ("num_experts", "num_experts_per_tok", "head_dim", "num_key_value_heads", "intermediate_size"):
        assert getattr(a, field) == getattr(b, field), field
    for tp in (1, 2, 4):
        for worker in range(tp):
            spec = Topology(tp, 1).spec(a, worker)
            mine, ref = load_shard_weights(ours, spec, torch.float32), load_shard_weights(theirs, spec, torch.float32)
            assert mine.keys() == ref.keys()
            for name in ref:
                assert torch.equal(mine[name], ref[name]), (tp, worker, name)


def test_unknown_gguf_architecture_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("REMP_CACHE_DIR", str(tmp_path / "cache"))
    w = gguf.GGUFWriter(str(tmp_path / "model.gguf"), "gemma3")
    w.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="'gemma3'.*llama, qwen3"):
        GGUFReader(tmp_path / "model.gguf")
