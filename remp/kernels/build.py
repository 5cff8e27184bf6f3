"""Compile a kernel source of this package into a shared library once per machine, and load it."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from remp.cpu_features import cpu_features
from remp.logger import init_logger
from remp.model.file_cache import cache_root

logger = init_logger(__name__)
SOURCES = ("paged_attention.cpp", "layer_ops.cpp", "sampling.cpp")
# no flag here changes a result: -fno-trapping-math and -fno-math-errno only let clamps and sqrt vectorise
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def native_kernels_enabled() -> bool:
    return os.environ.get("REMP_NATIVE_KERNELS", "1") not in ("0", "")


def profiled(name: str) -> AbstractContextManager:
    """Names a kernel call in torch profiles (ctypes calls are not ops); record_function costs ~8 us, so only
    while a profiler runs."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else nullcontext()


def build_all() -> None:
    """Build every kernel now (in parallel), so that no request waits for a compiler: at start-up, once per
    machine, before the workers start (they find the builds in the cache)."""
    if native_kernels_enabled():
        with ThreadPoolExecutor(len(SOURCES)) as pool:
            list(pool.map(load, SOURCES))


@functools.cache
def load(source: str) -> ctypes.CDLL | None:
    """The library built from `source` (a file beside this module), or None where it cannot be built here."""
    if not native_kernels_enabled():
        return None
    src = Path(__file__).with_name(source)
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        logger.warning("no C++ compiler found: the %s kernel runs as torch ops (slower)", src.stem)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
        cpu = cpu_features()
        headers = [h.read_text() for h in sorted(src.parent.glob("*.h"))]
        key = hashlib.sha256(
            "|".join([src.read_text(), *headers, version, " ".join(FLAGS), cpu.model_name, *sorted(cpu.flags)]).encode()
        ).hexdigest()[:16]
        t0 = time.monotonic()
        target, built = _build(compiler, src, f"{src.stem}-{key}.so")
        if built:
            logger.info("built the %s kernel for this CPU in %.1f s (%s)", src.stem, time.monotonic() - t0, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("the %s kernel could not be built (%s): it runs as torch ops (slower)", src.stem, e)
        return None


def _build(compiler: str, src: Path, name: str) -> tuple[Path, bool]:
    """The library's path, and whether it was built now (False: found in the cache)."""
    for folder in (cache_root() / "kernels", Path(tempfile.gettempdir()) / f"remp-kernels-{os.getuid()}"):
        target = folder / name
        if target.exists():
            return target, False
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # built under a temporary name and renamed: workers building at once never load a half-written file
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
            os.close(fd)
        except OSError:
            continue
        try:
            done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(src)], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
            os.replace(tmp, target)
            return target, True
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise OSError("no writable folder for the build")
