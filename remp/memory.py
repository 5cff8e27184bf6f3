"""A worker's memory by kind, and giving back what a switch freed.

The kinds add up to the process's resident memory (RSS; on a GPU, what torch's allocator reserves there):
- weights: the shard's canonical tensors (what loading and switches move), each storage once;
- execution: tensors derived from them for the forward (oneDNN-packed linears, fused copies, RoPE tables);
- kv: the KV cache layers;
- staging: buffers a switch allocated (received pieces, send buffers, new weights and KV layers not installed
  yet) that are still alive: zero between switches, unless something holds on to them;
- runtime: what the process held before it held a shard (torch, Python, libraries), shared libraries and mapped
  files (the checkpoint), shared memory it touched (the all-reduce segment);
- unaccounted: the rest: activations of the step in progress, allocator pages freed but not given back, oneDNN
  and gloo buffers.

Tensors are counted by storage, so views (the lm-head of a tied embedding, fused q | k | v) count once. The
shard's figures are computed when it is installed; the heartbeat thread adds RSS and staging, so a report
costs a read of /proc/self/status, not a walk of the model.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

KINDS = ("weights", "execution", "kv", "staging", "runtime", "unaccounted")


@dataclass(frozen=True)
class WorkerMemory:
    """Bytes by kind (they sum to `total`: RSS, or reserved device memory) and where `total` was read."""

    weights: int = 0
    execution: int = 0
    kv: int = 0
    staging: int = 0
    runtime: int = 0
    unaccounted: int = 0
    total: int = 0
    source: str = "rss"  # "rss" (CPU) or "cuda" (torch's reserved device memory)

    def kinds(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in KINDS}

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ShardBytes:
    """What an installed shard holds, by kind, and its storages (so that staging never counts them)."""

    weights: int = 0
    execution: int = 0
    kv: int = 0
    storages: frozenset[int] = frozenset()


def _storage(t: torch.Tensor) -> tuple[int, int]:
    """(key, bytes) of the memory behind a tensor: its storage; an opaque oneDNN tensor is its own."""
    if t.is_mkldnn:
        return id(t), t.numel() * t.element_size()
    s = t.untyped_storage()
    return s.data_ptr(), s.nbytes()


def storage_bytes(tensors: Iterable[torch.Tensor], skip: set[int] | None = None) -> tuple[int, set[int]]:
    """Bytes of the distinct storages behind `tensors` (those in `skip` aside), and their keys."""
    total, keys = 0, set()
    for t in tensors:
        key, n = _storage(t)
        if key not in keys and (skip is None or key not in skip):
            keys.add(key)
            total += n
    return total, keys


def tensors_in(obj: object, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor an execution-form object reaches through its attributes, lists, tuples and dicts."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from tensors_in(v, seen)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from tensors_in(v, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        for v in vars(obj).values():
            yield from tensors_in(v, seen)


def shard_bytes(weights: dict[str, torch.Tensor], execution: Iterable[object], kv: list[torch.Tensor]) -> ShardBytes:
    """A shard's account: canonical weights, what its execution form holds beyond them, its KV layers."""
    w, w_keys = storage_bytes(weights.values())
    seen: set[int] = set()
    e, e_keys = storage_bytes((t for obj in execution for t in tensors_in(obj, seen)), skip=w_keys)
    k, k_keys = storage_bytes(kv)
    return ShardBytes(w, e, k, frozenset(w_keys | e_keys | k_keys))


class Staging:
    """The buffers switches allocate, weakly held: what is still alive of them is staging (or, once installed,
    the shard's). One per process; any thread may add or read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tensors: weakref.WeakSet = weakref.WeakSet()

    def add(self, t: torch.Tensor) -> torch.Tensor:
        with self._lock:
            self._tensors.add(t)
        return t

    def bytes(self, installed: frozenset[int]) -> int:
        """Bytes of the tracked buffers alive now that the installed shard does not hold."""
        with self._lock:
            alive = list(self._tensors)
        return storage_bytes(alive, skip=set(installed))[0]


STAGING = Staging()


def _status_kb(fields: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:  # not Linux: nothing to read, every figure stays 0
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in out:
            out[key] = int(value.split()[0]) * 1024
    return out


class MemoryAccount:
    """One process's account. Created before the process holds a shard: what it holds then is runtime."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = _status_kb(("RssAnon",))["RssAnon"]

    def measure(self, shard: ShardBytes) -> WorkerMemory:
        """`shard`: what the installed shard holds (computed when it was installed)."""
        staging = STAGING.bytes(shard.storages)
        held = shard.weights + shard.execution + shard.kv + staging
        if self.device.type == "cuda":
            total = torch.cuda.memory_reserved(self.device)
            return WorkerMemory(shard.weights, shard.execution, shard.kv, staging, 0, total - held, total, "cuda")
        s = _status_kb(("RssAnon", "RssFile", "RssShmem"))
        runtime = self.baseline + s["RssFile"] + s["RssShmem"]
        total = s["RssAnon"] + s["RssFile"] + s["RssShmem"]
        return WorkerMemory(shard.weights, shard.execution, shard.kv, staging, runtime, total - held - runtime, total)


def _malloc_trim() -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return False
    return bool(libc.malloc_trim(0))


def give_back(device: torch.device) -> None:
    """After a switch dropped the old shard and its staging: return the allocator's free pages to the system.
    glibc keeps freed chunks below its mmap threshold (which grows up to 32 MiB with the sizes freed) in its
    arenas, the pre-copy thread's arena included, and they stay resident; malloc_trim releases the free pages of
    every arena (tens of ms per GB returned). On a GPU, torch's caching allocator keeps them instead."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        _malloc_trim()
