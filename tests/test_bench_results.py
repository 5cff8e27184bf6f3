"""remp/bench/results.py: the envelope every benchmark result carries, and what it refuses."""

import json
import subprocess
import sys

import pytest

from remp.bench import results


def test_envelope_then_the_result(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/x.py", "--rounds", "2", "--tag", "a b"])
    path = results.save_result({"rows": [1, 2]}, "ignored", dtype="bfloat16", path=tmp_path / "x.json")
    saved = json.loads(path.read_text())
    assert list(saved) == [*results.ENVELOPE_KEYS, "rows"] and saved["rows"] == [1, 2]
    assert saved["dtype"] == "bfloat16" and saved["command"] == "python bench/x.py --rounds 2 --tag 'a b'"
    head = subprocess.run(["git", "-C", str(results.ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert saved["commit"] == (head.stdout.strip() or None) and isinstance(saved["dirty"], bool | None)
    m = saved["machine"]
    assert m["cpu"] and m["cores"] >= 1 and set(m["flags"]) == {"avx2", "avx512f", "avx512_bf16", "amx"}
    assert saved["date"][:4].isdigit() and "T" in saved["date"]


def test_named_results_go_under_bench_results(tmp_path, monkeypatch):
    monkeypatch.setattr(results, "RESULTS_DIR", tmp_path / "results")
    assert results.save_result({}, "floor", dtype=None) == tmp_path / "results" / "floor.json"


def test_a_key_that_would_shadow_the_envelope_is_refused(tmp_path):
    with pytest.raises(ValueError, match="date"):
        results.save_result({"date": "yesterday"}, "x", dtype=None, path=tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_describe_machine_reads_new_and_old_envelopes():
    new = {"cpu": "AMD EPYC", "cores": 2, "flags": {"avx2": True, "avx512f": False, "avx512_bf16": False, "amx": False}}
    assert results.describe_machine(new) == "AMD EPYC, 2 cores [avx2]"
    assert results.describe_machine("AMD EPYC [avx2 fma]") == "AMD EPYC [avx2 fma]"
