"""Impossible topologies are refused before anything starts; a worker that fails, dies or hangs becomes a
clear error within a bounded time; no worker process outlives the engine or its driver."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file, save_file

from remp import LLM, LLMEngine, SamplingParams
from remp.engine import EngineDeadError
from remp.executor import WorkerError


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "State:\tZ" not in f.read()
    except FileNotFoundError:
        return False


def wait_dead(pids, timeout=15.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if alive(p)]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tensor_parallel_size": 7}, "attention heads"),
        ({"pipeline_parallel_size": 5}, "number of layers"),
        ({"tensor_parallel_size": 0}, "positive"),
    ],
)
def test_impossible_topology_refused_before_spawning(tiny_llama, kwargs, match):
    import multiprocessing

    with pytest.raises(ValueError, match=match):
        LLM(str(tiny_llama), **kwargs)
    assert not multiprocessing.active_children()


def test_missing_checkpoint_on_one_worker(tmp_path, tiny_llama):
    """Stage 1's tensors live in a file that is gone: the driver and stage 0 load, worker 1 reports it."""
    weights = load_file(str(tiny_llama / "model.safetensors"))
    late = {n for n in weights if n.startswith(("model.layers.2.", "model.layers.3.", "model.norm", "lm_head"))}
    d = tmp_path / "split"
    d.mkdir()
    for f in tiny_llama.iterdir():
        if f.name != "model.safetensors":
            (d / f.name).write_bytes(f.read_bytes())
    save_file({n: w for n, w in weights.items() if n not in late}, str(d / "a.safetensors"))
    index = {"metadata": {}, "weight_map": {n: ("b.safetensors" if n in late else "a.safetensors") for n in weights}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(WorkerError, match=r"worker 1 \(stage 1, tp rank 0\) failed(.|\n)*b.safetensors"):
        LLM(str(d), dtype="float64", pipeline_parallel_size=2)


def _engine(path, **kw):
    engine = LLMEngine(model=str(path), dtype="float64", tensor_parallel_size=2, **kw)
    for i in range(3):
        engine.add_request(
            str(i), {"prompt_token_ids": [256, i, 7, 9]}, SamplingParams(max_tokens=200, ignore_eos=True)
        )
    engine.step()
    engine.step()
    return engine, [p.pid for p in engine.executor.procs]


def test_worker_killed_mid_run_without_recovery(tiny_llama):
    engine, pids = _engine(tiny_llama, worker_recovery=False)
    os.kill(pids[1], signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"worker 1 .*(died|failed)"):
        for _ in range(100):
            engine.step()
    assert time.monotonic() - t0 < 30
    with pytest.raises(EngineDeadError):
        engine.step()
    engine.shutdown()
    assert not wait_dead(pids)


def test_hung_worker_times_out_without_recovery(tiny_llama):
    engine, pids = _engine(tiny_llama, worker_timeout_s=3, worker_recovery=False)
    os.kill(pids[0], signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        with pytest.raises(WorkerError, match="hangs|failed|died"):
            for _ in range(100):
                engine.step()
        assert time.monotonic() - t0 < 20
    finally:
        engine.shutdown()
    assert not wait_dead(pids)


DRIVER = """
import faulthandler, signal, sys, time
from remp import LLMEngine, SamplingParams
if __name__ == "__main__":
    # Ctrl-C as in a terminal, even when the suite runs in the background (`make test &` makes the shell ignore
    # SIGINT, and children inherit that: Python then installs no KeyboardInterrupt handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.dump_traceback_later(40, exit=False)  # if this driver hangs, the test shows where
    e = LLMEngine(model=sys.argv[1], dtype="float64", tensor_parallel_size=2)
    print(" ".join(str(p.pid) for p in e.executor.procs), flush=True)
    e.add_request("a", {"prompt_token_ids": [256, 1, 2]}, SamplingParams(max_tokens=10**6, ignore_eos=True))
    try:
        while True:
            e.step()
    except KeyboardInterrupt:
        e.shutdown()
        print("interrupted", flush=True)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_no_orphans_when_driver_interrupted_or_killed(tmp_path, tiny_llama, sig):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    err = (tmp_path / "driver.err").open("w")
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tiny_llama)], stdout=subprocess.PIPE, stderr=err, text=True
    )
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(1.0)
        proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            stacks = (tmp_path / "driver.err").read_text()[-6000:]
            pytest.fail(f"the driver did not exit after {sig!r}; its stacks:\n{stacks}")
        assert not wait_dead(pids)
    finally:
        proc.kill()
        proc.wait()
        err.close()
