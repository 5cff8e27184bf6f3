"""remp's logger: INFO to stderr by default, as vLLM's is (REMP_LOGGING_LEVEL=WARNING quietens it)."""

from __future__ import annotations

import logging
import os

_root = logging.getLogger("remp")
if not _root.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s remp: %(message)s", "%m-%d %H:%M:%S"))
    _root.addHandler(_handler)
    _root.setLevel(os.environ.get("REMP_LOGGING_LEVEL", "INFO").upper())
    _root.propagate = False


def init_logger(name: str) -> logging.Logger:
    return logging.getLogger(name if name.startswith("remp") else f"remp.{name}")
