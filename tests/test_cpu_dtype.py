"""The dtype and kernels follow the CPU that runs the suite: dtype="auto" is bf16 only with native bf16, and
bf16 without it (no oneDNN packing) still generates. The default configurations (`LLM()`, `remp serve`) run
end to end on whatever CPU this is."""

import json
import logging
import platform
import urllib.request

import pytest
import torch

from remp import LLM, SamplingParams
from remp.config import ModelConfig, resolve_dtype
from remp.cpu_features import CpuFeatures, cpu_features
from tests.server_utils import remp_server

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
AVX2_ONLY = CpuFeatures("AMD EPYC", frozenset({"avx", "avx2", "fma"}))
AVX512_BF16 = CpuFeatures(
    "Intel Xeon", frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"})
)


def gguf_like_config(torch_dtype=None) -> ModelConfig:
    return ModelConfig("llama", 64, 16, 32, 1, 2, 1, 8, 1e-5, 1e4, 64, True, torch_dtype=torch_dtype)


@pytest.mark.parametrize(
    "cpu, checkpoint, expected",
    [
        (AVX2_ONLY, None, torch.float32),
        (AVX512_BF16, None, torch.bfloat16),
        (AVX2_ONLY, torch.bfloat16, torch.float32),
        (AVX512_BF16, torch.float32, torch.bfloat16),
        (AVX2_ONLY, torch.float64, torch.float64),
    ],
)
def test_auto_dtype_needs_native_bf16(monkeypatch, cpu, checkpoint, expected):
    monkeypatch.setattr("remp.config.cpu_features", lambda: cpu)
    dtype, why = resolve_dtype("auto", gguf_like_config(checkpoint))
    assert dtype == expected
    assert why.startswith("auto") and (cpu.model_name in why or expected == torch.float64)


def test_explicit_bf16_without_native_support_says_it_is_slow(monkeypatch):
    monkeypatch.setattr("remp.config.cpu_features", lambda: AVX2_ONLY)
    dtype, why = resolve_dtype("bfloat16", gguf_like_config())
    assert dtype == torch.bfloat16 and "slow" in why
    assert resolve_dtype("float16", gguf_like_config())[0] == torch.bfloat16  # half on CPU is bf16


def test_feature_rules():
    assert not AVX2_ONLY.native_bf16 and not AVX2_ONLY.onednn_bf16
    assert AVX2_ONLY.onednn_fp32 == (platform.machine() in ("x86_64", "AMD64") and torch.backends.mkldnn.is_available())
    assert not CpuFeatures("no simd", frozenset()).onednn_fp32
    assert AVX512_BF16.native_bf16
    assert not CpuFeatures("x", AVX512_BF16.flags, bf16_disabled=True).native_bf16
    assert "avx512_bf16" in AVX512_BF16.describe() and "avx2" in AVX2_ONLY.describe()


def packed_flags(llm: LLM) -> set[bool]:
    model = llm.llm_engine.executor.runner.model
    linears = [x for layer in model.layers for x in (layer.qkv, layer.o, layer.mlp.gate_up, layer.mlp.down)]
    linears.append(model.lm_head)
    return {lin.packed for lin in linears}


def test_default_llm_generates_on_this_cpu():
    """LLM() exactly as a user writes it: the bundled model, dtype auto, in-process worker."""
    cpu = cpu_features()
    with LLM() as llm:
        assert llm.llm_engine.dtype == (torch.bfloat16 if cpu.native_bf16 else torch.float32), cpu.describe()
        dtype = llm.llm_engine.dtype
        assert packed_flags(llm) == {cpu.onednn_bf16 if dtype == torch.bfloat16 else cpu.onednn_fp32}
        out = llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    assert "Paris" in out.text


def test_bf16_without_native_support_uses_plain_matmuls(monkeypatch):
    monkeypatch.setenv("REMP_DISABLE_NATIVE_BF16", "1")
    cpu_features.cache_clear()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("remp").addHandler(handler)
    try:
        with LLM(dtype="bfloat16") as llm:
            assert packed_flags(llm) == {False}
            out = llm.chat(CHAT, SamplingParams(max_tokens=24, temperature=0))[0].outputs[0]
    finally:
        logging.getLogger("remp").removeHandler(handler)
        monkeypatch.undo()
        cpu_features.cache_clear()
    assert "Paris" in out.text
    assert any(r.levelno == logging.WARNING and "slow" in r.getMessage() for r in records)


def test_default_remp_serve_answers_the_readme_chat():
    """`remp serve` with no flags (what `make run` starts): bundled model, dtype auto, TP1 in a worker process."""
    with remp_server() as (url, proc):
        body = json.dumps({"messages": CHAT, "max_tokens": 32, "temperature": 0}).encode()
        req = urllib.request.Request(
            url + "/v1/chat/completions", data=body, headers={"content-type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            answer = json.loads(r.read())["choices"][0]["message"]["content"]
    assert "Paris" in answer
