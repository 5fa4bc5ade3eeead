"""A static issue model of the logits-path kernels: what a card has to execute per element, read off the
compiled SASS, against what it has to move.

A streaming kernel (one pass over the logits) can only run at the memory bandwidth if the SMs can issue
its instructions faster than the bytes arrive. From the SASS of a kernel's hot loop (the block closed by
its backward branch) this counts the warp instructions per trip and the MUFU (special-function unit:
ex2, lg2, rcp) instructions among them, and with the elements a warp covers per trip gives per element:

    issue time  = elements x (warp instructions / element) / (SMs x 4 schedulers x clock)
    MUFU time   = elements x (MUFU warp instructions / element) x 32 / (SMs x 16 MUFU lanes x clock)
    memory time = elements x bytes per element / streaming bandwidth

A scheduler issues at best one warp instruction per cycle, and an SM's four MUFU quarters each take 4
lanes per cycle (a warp-wide MUFU instruction occupies one for 8 cycles). Both are lower bounds: stalls
come on top. A kernel whose issue or MUFU time nears its memory time cannot stream at the bandwidth.

A trip counts every instruction between the loop's start and its backward branch: the kernels keep rare
work (a partial last tile, the tile that holds the label) out of their loops, so a trip is what each
full tile costs.

The cards (datasheet figures; the streaming bandwidth is 90 % of the peak, what a copy kernel reaches
on these parts -- 4.3 TB/s measured on an H200):
"""

from __future__ import annotations

import re
from typing import List, NamedTuple

# SMs, boost clock (Hz), peak memory bandwidth (B/s), the SASS target the model reads.
# H100 SXM5: 132 SMs, 1.98 GHz, HBM3 3.35 TB/s (NVIDIA H100 Tensor Core GPU datasheet).
# H200 SXM: 132 SMs, 1.98 GHz, HBM3e 4.8 TB/s (NVIDIA H200 datasheet; the same GH100 die as the H100).
# B200: 148 SMs, 1.965 GHz, HBM3e 8 TB/s (NVIDIA DGX B200 / Blackwell datasheet figures per GPU).
CARDS = {
    "H100": dict(sms=132, clock=1.98e9, bandwidth=3.35e12, cap=90),
    "H200": dict(sms=132, clock=1.98e9, bandwidth=4.8e12, cap=90),
    "B200": dict(sms=148, clock=1.965e9, bandwidth=8.0e12, cap=100),
}
STREAM_FRACTION = 0.9
SCHEDULERS_PER_SM = 4
MUFU_LANES_PER_SM = 16
# The shape of the model's prediction: 8 sequences of 4096 tokens, Llama 3's vocabulary.
SHAPE = dict(N=8, T=4096, V=128256)

_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]*)?\s*([^;]*);")
_BRANCH_TARGET = re.compile(r"0x([0-9a-f]+)")


class Loop(NamedTuple):
    start: int
    end: int
    opcodes: List[str]  # the base opcode of each instruction, in order
    load_bytes: int  # what one thread reads from global memory per trip


def instructions(sass: str) -> list:
    """(address, opcode, modifiers, operands) of each instruction of a ``cuobjdump -sass`` listing."""
    out = []
    for line in sass.splitlines():
        m = _INSTRUCTION.match(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3) or "", m.group(4)))
    return out


def load_bytes(modifiers: str) -> int:
    """Bytes one thread reads with a global load of these modifiers (``.E.128``: 16, ``.E.U16``: 2)."""
    for width, n in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1), (".S8", 1)):
        if modifiers.endswith(width):
            return n
    return 4


def loops(sass: str) -> List[Loop]:
    """Every backward branch's loop: the instructions from its target up to and including the branch."""
    code = instructions(sass)
    found = []
    for addr, op, _, operands in code:
        if op != "BRA":
            continue
        m = _BRANCH_TARGET.search(operands)
        target = int(m.group(1), 16) if m else addr
        if target < addr:
            body = [c for c in code if target <= c[0] <= addr]
            found.append(Loop(target, addr, [c[1] for c in body], sum(load_bytes(c[2]) for c in body if c[1] == "LDG")))
    return found


def hot_loop(sass: str) -> Loop:
    """The kernel's main loop: the longest backward-branch loop (the kernels' loops run over the
    vocabulary's full tiles; a partial last tile is straight-line code after them)."""
    found = loops(sass)
    if not found:
        raise ValueError("no loop in this kernel's SASS")
    return max(found, key=lambda l: len(l.opcodes))


def loop_counts(sass: str) -> dict:
    """Warp instructions, MUFU instructions and bytes loaded per thread per trip of the hot loop, and its
    opcode histogram. The loaded bytes say how many elements a trip covers: ptxas may unroll a loop, so
    a trip can be several of the kernel's tiles."""
    loop = hot_loop(sass)
    hist: dict = {}
    for op in loop.opcodes:
        hist[op] = hist.get(op, 0) + 1
    return dict(loop_instructions=len(loop.opcodes), loop_mufu=hist.get("MUFU", 0), loop_load_bytes=loop.load_bytes,
                loop_histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])))


def predict(loop_instructions: int, loop_mufu: int, elements_per_warp_trip: int, bytes_per_element: int,
            card: str, elements: int) -> dict:
    """Issue, MUFU and memory times (seconds) of ``elements`` on ``card`` for a loop of these counts."""
    c = CARDS[card]
    per_elem = loop_instructions / elements_per_warp_trip
    mufu_per_elem = loop_mufu / elements_per_warp_trip
    issue = elements * per_elem / (c["sms"] * SCHEDULERS_PER_SM * c["clock"])
    mufu = elements * mufu_per_elem * 32 / (c["sms"] * MUFU_LANES_PER_SM * c["clock"])
    memory = elements * bytes_per_element / (STREAM_FRACTION * c["bandwidth"])
    return dict(instructions_per_element=per_elem, mufu_per_element=mufu_per_elem, issue_s=issue, mufu_s=mufu,
                memory_s=memory, issue_share=issue / memory, mufu_share=mufu / memory)
