"""Compile every Triton kernel for A100 (sm_80) and H100 (sm_90) on a machine without a GPU.

    python -m bench.gpu_compile                   # bench/results/gpu-compile-<date>.md
    python -m bench.gpu_compile --json rows.json  # also every compiled variant, as JSON (the test reads it)
    python -m bench.gpu_compile --quick           # a smaller shape matrix

The launch configurations are not written down here: for each representative shape this asks the
launchers themselves (``forward_launch``, ``backward_launch``, ``dlogits_launch`` in
safedpo_kernels/triton/) for the launch they would make, on meta tensors (shapes, strides and dtypes,
no memory). Each launch is specialized the way Triton's JIT specializes a real call (argument types,
16-byte alignment and divisibility by 16, ints equal to 1 as constants), compiled to a cubin with
``triton.compile`` for each target, and read back with the ``cuobjdump`` that ships inside the triton
wheel: registers per thread, shared memory per block, local memory per thread (register spills).
Occupancy (blocks per SM) follows from those, the block size and the SM's limits.

For the logits-path kernels it also reads the SASS of each one's hot loop (bench.issue_model) and, at
the issue model's shape (N=8, T=4096, V=128256), predicts the time to issue its instructions and its MUFU
work against the time to stream its bytes, for H100, H200 (sm_90 SASS) and B200 (sm_100 SASS, those
kernels only), so that a kernel change shows its effect here, in CI, without a GPU.

Must run with the compiler, not the interpreter: TRITON_INTERPRET must be unset. A compiled variant's
figures depend only on the kernel sources, the variant and the triton / ptxas versions, so they are
cached under that key: in bench/results/gpu-compile-cache.json (committed, written by --update-cache,
so that CI does not spend two minutes recompiling unchanged kernels) and in ~/.cache/safedpo_kernels.
A change to any kernel file, or another triton, compiles everything afresh (about two minutes on two
cores); --no-cache forces that.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from bench.issue_model import CARDS, SHAPE, loop_counts, predict

# Per-SM and per-block limits of the targets (CUDA programming guide, compute capabilities 8.0 and 9.0).
TARGETS = {
    80: dict(card="A100", smem_per_block=163 * 1024, smem_per_sm=164 * 1024, regs_per_sm=65536,
             max_threads_per_sm=2048, max_blocks_per_sm=32),
    90: dict(card="H100", smem_per_block=227 * 1024, smem_per_sm=228 * 1024, regs_per_sm=65536,
             max_threads_per_sm=2048, max_blocks_per_sm=32),
}
RESERVED_SMEM_PER_BLOCK = 1024  # the driver keeps 1 KiB of shared memory per resident block (cc >= 8.0)
# Blackwell (B200, sm_100): compiled for the issue model's logits-path launches only.
MODEL_TARGETS = {100: dict(card="B200", smem_per_block=227 * 1024, smem_per_sm=228 * 1024, regs_per_sm=65536,
                           max_threads_per_sm=2048, max_blocks_per_sm=32)}

LOGITS_V = (32000, 128256, 151936, 256000)
LOGITS_ROWS = (1, 7, 100, 4096, 32768)
LINEAR_H = (2048, 4096, 8192)
LINEAR_ROWS = (1, 100, 4096, 32768)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
LOGITS_KERNELS = ("logprob_forward_kernel", "logprob_backward_kernel")  # must not spill


@dataclass(frozen=True)
class Variant:
    """One compiled kernel: the kernel, its specialized signature and constexprs, and a target."""

    kernel: str
    module: str
    signature: tuple  # ((name, type), ...)
    constexprs: tuple  # ((name, value), ...)
    attrs: tuple  # ((index, ((attr, value), ...)), ...)
    num_warps: int
    cap: int
    dtype: str
    config: str  # the human-readable tile configuration
    maxnreg: Optional[int] = None  # the launcher's register limit on this target


def _meta(shape, dtype, stride=None):
    if stride is None:
        return torch.empty(shape, dtype=dtype, device="meta")
    return torch.empty_strided(shape, stride, dtype=dtype, device="meta")


def _logits_layouts(rows: int, V: int, dtype: torch.dtype):
    """(name, logits, Layout) for the padded, packed and shifted-view (logits[:, :-1]) layouts."""
    from safedpo_kernels._layout import Layout

    T = min(rows, 4096) if rows < 100 else max(50, min(rows // 2, 4096))
    N = max(1, rows // T)
    padded = _meta((N, T, V), dtype)
    yield "padded", padded, Layout(n_seq=N, rows=N * T, seq_len=T, padded=True, cu_seqlens=None)
    yield "packed", _meta((rows, V), dtype), Layout(n_seq=1, rows=rows, seq_len=rows, padded=False, cu_seqlens=None)
    full = _meta((N, T + 1, V), dtype)
    yield "shifted", full[:, :-1], Layout(n_seq=N, rows=N * T, seq_len=T, padded=True, cu_seqlens=None)


def logits_launches(quick: bool = False):
    """(dtype name, Launch) of both logits-path kernels for every representative shape."""

    for V in LOGITS_V[:2] if quick else LOGITS_V:
        for rows in LOGITS_ROWS[::2] if quick else LOGITS_ROWS:
            for dtype in DTYPES:
                for _, logits, layout in _logits_layouts(rows, V, dtype):
                    yield from _logits_pair(logits, layout, dtype)


def _logits_pair(logits, layout, dtype):
    """(dtype, Launch) of the forward (without and with token statistics) and the backward (into a new
    buffer and in place) of one logits layout."""
    from safedpo_kernels.triton.logprob_backward import backward_launch
    from safedpo_kernels.triton.logprob_forward import forward_launch

    labels = _meta((layout.rows,), torch.int64)  # int32 labels are widened first
    tok, lse, g = (_meta((layout.rows,), torch.float32) for _ in range(3))
    yield dtype, forward_launch(logits, labels, tok, lse, layout, -100)
    yield dtype, forward_launch(logits, labels, tok, lse, layout, -100, _meta((layout.rows, 5), torch.float32))
    fresh = _meta(tuple(logits.shape), dtype)
    for grad in (fresh, logits):  # a new buffer, or in place
        yield dtype, backward_launch(logits, grad, labels, lse, g, layout)


def model_launches():
    """(dtype, Launch, bytes per element) of the logits-path kernels at the issue model's shape, padded:
    the forward reads each logit once, the backward reads it and writes its gradient."""
    from safedpo_kernels._layout import Layout
    from safedpo_kernels.triton.logprob_backward import backward_launch
    from safedpo_kernels.triton.logprob_forward import forward_launch

    N, T, V = (SHAPE[k] for k in ("N", "T", "V"))
    layout = Layout(n_seq=N, rows=N * T, seq_len=T, padded=True, cu_seqlens=None)
    labels = _meta((layout.rows,), torch.int64)
    tok, lse, g = (_meta((layout.rows,), torch.float32) for _ in range(3))
    for dtype in DTYPES:
        elt = torch.finfo(dtype).bits // 8
        logits = _meta((N, T, V), dtype)
        yield dtype, forward_launch(logits, labels, tok, lse, layout, -100), elt
        yield dtype, forward_launch(logits, labels, tok, lse, layout, -100, _meta((layout.rows, 5), torch.float32)), elt
        yield dtype, backward_launch(logits, logits, labels, lse, g, layout), 2 * elt
        yield dtype, backward_launch(logits, logits, labels, lse, g, layout, 30.0), 2 * elt


def linear_launches(quick: bool = False):
    """(dtype name, Launch) of the fused-linear kernels for every representative shape: the recompute
    path's two tile kernels (linear_sequence_logps), and the gradient-in-forward loss's chunk of float32
    logits followed by the logits-path kernels on it, its gradient stored in the matmul dtype. Every
    kernel with and without a softcap (Gemma 2/3); the softcap is a compile-time switch."""
    from safedpo_kernels._layout import Layout
    from safedpo_kernels.triton.fused_linear_backward import dlogits_launch
    from safedpo_kernels.triton.fused_linear_forward import forward_launch, logits_launch
    from safedpo_kernels.triton.logprob_backward import backward_launch
    from safedpo_kernels.triton.logprob_forward import forward_launch as logprob_forward_launch

    for H in LINEAR_H[1:2] if quick else LINEAR_H:
        for V in LOGITS_V[:1] if quick else LOGITS_V:
            for rows in LINEAR_ROWS[::2] if quick else LINEAR_ROWS:
                for dtype in DTYPES:
                    # The softcap adds compile-time variants; a chunk of pairs is rarely a single row.
                    transforms = ((False, None), (True, None)) + (((False, 30.0),) if rows > 1 else ())
                    labels = _meta((rows,), torch.int64)
                    lse, g = _meta((rows,), torch.float32), _meta((rows,), torch.float32)
                    z = _meta((rows, V), torch.float32)
                    for has_bias, softcap in transforms:
                        hidden = _meta((rows, H), dtype)
                        weight = _meta((V, H), dtype)
                        bias = _meta((V,), dtype) if has_bias else None
                        yield dtype, forward_launch(hidden, weight, bias, labels, -100, 1.0, softcap)[0]
                        yield dtype, dlogits_launch(hidden, weight, bias, labels, lse, g, _meta((rows, V), dtype), 1.0, softcap)
                        yield dtype, logits_launch(hidden, weight, bias, z, 1.0, softcap)
                    # The loss chunk's log-prob kernels: float32 logits, gradient in the matmul dtype.
                    chunk = Layout(n_seq=1, rows=rows, seq_len=rows, padded=False, cu_seqlens=None)
                    yield dtype, logprob_forward_launch(z, labels, lse, lse, chunk, -100)
                    yield dtype, logprob_forward_launch(z, labels, lse, lse, chunk, -100, _meta((rows, 5), torch.float32))
                    for _, softcap in transforms[1:]:
                        yield dtype, backward_launch(z, _meta((rows, V), dtype), labels, lse, g, chunk, softcap)


def _specializer():
    """Triton's own argument specialization, arg -> (type, attribute key), across its versions."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime import jit

    if hasattr(jit, "native_specialize_impl"):  # triton >= 3.6
        return lambda arg: jit.native_specialize_impl(BaseBackend, arg, False, True, True)
    params = jit.create_specialize_impl.__code__.co_varnames[: jit.create_specialize_impl.__code__.co_argcount]
    if params:  # triton 3.4, 3.5
        impl = jit.create_specialize_impl(BaseBackend.get_arg_specialization)
        return lambda arg: impl(arg, False, True, True)
    impl = jit.create_specialize_impl()  # triton 3.3
    return lambda arg: impl(arg, BaseBackend.get_arg_specialization, False, True, True)


def specialize(launch, cap: int, dtype: torch.dtype) -> Variant:
    """The variant Triton's JIT would compile for this launch (same argument specialization rules)."""
    from triton.backends.compiler import BaseBackend

    spec = _specializer()
    fn = launch.kernel
    names = fn.arg_names
    runtime_names = [n for n in names if n not in launch.constexprs]
    assert len(runtime_names) == len(launch.args), (fn.__name__, runtime_names)
    signature, constexprs, attrs = {}, dict(launch.constexprs), {}
    for name, value in zip(runtime_names, launch.args):
        ty, desc = spec(value)
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = desc
        elif desc:
            attrs[names.index(name)] = tuple(tuple(a) for a in BaseBackend.parse_attr(desc))
    for name in launch.constexprs:
        signature[name] = "constexpr"
    signature = {n: signature[n] for n in names}
    maxnreg = launch.registers_for(cap)
    config = (", ".join(f"{k}={v}" for k, v in launch.constexprs.items()) + f", num_warps={launch.num_warps}"
              + (f", maxnreg={maxnreg}" if maxnreg else ""))
    return Variant(fn.__name__, fn.fn.__module__, tuple(signature.items()), tuple(sorted(constexprs.items())),
                   tuple(sorted(attrs.items())), launch.num_warps, cap, str(dtype).replace("torch.", ""), config,
                   maxnreg)


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def compile_variant(v: Variant) -> dict:
    """Compile one variant; registers, shared and local memory from its cubin."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(v.module), v.kernel)
    src = ASTSource(fn, dict(v.signature), dict(v.constexprs), {(i,): [list(a) for a in spec] for i, spec in v.attrs})
    row = dict(kernel=v.kernel, dtype=v.dtype, config=v.config, target=f"sm_{v.cap}", num_warps=v.num_warps,
               signature=dict(v.signature))
    t0 = time.perf_counter()
    try:
        options = dict(num_warps=v.num_warps, **({} if v.maxnreg is None else dict(maxnreg=v.maxnreg)))
        compiled = triton.compile(src, target=GPUTarget("cuda", v.cap, 32), options=options)
    except Exception as exc:  # the point of the matrix: report, do not stop at the first failure
        msg = str(exc).strip().splitlines()
        return dict(row, ok=False, error=(msg[-1] if msg else type(exc).__name__)[:300])
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True, timeout=60).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    row.update(
        ok=True,
        registers=int(fields.get("REG", -1)),
        stack=int(fields.get("STACK", 0)),
        local_bytes=int(fields.get("LOCAL", 0)),
        static_shared=int(fields.get("SHARED", 0)),
        dynamic_shared=int(compiled.metadata.shared),
    )
    row["shared_bytes"] = row["static_shared"] + row["dynamic_shared"]
    row.update(occupancy(row["registers"], row["shared_bytes"], v.num_warps, v.cap))
    if v.kernel in LOGITS_KERNELS:
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, timeout=120).stdout
        counts = loop_counts(sass)
        # The logits' own element size (the fused-linear loss runs these kernels on float32 chunks of a
        # bf16 model): from the type of the kernel's first argument, the logits pointer.
        counts["element_bytes"] = {"*fp32": 4, "*bf16": 2, "*fp16": 2}[dict(v.signature)["logits_ptr"]]
        counts["loop_histogram"] = dict(list(counts["loop_histogram"].items())[:12])
        row.update(counts)
    return row


def occupancy(registers: int, shared: int, num_warps: int, cap: int) -> dict:
    """Resident blocks per SM and the fraction of the SM's warp slots they fill, with what limits them."""
    t = {**TARGETS, **MODEL_TARGETS}[cap]
    threads = 32 * num_warps
    regs_per_warp = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256 registers
    limits = dict(
        registers=t["regs_per_sm"] // max(regs_per_warp * num_warps, 1),
        shared=t["smem_per_sm"] // (shared + RESERVED_SMEM_PER_BLOCK),
        threads=t["max_threads_per_sm"] // threads,
        blocks=t["max_blocks_per_sm"],
    )
    blocks = min(limits.values())
    limiter = min(limits, key=limits.get)
    return dict(blocks_per_sm=blocks, occupancy=blocks * threads / t["max_threads_per_sm"], limited_by=limiter)


def check(row: dict) -> list:
    """What is wrong with a compiled variant: a failed compile, too much shared memory, a spill in a
    logits-path kernel (the fused-linear ones are reported, not failed)."""
    problems = []
    if not row["ok"]:
        return [f"{row['kernel']} ({row['config']}, {row['dtype']}, {row['target']}) failed to compile: {row['error']}"]
    limit = {**TARGETS, **MODEL_TARGETS}[int(row["target"][3:])]["smem_per_block"]
    if row["shared_bytes"] > limit:
        problems.append(f"{row['kernel']} ({row['config']}, {row['dtype']}, {row['target']}) uses "
                        f"{row['shared_bytes']} bytes of shared memory, over the {limit} per block")
    if row["kernel"] in LOGITS_KERNELS and (row["local_bytes"] or row["stack"]):
        problems.append(f"{row['kernel']} ({row['config']}, {row['dtype']}, {row['target']}) spills: "
                        f"{row['local_bytes']} bytes of local memory, {row['stack']} of stack per thread")
    return problems


def variants(quick: bool = False) -> list:
    """Every distinct variant the launchers produce for the representative shapes, both targets, and the
    issue model's launches for sm_100."""
    seen, out = set(), []
    model = [(dtype, launch) for dtype, launch, _ in model_launches()]
    jobs = [(cap, dl) for cap in TARGETS for dl in [*logits_launches(quick), *linear_launches(quick), *model]]
    jobs += [(cap, dl) for cap in MODEL_TARGETS for dl in model]
    for cap, (dtype, launch) in jobs:
        v = specialize(launch, cap, dtype)
        if v not in seen:
            seen.add(v)
            out.append(v)
    return out


def card_model(card: str, workers: int = 0) -> list:
    """The issue model's rows for one card only (its launches compiled for its target, or taken from the
    cache): what bench.gpu_bench prints beside the times it measures."""
    cap = CARDS[card]["cap"]
    todo = list(dict.fromkeys(specialize(launch, cap, dtype) for dtype, launch, _ in model_launches()))
    key = cache_key()
    cached = {**_read_cache(CACHE_FILE, key), **_read_cache(_user_cache(), key)}
    missing = [v for v in todo if _variant_id(v) not in cached]
    workers = workers or min(max(len(missing), 1), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        cached.update({_variant_id(v): r for v, r in zip(missing, pool.map(compile_variant, missing))})
    rows = [dict(cached[_variant_id(v)], id=_variant_id(v)) for v in todo]
    return [m for m in issue_model(rows) if m["card"] == card]


def issue_model(rows: list) -> list:
    """The issue model's predictions (bench.issue_model) for the model's launches on each card: one dict
    per (kernel, dtype, card) with the loop's counts and the issue / MUFU / memory times."""
    by_id = {r.get("id"): r for r in rows}
    out = []
    elements = SHAPE["N"] * SHAPE["T"] * SHAPE["V"]
    for dtype, launch, nbytes in model_launches():
        for card, spec in CARDS.items():
            r = by_id.get(_variant_id(specialize(launch, spec["cap"], dtype)))
            if r is None or not r.get("ok") or "loop_instructions" not in r:
                continue
            c = dict(launch.constexprs)
            tile = c["BLOCK_R"] * c["BLOCK_V"] // launch.num_warps  # a warp's share of one tile
            # What a trip covers, from what it loads (each kernel reads every logit once): ptxas unrolls
            # some loops, and a trip is then several tiles.
            per_trip = round(r["loop_instructions"] / per_element(r)[0])
            out.append(dict(kernel=_model_name(launch), dtype=r["dtype"], card=card, target=r["target"],
                            config=r["config"], loop_instructions=r["loop_instructions"], loop_mufu=r["loop_mufu"],
                            elements_per_warp_trip=per_trip, unroll=per_trip / tile, registers=r["registers"],
                            occupancy=r["occupancy"],
                            **predict(r["loop_instructions"], r["loop_mufu"], per_trip, nbytes, card, elements)))
    return out


def _model_name(launch) -> str:
    c = dict(launch.constexprs)
    if launch.kernel.__name__.startswith("logprob_forward"):
        return "forward" + (" + statistics" if c.get("STATS") else "")
    return "backward, in place" + (", softcap" if c.get("SOFTCAP") else "")


CACHE_FILE = Path(__file__).resolve().parent / "results" / "gpu-compile-cache.json"
ROW_SCHEMA = 4  # what a cached row holds: 2 added the logits-path kernels' hot-loop counts, 3 their loads and element size


def cache_key() -> str:
    """What a variant's figures depend on besides the variant itself: the kernel sources and the
    versions of triton and ptxas. Any change to a kernel file compiles everything afresh."""
    import hashlib

    import triton

    h = hashlib.sha256(f"{triton.__version__} {_ptxas_version()} rows-v{ROW_SCHEMA}".encode())
    for path in sorted((Path(__file__).resolve().parent.parent / "safedpo_kernels" / "triton").glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def _variant_id(v: Variant) -> str:
    import hashlib

    text = json.dumps([v.kernel, v.signature, v.constexprs, v.attrs, v.num_warps, v.cap, v.dtype, v.maxnreg], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _user_cache() -> Path:
    root = Path(os.environ.get("SAFEDPO_CACHE_DIR", Path.home() / ".cache" / "safedpo_kernels"))
    return root / f"gpu-compile-{cache_key()}.json"


def _read_cache(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data.get("rows", {}) if data.get("key") == key else {}


def run(quick: bool = False, workers: int = 0, use_cache: bool = True) -> tuple:
    """(rows, number compiled now). Results of identical variants (same key: sources, triton, ptxas)
    come from the committed cache (bench/results/gpu-compile-cache.json) or this machine's cache."""
    todo = variants(quick)
    key = cache_key()
    cached = {}
    if use_cache:
        cached = {**_read_cache(CACHE_FILE, key), **_read_cache(_user_cache(), key)}
    missing = [v for v in todo if _variant_id(v) not in cached]
    workers = workers or min(max(len(missing), 1), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            fresh = list(pool.map(compile_variant, missing))
    else:
        fresh = [compile_variant(v) for v in missing]
    cached.update({_variant_id(v): r for v, r in zip(missing, fresh)})
    if fresh:
        path = _user_cache()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(key=key, rows=cached)))
    return [dict(cached[_variant_id(v)], id=_variant_id(v)) for v in todo], len(fresh)


FIGURES = ("ok", "registers", "stack", "local_bytes", "static_shared", "dynamic_shared")


def verify(rows: list, quick: bool, count: int) -> list:
    """Recompile ``count`` variants (the first of each kernel, then evenly spread) and list every
    figure that differs from ``rows``: a check that cached results are what the compiler gives."""
    todo = variants(quick)
    first = {}
    for i, v in enumerate(todo):
        first.setdefault(v.kernel, i)
    picks = sorted(set(list(first.values())[:count]) | set(range(0, len(todo), max(1, len(todo) // count))))[:count]
    workers = min(len(picks), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers) as pool:
        fresh = list(pool.map(compile_variant, [todo[i] for i in picks]))
    return [f"{todo[i].kernel} {todo[i].config} sm_{todo[i].cap}: {k} cached {rows[i].get(k)} vs {f.get(k)}"
            for i, f in zip(picks, fresh) for k in FIGURES if rows[i].get(k) != f.get(k)]


def write_cache(rows: list, quick: bool) -> None:
    """The committed cache: these rows under the current key (what CI reuses while nothing changed)."""
    compact = {r["id"]: {k: x for k, x in r.items() if k not in ("signature", "id")} for r in rows}
    CACHE_FILE.write_text(json.dumps(dict(key=cache_key(), rows=compact), sort_keys=True, separators=(",", ":")) + "\n")


def summary(rows: list) -> list:
    """One line per (kernel, dtype, tile config, target): the worst case over its specializations."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["dtype"], r["config"], r["target"]), []).append(r)
    out = []
    for (kernel, dtype, config, target), rs in groups.items():
        ok = [r for r in rs if r["ok"]]
        worst = max(ok, key=lambda r: (r["local_bytes"], r["registers"], r["shared_bytes"])) if ok else None
        out.append(dict(kernel=kernel, dtype=dtype, config=config, target=target, variants=len(rs),
                        failed=len(rs) - len(ok), worst=worst))
    return out


def markdown(rows: list, meta: dict) -> str:
    lines = [
        f"# Triton kernels compiled for A100 (sm_80) and H100 (sm_90), {meta['date']}",
        "",
        f"triton {meta['triton']}, ptxas {meta['ptxas']}, torch {meta['torch']}; `python -m bench.gpu_compile` "
        f"({len(rows)} variants, {meta['compiled']} compiled in {meta['seconds']:.0f} s on {meta['cpus']} CPU cores, "
        "the rest from the cache of identical sources and versions; no GPU).",
        "",
        "Shapes asked of the launchers: logits path V in " + ", ".join(map(str, LOGITS_V)) + ", rows in "
        + ", ".join(map(str, LOGITS_ROWS)) + " (padded, packed and a shifted `logits[:, :-1]` view; "
        "backward into a new buffer and in place); fused-linear path H in " + ", ".join(map(str, LINEAR_H))
        + ", the same V, rows in " + ", ".join(map(str, LINEAR_ROWS)) + ", with and without bias. Every dtype: "
        "float32, bfloat16, float16.",
        "",
        "One line per kernel, dtype, tile configuration and target; *variants* counts the specializations "
        "(argument types, alignment, divisibility) compiled for it, and the figures are the worst of them. "
        "Registers per thread; shared memory per block (static + dynamic, limits 163 KiB on sm_80 and "
        "227 KiB on sm_90); local memory per thread (register spills); blocks per SM and occupancy (resident "
        "warps / 64) from registers, shared memory and block size, with the limiting resource. For the "
        "logits-path kernels (also what the fused-linear loss runs on each chunk of float32 logits), the hot "
        "loop's warp instructions and MUFU instructions per element (bench.issue_model; the fused-linear "
        "kernels are GEMMs, with an epilogue of a few instructions per H multiply-adds).",
        "",
        "| kernel | dtype | tile configuration | target | variants | registers | shared bytes | spill (local) bytes "
        "| blocks/SM | occupancy | limited by | loop instr / element | loop MUFU / element |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary(rows):
        w = s["worst"]
        if w is None:
            lines.append(f"| {s['kernel']} | {s['dtype']} | {s['config']} | {s['target']} | {s['variants']} | FAILED "
                         "| | | | | | | |")
            continue
        per = per_element(w)
        loop = f"{per[0]:.3f} | {per[1]:.3f}" if per else "- | -"
        lines.append(
            f"| {s['kernel']} | {s['dtype']} | {s['config']} | {s['target']} | {s['variants']} | {w['registers']} | "
            f"{w['shared_bytes']} | {w['local_bytes']} | {w['blocks_per_sm']} | {w['occupancy']:.0%} | {w['limited_by']} "
            f"| {loop} |"
        )
    lines += model_markdown(issue_model(rows))
    problems = [p for r in rows for p in check(r)]
    spills = sorted({(r["kernel"], r["dtype"], r["target"], r["local_bytes"]) for r in rows if r["ok"] and r["local_bytes"]})
    lines += ["", "Problems (a failed compile, shared memory over the limit, a logits-path spill): "
              + ("none." if not problems else "")]
    lines += [f"- {p}" for p in problems]
    lines += ["", "Spills of the fused-linear kernels: " + ("none." if not spills else "")]
    lines += [f"- {k}, {d}, {t}: {b} bytes per thread" for k, d, t, b in spills]
    return "\n".join(lines) + "\n"


def per_element(row: dict):
    """(warp instructions, MUFU instructions) per element of a compiled logits-path row's hot loop, the
    elements a trip covers counted from its loads (every logit is read once); None for other kernels."""
    if not row.get("loop_load_bytes"):
        return None
    elements = 32 * row["loop_load_bytes"] // row["element_bytes"]
    return row["loop_instructions"] / elements, row["loop_mufu"] / elements


def model_markdown(model: list) -> list:
    """The issue model's section of the report."""
    N, T, V = (SHAPE[k] for k in ("N", "T", "V"))
    lines = ["", f"## Issue model: the logits-path kernels at N={N}, T={T}, V={V}", "",
             "Read off the SASS of each kernel's hot loop (bench/issue_model.py: warp instructions and MUFU "
             "instructions per trip, elements a warp covers per trip from the bytes the trip loads -- ptxas unrolls "
             "some loops over several tiles), against the bytes it streams: issue time = "
             "instructions / (SMs x 4 schedulers x clock), MUFU time = MUFU lanes / (SMs x 16 x clock), memory time "
             "= bytes / (90 % of the peak bandwidth). Cards: " + "; ".join(
                 f"{n} {c['sms']} SMs, {c['clock'] / 1e9:.3f} GHz, {c['bandwidth'] / 1e12:.2f} TB/s (sm_{c['cap']} SASS)"
                 for n, c in CARDS.items()) + ". Targets: issue and MUFU at most 60 % of memory on H100/H200, at "
             "most 100 % on B200.", "",
             "| kernel | dtype | card | warp instr / trip | elements / warp trip | instr / element | MUFU / element "
             "| issue ms | MUFU ms | memory ms | issue / memory | MUFU / memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in model:
        limit = 1.0 if m["card"] == "B200" else 0.6
        flag = "" if max(m["issue_share"], m["mufu_share"]) <= limit else " **over**"
        tiles = "" if m["unroll"] == 1 else f" ({m['unroll']:g} tiles)"
        lines.append(
            f"| {m['kernel']} | {m['dtype']} | {m['card']} | {m['loop_instructions']} ({m['loop_mufu']} MUFU) | "
            f"{m['elements_per_warp_trip']}{tiles} | {m['instructions_per_element']:.3f} | {m['mufu_per_element']:.3f} | "
            f"{m['issue_s'] * 1e3:.2f} | {m['mufu_s'] * 1e3:.2f} | {m['memory_s'] * 1e3:.2f} | "
            f"{m['issue_share']:.0%}{flag} | {m['mufu_share']:.0%} |")
    return lines


def _ptxas_version() -> str:
    ptxas = os.path.join(os.path.dirname(_cuobjdump()), "ptxas")
    try:
        out = subprocess.run([ptxas, "--version"], capture_output=True, text=True, timeout=30).stdout
    except OSError:
        return "unknown"
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench/results", help="directory of gpu-compile-<date>.md")
    p.add_argument("--json", default=None, help="also write every compiled variant here")
    p.add_argument("--quick", action="store_true", help="a smaller shape matrix")
    p.add_argument("--workers", type=int, default=0, help="compile processes (default: one per CPU core)")
    p.add_argument("--tag", default="", help="appended to the markdown file's name (e.g. triton3.6)")
    p.add_argument("--no-cache", action="store_true", help="compile every variant, reusing no earlier result")
    p.add_argument("--verify", type=int, default=0,
                   help="recompile this many cached variants (one per kernel first) and fail if their figures differ")
    p.add_argument("--update-cache", action="store_true", help=f"write the results to {CACHE_FILE.name} (committed)")
    p.add_argument("--no-markdown", action="store_true")
    p.add_argument("--model-card", choices=sorted(CARDS), default=None,
                   help="only the issue model's rows for this card, as JSON to --json (bench.gpu_bench reads them)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("bench.gpu_compile compiles the kernels: unset TRITON_INTERPRET")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated (silences a warning)
    import triton

    if a.model_card:
        model = card_model(a.model_card, a.workers)
        text = json.dumps(dict(triton=triton.__version__, ptxas=_ptxas_version(), model=model), indent=1)
        Path(a.json).write_text(text) if a.json else print(text)
        return 0

    t0 = time.perf_counter()
    rows, compiled = run(a.quick, a.workers, use_cache=not a.no_cache)
    meta = dict(date=datetime.date.today().isoformat(), triton=triton.__version__, torch=torch.__version__,
                ptxas=_ptxas_version(), seconds=time.perf_counter() - t0, cpus=os.cpu_count(), compiled=compiled)
    if a.update_cache:
        write_cache(rows, a.quick)
    if a.verify:
        mismatches = verify(rows, a.quick, a.verify)
        meta["verified"] = a.verify
        if mismatches:
            raise SystemExit("bench.gpu_compile: cached figures differ from a fresh compile:\n" + "\n".join(mismatches))
    if a.json:
        # The model's rows too: they depend on how the launchers specialize outside the interpreter.
        Path(a.json).write_text(json.dumps(dict(meta=meta, rows=rows, model=issue_model(rows)), indent=1))
    text = markdown(rows, meta)
    if not a.no_markdown:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"gpu-compile-{meta['date']}{'-' + a.tag if a.tag else ''}.md"
        path.write_text(text)
        print(f"wrote {path}", file=sys.stderr)
    print(text)
    problems = [p for r in rows for p in check(r)]
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
