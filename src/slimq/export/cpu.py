"""Which INT8 weight storage the CPU that saves a model computes exactly and fast.

ONNX Runtime's x86 kernels multiply uint8 activations by int8 weights. With VNNI (``vpdpbusd``:
AVX-512 VNNI, AVX-VNNI) or AMX the products go straight into int32; on AVX2-only CPUs (Intel
before Cascade Lake, AMD before Zen 4) they go through ``vpmaddubsw``, which adds pairs of
products in saturating int16 and silently corrupts large sums. uint8 weights (zero point 128)
avoid that step on every CPU but take ONNX Runtime's slower uint8 x uint8 kernels (1.7-2.3x the
latency of int8 weights on an AVX-512 VNNI EPYC, ``benchmarks/bench_deploy.py``).

``signed_weights=None`` (the default of save) therefore stores int8 only where this module
reads VNNI or AMX in the CPU's flags; everywhere else, and wherever the flags cannot be read,
uint8, which is exact everywhere. Only the saving machine is seen: the report says which storage
was chosen and why, so a file meant for another CPU class is saved with an explicit choice.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path
from typing import FrozenSet, Optional, Tuple

__all__ = ["int8_weights_default", "EXACT_INT8_FLAGS"]

# ISA flags (as /proc/cpuinfo spells them) whose int8 dot product accumulates in int32
EXACT_INT8_FLAGS: FrozenSet[str] = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.lru_cache(maxsize=None)
def _cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> FrozenSet[str]:
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def int8_weights_default(machine: str = "", flags: Optional[FrozenSet[str]] = None) -> Tuple[bool, str]:
    """``(signed, reason)``: int8 weights where this CPU multiplies them exactly and fast, else uint8."""
    machine = (machine or platform.machine()).lower()
    flags = _cpu_flags() if flags is None else flags
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        found = sorted(flags & EXACT_INT8_FLAGS)
        if found:
            return True, (f"int8 weights: this CPU has {', '.join(found)}, whose int8 kernels in ONNX Runtime "
                          "accumulate exactly and fast; AVX2-only CPUs (Intel before Cascade Lake, AMD before "
                          "Zen 4) saturate on them: save with signed_weights=False for those")
        return False, ("uint8 weights (zero point 128): this CPU shows no VNNI/AMX flag, and ONNX Runtime's int8 "
                       "kernels without them add products in saturating int16; pass signed_weights=True for a "
                       "file meant for a VNNI CPU (about 2x faster there)")
    return False, (f"uint8 weights (zero point 128): exact on every runtime; int8 weights were not verified on "
                   f"'{machine}' CPUs: pass signed_weights=True where your runtime takes int8 weights")
