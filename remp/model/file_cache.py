"""A local cache of what is slow to derive from a checkpoint file and never changes while the file does not:
a GGUF file's metadata and tensor table (parsing its 49k-entry vocabulary takes seconds) and the tokenizer
converted from it (seconds more). Keyed by the file's path, size and mtime; each entry is written to a
temporary name and renamed, so concurrent workers never read a half-written one. Nothing is ever downloaded.

`REMP_CACHE_DIR` moves it (default ~/.cache/remp); where it cannot be written, remp works without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remp.cache_dir import cache_root
from remp.logger import init_logger

logger = init_logger(__name__)
VERSION = 1  # bump when what is cached changes shape


def entry_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{VERSION}".encode()).hexdigest()[:16]
    return cache_root() / f"{path.stem}-{key}"


def cached_json(path: Path, name: str, build: Callable[[], Any]) -> Any:
    """build()'s JSON value for this file, from the cache when present."""
    target = entry_dir(path) / name
    try:
        return json.loads(target.read_text())
    except (OSError, ValueError):
        pass
    value = build()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=target.parent, delete=False, suffix=".tmp") as f:
            json.dump(value, f)
        os.replace(f.name, target)
    except OSError as e:
        logger.debug("cannot cache %s: %s", target, e)
    return value


def cached_dir(path: Path, name: str, build: Callable[[Path], None]) -> Path | None:
    """A directory that build(dir) filled for this file, from the cache when present; None if uncacheable."""
    target = entry_dir(path) / name
    if target.is_dir():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, suffix=".tmp"))
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process made it first
            shutil.rmtree(tmp, ignore_errors=True)
        return target
    except OSError as e:
        logger.debug("cannot cache %s: %s", target, e)
        return None
