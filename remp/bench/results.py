"""One writer for the results of the scripts under bench/: a JSON file under bench/results/ whose first keys are
its envelope, the facts any figure needs to be read and reproduced:

    date      when it was saved (local time, with its UTC offset)
    commit    the git commit measured; dirty: whether tracked files differed from it (results aside)
    machine   the CPU's model name (lscpu), its core count, and the flags that decide our kernels' speed
    dtype     what the benchmark computed in (None where each run records its own)
    command   the command line that produced it

The benchmark's own keys follow; one that would shadow the envelope is refused."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "bench" / "results"
ENVELOPE_KEYS = ("date", "commit", "dirty", "machine", "dtype", "command")
FLAGS = ("avx2", "avx512f", "avx512_bf16")  # and "amx": any AMX flag (amx_tile, amx_bf16, amx_int8)


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_state() -> dict:
    """The commit of this checkout and whether its tracked files differ from it (bench/results/ excluded: a
    rerun overwrites a committed result). None for both outside a git checkout."""
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    return {"commit": commit.strip() if commit else None, "dirty": bool(status.strip()) if status is not None else None}


def _lscpu() -> tuple[str, set[str]]:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"}).stdout
    except OSError:
        out = ""
    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    if fields.get("Model name"):
        return fields["Model name"], set(fields.get("Flags", "").split())
    from remp.cpu_features import cpu_features  # no lscpu: /proc/cpuinfo

    cpu = cpu_features()
    return cpu.model_name, set(cpu.flags)


def machine() -> dict:
    name, flags = _lscpu()
    shown = {f: f in flags for f in FLAGS} | {"amx": any(f.startswith("amx") for f in flags)}
    return {"cpu": name, "cores": os.cpu_count(), "flags": shown}


def describe_machine(machine: dict | str) -> str:
    """One line for a table: "AMD EPYC, 2 cores [avx2 avx512f]" (older results hold a line already)."""
    if isinstance(machine, str):
        return machine
    flags = " ".join(f for f, on in machine["flags"].items() if on) or "none of " + " ".join(machine["flags"])
    return f"{machine['cpu']}, {machine['cores']} cores [{flags}]"


def envelope(dtype: str | None) -> dict:
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        **git_state(),
        "machine": machine(),
        "dtype": dtype,
        "command": shlex.join(["python", *sys.argv]),
    }


def save_result(result: dict, name: str, *, dtype: str | None, path: str | Path | None = None) -> Path:
    """Writes the envelope and `result` to `path`, or bench/results/<name>.json; prints and returns where."""
    shadowed = set(ENVELOPE_KEYS) & result.keys()
    if shadowed:
        raise ValueError(f"result keys {sorted(shadowed)} would shadow the envelope's")
    out = Path(path) if path is not None else RESULTS_DIR / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**envelope(dtype), **result}, indent=2) + "\n")
    print(f"saved {out}", flush=True)
    return out
