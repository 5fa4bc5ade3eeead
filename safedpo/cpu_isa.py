"""Make this machine compute as a machine with another instruction set would (the toy's robustness).

Floating-point results of the same program differ between CPUs: PyTorch's vectorized kernels, MKL's
matrix products and oneDNN pick code paths by the instruction set (AVX-512, AVX2, or neither), and the
C++ kernels are built for the best one present. Each of them can be capped by an environment variable,
read when the library first runs, so a process started with ``environment(isa)`` computes as one on an
``isa`` machine does (for PyTorch and MKL, which also rounds alike across CPUs under MKL_CBWR):

    isa        ATEN_CPU_CAPABILITY  MKL_ENABLE_INSTRUCTIONS  MKL_CBWR  ONEDNN_MAX_CPU_ISA  SAFEDPO_NATIVE_ISA
    avx512     avx512               AVX512                   AVX512    AVX512_CORE         avx512
    avx2       avx2                 AVX2                     AVX2      AVX2                avx2
    default    default              SSE4_2                   SSE4_2    SSE41               default

"native" sets nothing. ``safedpo experiment ... --isa avx2`` (``make train ISA=avx2``) restarts itself
in that environment.
"""

from __future__ import annotations

import os
import sys

ISAS = ("native", "avx512", "avx2", "default")
_SETTINGS = {
    "avx512": ("avx512", "AVX512", "AVX512", "AVX512_CORE", "avx512"),
    "avx2": ("avx2", "AVX2", "AVX2", "AVX2", "avx2"),
    "default": ("default", "SSE4_2", "SSE4_2", "SSE41", "default"),
}
_NAMES = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA", "SAFEDPO_NATIVE_ISA")
MARK = "SAFEDPO_CPU_ISA"


def environment(isa: str) -> dict:
    """The environment variables that make a process compute as on an ``isa`` machine."""
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {ISAS}, got {isa!r}")
    if isa == "native":
        return {MARK: isa}
    return dict(zip(_NAMES, _SETTINGS[isa]), **{MARK: isa})


def restart_as(isa: str) -> None:
    """Unless this process already runs as ``isa``, start the same command again in its environment (the
    variables must be set before PyTorch first computes anything); returns only when already there."""
    if os.environ.get(MARK) == isa:
        return
    env = {**os.environ, **environment(isa)}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "safedpo", *sys.argv[1:]], env)
