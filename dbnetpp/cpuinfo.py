"""The CPU a figure was measured on: its model name and the vector extensions that decide
float32, int8 and bf16 speed (Linux ``/proc/cpuinfo``; empty elsewhere)."""

import os
from pathlib import Path
from typing import Any, Dict, Optional, Set

__all__ = ["ISA_FLAGS", "cpu_flags", "cpu_info"]

ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo_lines() -> list:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_flags() -> Optional[Set[str]]:
    """The first CPU's flags, or None where /proc/cpuinfo cannot be read."""
    for line in _cpuinfo_lines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return None


def cpu_info() -> Dict[str, Any]:
    """``{"cpu": model name, "isa": [the ISA_FLAGS it has], "cores": logical CPUs}``."""
    name = next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith("model name")),
                "unknown")  # fmt: skip
    flags = cpu_flags() or set()
    return {"cpu": name, "isa": [f for f in ISA_FLAGS if f in flags], "cores": os.cpu_count()}
