"""The CPU integer path: the int8 GEMM with torch._int_mm and the epilogue in torch ops.

What: `cpu_gemm_int8(a, w, epilogue, **values)` has exactly the semantics of the Triton
kernel (qcompile.lowering.gemm) and of reference.gemm_int8_ref, bit for bit:
acc = torch._int_mm(A, W^T) accumulates in int32 (oneDNN's VNNI kernels: ~10x float
matmul on AVX-512 machines), then reference.apply_bound_epilogue, the one implementation
of the steps (requantization through qcompile.numerics.dyadic), runs on acc.

Why compiled: eagerly, the int64 epilogue is ~10 passes over an [M, N] int64 tensor and
costs far more than the GEMM itself (4096 x 1536: ~230 ms vs ~3 ms). torch.compile
(Inductor's C++ backend, one compiled function per epilogue signature, dynamic shapes)
fuses it into one loop. Without a working compiler, mode="auto" falls back, with a
warning, to the eager epilogue over row chunks that stay in cache.

Care: runtime scalars (q, shift, zero point, bounds) reach the compiled function as 0-d
int64 tensors. As symbolic Python ints, Inductor computed 1 << (shift - 1) wrongly for
large shifts (seen with torch 2.13); tests pin the exact results at shift 62.

torch._int_mm on CPU is wrong for K == 1 (N > 1) in torch 2.13: K is zero-padded to 2
there, which leaves every sum unchanged. M, N or K of 0 are handled without calling it.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Any

import torch

from qcompile.lowering.device import inside_compiler
from qcompile.lowering.epilogue import Epilogue, bind_operands
from qcompile.lowering.reference import apply_bound_epilogue, check_k

MODES = ("auto", "compiled", "eager")
_CHUNK_ELEMENTS = 1 << 16  # eager fallback: rows per chunk so int64 temporaries fit in L2
# "auto" runs epilogues over fewer elements eagerly: a cold Inductor compile costs seconds
# per signature, the eager epilogue on 2**18 int64 elements about a millisecond.
_COMPILE_MIN_ELEMENTS = 1 << 18
_SCALARS = ("q", "shift", "out_zero_point", "qmin", "qmax")


def prepare_weight(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] re-laid out K-major (a [N, K] view of a contiguous [K, N] tensor).

    Done once at compile time: torch._int_mm then reads a row-major [K, N] operand, the
    faster layout for large M (see bench/README.md); for M = 1 the plain [N, K] is faster.
    """
    return w.t().contiguous().t()


def int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """acc [M, N] int32 = A [M, K] @ W [N, K]^T, exact for K <= 131071."""
    m, k = a.shape
    n = w.shape[0]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros((m, n), dtype=torch.int32)
    if k == 1:  # torch._int_mm(CPU) returns wrong sums for K == 1; a zero column is exact
        a = torch.nn.functional.pad(a, (0, 1))
        w = torch.nn.functional.pad(w, (0, 1))
    return torch._int_mm(a, w.t())


def _chunked_eager(acc: torch.Tensor, epilogue: Epilogue, v: dict[str, Any]) -> torch.Tensor:
    m, n = acc.shape
    out = torch.empty((m, n), dtype=epilogue.out_dtype)
    rows = max(1, _CHUNK_ELEMENTS // max(1, n))
    for i in range(0, m, rows):
        part = dict(v)
        if "row_scale" in v:
            part["row_scale"] = v["row_scale"][i : i + rows]
        out[i : i + rows] = apply_bound_epilogue(acc[i : i + rows], epilogue, part)
    return out


@functools.cache
def _compiled_epilogue(epilogue: Epilogue):
    # A distinct function (code object) per signature: Dynamo's recompile limit counts per
    # code object, so one shared function would fall back to eager after 8 signatures.
    name = "epilogue_" + re.sub(r"[^a-zA-Z0-9]+", "_", epilogue.signature())
    src = f"def {name}(acc, v):\n    return apply_bound_epilogue(acc, EPILOGUE, v)\n"
    scope = {"apply_bound_epilogue": apply_bound_epilogue, "EPILOGUE": epilogue}
    exec(compile(src, f"<qcompile cpu epilogue {epilogue.signature()}>", "exec"), scope)
    return torch.compile(scope[name], dynamic=True, fullgraph=True)


_FAILED: set[str] = set()


def run_epilogue(
    acc: torch.Tensor, epilogue: Epilogue, v: dict[str, Any], mode: str = "auto"
) -> torch.Tensor:
    """Apply the epilogue to acc [M, N] int32 with already-bound values (bind_operands)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not epilogue.steps:
        return acc
    sig = epilogue.signature()
    if inside_compiler():
        # Inside an outer torch.compile (tracing, or a backend such as qcompile's running
        # a probe): a nested compile would re-enter Dynamo, so run the plain ops.
        return apply_bound_epilogue(acc, epilogue, v)
    small = acc.numel() < _COMPILE_MIN_ELEMENTS  # compiling would cost more than it saves
    if mode == "eager" or (mode == "auto" and (sig in _FAILED or small)):
        return _chunked_eager(acc, epilogue, v)
    tv = {k: torch.tensor(x, dtype=torch.int64) if k in _SCALARS and isinstance(x, int) else x
          for k, x in v.items()}
    try:
        return _compiled_epilogue(epilogue)(acc, tv)
    except Exception as e:
        if mode == "compiled":
            raise
        _FAILED.add(sig)
        warnings.warn(
            f"qcompile cpu: compiling the {sig} epilogue failed ({type(e).__name__}: {e}); "
            "running it eagerly (correct, but several times slower)",
            stacklevel=2,
        )
        return _chunked_eager(acc, epilogue, v)


def cpu_gemm_int8(
    a: torch.Tensor,
    w: torch.Tensor,
    epilogue: Epilogue | None = None,
    *,
    mode: str = "auto",
    **values: Any,
) -> torch.Tensor:
    """C[M, N] = epilogue(A[M, K] @ W[N, K]^T) on CPU; same values as gemm.gemm_int8.

    A: int8 [M, K], any strides. W: int8 [N, K], any strides (prepare_weight gives the
    layout _int_mm is fastest with for large M). mode: "compiled" (Inductor-fused
    epilogue), "eager" (no compiler needed), "auto" (compiled for M * N >= 2**18, else
    eager; eager with a warning if compiling fails).
    """
    epilogue = epilogue if epilogue is not None else Epilogue()
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"cpu_gemm_int8 takes int8 A and W, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2 or a.shape[1] != w.shape[1]:
        raise ValueError(f"need A [M, K] and W [N, K], got {tuple(a.shape)}, {tuple(w.shape)}")
    if a.device.type != "cpu" or w.device.type != "cpu":
        raise ValueError(f"cpu_gemm_int8 takes CPU tensors, got {a.device} and {w.device}")
    check_k(a.shape[1])
    v = bind_operands(epilogue, a.shape[0], w.shape[0], "cpu", values)
    return run_epilogue(int_mm(a, w), epilogue, v, mode)
