"""Compile a kernel source of this package into a shared library once per machine, and load it."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

from remp.cache_dir import cache_root
from remp.cpu_features import cpu_features
from remp.logger import init_logger

logger = init_logger(__name__)
SOURCES = ("paged_attention.cpp", "layer_ops.cpp", "sampling.cpp", "small_linear.cpp")
# each kernel is exported once per dtype it supports, named with this suffix
DTYPE_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16"}
# no flag here changes a result: -fno-trapping-math and -fno-math-errno only let clamps and sqrt vectorise
STALE_DAYS = 30  # a build no process has loaded for this long is removed when another build of its kernel is made
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def native_kernels_enabled() -> bool:
    return os.environ.get("REMP_NATIVE_KERNELS", "1").strip().lower() not in ("0", "", "false", "no", "off")


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


def function(source: str, name: str, dtype: torch.dtype, argtypes: list, restype: type | None = None):
    """The ctypes function `name`_<dtype suffix> of the library built from `source`, or None where the library
    cannot be built or the dtype has no version."""
    lib = load(source)
    if lib is None or dtype not in DTYPE_SUFFIX or not hasattr(lib, f"{name}_{DTYPE_SUFFIX[dtype]}"):
        return None
    fn = getattr(lib, f"{name}_{DTYPE_SUFFIX[dtype]}")
    fn.argtypes, fn.restype = argtypes, restype
    return fn


@functools.cache
def load(source: str) -> ctypes.CDLL | None:
    """The library built from `source` (a file beside this module), or None where it cannot be built here."""
    if not native_kernels_enabled():
        return None
    src = Path(__file__).with_name(source)
    cxx = shlex.split(os.environ.get("CXX", "c++")) or ["c++"]  # "ccache g++" is a compiler too
    compiler = shutil.which(cxx[0])
    if compiler is None:
        logger.warning("no C++ compiler found: the %s kernel runs as torch ops (slower)", src.stem)
        return None
    # REMP_KERNEL_CFLAGS adds flags, to tune for a CPU (-mprefer-vector-width=512 on AVX512 machines, where gcc
    # keeps to 256-bit vectors by default)
    command = [compiler, *cxx[1:], *FLAGS, *shlex.split(os.environ.get("REMP_KERNEL_CFLAGS", ""))]
    try:
        version = _compiler_version((compiler, *cxx[1:]))
        cpu = cpu_features()
        headers = [h.read_text() for h in sorted(src.parent.glob("*.h"))]
        key = hashlib.sha256(
            "|".join(
                [src.read_text(), *headers, version, " ".join(command), cpu.model_name, *sorted(cpu.flags)]
            ).encode()
        ).hexdigest()[:16]
        return _build_and_load(command, src, f"{src.stem}-{key}.so")
    except (OSError, subprocess.SubprocessError) as e:
        logger.warning("the %s kernel could not be built (%s): it runs as torch ops (slower)", src.stem, e)
        return None


@functools.cache
def _compiler_version(compiler: tuple[str, ...]) -> str:
    """What the compiler says of itself (part of every build's key): asked once per process, not per kernel."""
    return subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=30).stdout


def _folders() -> list[Path]:
    """Where builds go: the remp cache, else a folder of this user's own in the temporary directory (made 0700,
    and skipped when someone else owns it: a library planted there would run as us)."""
    private = Path(tempfile.gettempdir()) / f"remp-kernels-{os.getuid()}"
    try:
        private.mkdir(mode=0o700, exist_ok=True)
        st = private.stat()
        usable = st.st_uid == os.getuid() and not st.st_mode & 0o022
    except OSError:
        usable = False
    return [cache_root() / "kernels"] + ([private] if usable else [])


def _build_and_load(command: list[str], src: Path, name: str) -> ctypes.CDLL:
    errors = []
    for folder in _folders():
        try:
            return _load_or_build(command, src, folder / name)
        except OSError as e:  # unwritable, a failed build, or a library that will not load (a noexec mount)
            errors.append(f"{folder}: {e}")
    raise OSError("; ".join(errors))


def _load_or_build(command: list[str], src: Path, target: Path) -> ctypes.CDLL:
    if target.exists():
        _touch(target)
        try:
            return ctypes.CDLL(str(target))
        except OSError:
            if target.exists():
                raise
            # another process swept it (unused for a month) between our look and the load: build it again
    _build(command, src, target)
    _sweep(target, src.stem)
    return ctypes.CDLL(str(target))


def _touch(build: Path) -> None:
    """A build in use stays fresh: the sweep removes builds that no process has loaded for STALE_DAYS."""
    try:
        os.utime(build)
    except OSError:  # a read-only or someone else's cache: it is swept by its owner
        pass


def _sweep(keep: Path, stem: str) -> None:
    """Remove this kernel's builds (other sources, compilers, flags or CPUs) unused for STALE_DAYS, and temporary
    files left by a build that was killed: a cache never grows without bound."""
    now, folder = time.time(), keep.parent
    for old in [*folder.glob(f"{stem}-*.so"), *folder.glob("tmp*.so")]:
        try:
            if old != keep and now - old.stat().st_mtime > STALE_DAYS * 86400:
                old.unlink()
        except OSError:  # swept by another process meanwhile, or not ours to remove
            pass


def _build(command: list[str], src: Path, target: Path) -> None:
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    # built under a temporary name and renamed: workers building at once never load a half-written file
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".so")
    os.close(fd)
    try:
        t0 = time.monotonic()
        done = subprocess.run([*command, "-o", tmp, str(src)], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise OSError(f"{command[0]} failed: {done.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)  # mkstemp made it 0600: others sharing the cache must be able to load it
        os.replace(tmp, target)
        logger.info("built the %s kernel for this CPU in %.1f s (%s)", src.stem, time.monotonic() - t0, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
