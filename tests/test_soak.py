"""A short soak (bench/soak.py): 60 switches among random shapes of a 4-worker pool with requests flowing, two
workers SIGKILLed and recovered from: no request lost, no token changed against an unswitched run, no worker,
shared-memory segment, file descriptor or thread left behind."""

import importlib.util
import sys
from pathlib import Path

import pytest

from remp.tools.random_model import write_random_llama

SOAK = Path(__file__).resolve().parents[1] / "bench" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sixty_switches_and_two_kills_lose_and_leak_nothing(tmp_path):
    soak = load_soak()
    model = str(write_random_llama(tmp_path / "model", seed=1))
    result = soak.run_chunk(model, switches=60, kills=2, seed=7, time_limit_s=300, tag="t")
    assert result["switches"] == 60, "the time bound cut the soak short"
    assert result["kills"] == 2 and result["recoveries"] >= 2
    assert result["counts"]["live"] > 0 and result["counts"]["stop"] > 0
    assert result["counts"]["grow"] > 0 and result["counts"]["shrink"] > 0 and result["counts"]["dp"] > 0
    assert result["requests"] > 60 and not result["lost_requests"]
    assert not result["changed_requests"], result["changed_requests"][:5]
    leaks = result["leaks"]
    assert not leaks["workers_alive"] and not leaks["processes"] and not leaks["shm_segments"]
    assert not leaks["fds"], leaks["fds"]
    assert leaks["threads"] <= 0
