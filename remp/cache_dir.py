"""Where remp keeps what it derives once and reuses: `REMP_CACHE_DIR`, default ~/.cache/remp (GGUF tables and
tokenizers, kernel builds, performance profiles). Nothing in it is ever downloaded."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("REMP_CACHE_DIR") or Path.home() / ".cache" / "remp")
