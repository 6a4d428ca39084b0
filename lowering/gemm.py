"""Public entry of the Triton int8 GEMM: C = epilogue(A @ W^T), C int8 / int32 / float.

What: `gemm_int8(a, w, epilogue, **values)` (1) checks shapes, dtypes and devices, (2)
allocates the output, (3) loads the kernel generated for the epilogue's signature and
launches it with the autotuned (or given) config. `plan_gemm_int8` does (1)-(3) once and
returns a launcher, for repeated launches without the Python checks. `tune_gemm` tunes
one shape on random data (the autotune CLI and the benchmarks use it).

Pre: A int8 [M, K] with any strides (a transposed or sliced view is fine), W int8 [N, K]
(the nn.Linear layout; any strides too, contiguous is fastest), K <= 131071, epilogue
values as named by `Epilogue.operand_names()`. Tensors on CUDA, or on CPU under the
Triton interpreter (tests). Post: the output equals reference.gemm_int8_ref bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton

from qcompile.lowering import device as qdevice
from qcompile.lowering.autotune import GemmConfig, TuneResult, get_config
from qcompile.lowering.codegen import KernelSpec, load_kernel
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, Requantize, bind_operands
from qcompile.lowering.reference import check_k, random_operands

KERNEL_NAME = "gemm_int8"


def _check_inputs(a: torch.Tensor, w: torch.Tensor) -> None:
    if a.dtype != torch.int8 or w.dtype != torch.int8:
        raise TypeError(f"gemm_int8 takes int8 A and W, got {a.dtype} and {w.dtype}")
    if a.dim() != 2 or w.dim() != 2:
        raise ValueError(f"need A [M, K] and W [N, K], got {tuple(a.shape)}, {tuple(w.shape)}")
    if a.shape[1] != w.shape[1]:
        raise ValueError(f"K differs: A {tuple(a.shape)} vs W {tuple(w.shape)} (W is [N, K])")
    if a.device != w.device:
        raise ValueError(f"A on {a.device} but W on {w.device}")
    check_k(a.shape[1])
    qdevice.check_can_launch(a)


def launch(
    spec: KernelSpec,
    a: torch.Tensor,
    w: torch.Tensor,
    c: torch.Tensor,
    v: dict[str, Any],
    cfg: GemmConfig,
    k: int | None = None,
) -> None:
    """Launch a generated GEMM kernel on A [M, *], W [N, *] into C [M, N] with the epilogue
    operands `v`; K is A's columns unless given (the int4 kernels count K in elements, two
    a byte)."""
    m, n = a.shape[0], w.shape[0]
    k = a.shape[1] if k is None else k
    args: dict[str, Any] = dict(
        a_ptr=a, w_ptr=w, c_ptr=c, M=m, N=n, K=k,
        stride_am=a.stride(0), stride_ak=a.stride(1),
        stride_wn=w.stride(0), stride_wk=w.stride(1),
        stride_cm=c.stride(0), stride_cn=c.stride(1),
    )
    args.update({f"{name}_ptr": v[name] for name in spec.pointer_operands})
    args.update({arg: v[name].stride(0) for arg, name in spec.stride_operands})
    args.update({name: v[name] for name in spec.scalar_operands})
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    # enable_fp_fusion is always explicit: False keeps float epilogues FMA-free (bit-equal
    # to the reference), and Triton warns when it is left to its default.
    spec.fn[grid](
        **args,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=spec.fp_fusion,
    )


def gemm_int8(
    a: torch.Tensor,
    w: torch.Tensor,
    epilogue: Epilogue | None = None,
    *,
    bias: torch.Tensor | None = None,
    zp_term: torch.Tensor | None = None,
    row_zero_point: torch.Tensor | None = None,
    col_sum: torch.Tensor | None = None,
    q: torch.Tensor | int | None = None,
    shift: torch.Tensor | int | None = None,
    out_zero_point: int | None = None,
    qmin: int | None = None,
    qmax: int | None = None,
    row_scale: torch.Tensor | float | None = None,
    col_scale: torch.Tensor | float | None = None,
    float_bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    origin: str = "",
    autotune: bool = True,
    kernel_cache_dir: str | os.PathLike | None = None,
    autotune_cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """C[M, N] = epilogue(A[M, K] @ W[N, K]^T) with a generated Triton kernel.

    Values are those of `epilogue.operand_names()` (see qcompile.lowering.epilogue);
    passing one the epilogue does not use is an error. `origin` names the graph nodes
    served (it goes in the generated file's header). config None: the cached config for
    this shape bucket, else on CUDA tune now (autotune=False: the default instead, not
    stored), else (interpreter) the deterministic default.
    """
    values = dict(
        bias=bias, zp_term=zp_term, row_zero_point=row_zero_point, col_sum=col_sum, q=q,
        shift=shift, out_zero_point=out_zero_point,
        qmin=qmin, qmax=qmax, row_scale=row_scale, col_scale=col_scale, float_bias=float_bias,
    )
    return plan_gemm_int8(
        a, w, epilogue, out=out, config=config, origin=origin, autotune=autotune,
        kernel_cache_dir=kernel_cache_dir, autotune_cache_dir=autotune_cache_dir, **values,
    )()


def plan_gemm_int8(
    a: torch.Tensor,
    w: torch.Tensor,
    epilogue: Epilogue | None = None,
    *,
    out: torch.Tensor | None = None,
    config: GemmConfig | None = None,
    origin: str = "",
    autotune: bool = True,
    kernel_cache_dir: str | os.PathLike | None = None,
    autotune_cache_dir: str | os.PathLike | None = None,
    **values: Any,
) -> Callable[[], torch.Tensor]:
    """Check, bind, allocate, load and tune once; return a callable that only launches.

    For callers that run the same GEMM on the same buffers repeatedly (benchmarks, CUDA
    graphs): each call relaunches into `out` and returns it. gemm_int8 is this, called once.
    """
    epilogue = epilogue if epilogue is not None else Epilogue()
    # (1) check
    _check_inputs(a, w)
    m, k = a.shape
    n = w.shape[0]
    v = bind_operands(epilogue, m, n, a.device, values)
    # (2) allocate
    if out is None:
        out = torch.empty((m, n), dtype=epilogue.out_dtype, device=a.device)
    elif out.shape != (m, n) or out.dtype != epilogue.out_dtype or out.device != a.device:
        raise ValueError(
            f"out must be {epilogue.out_dtype} [{m}, {n}] on {a.device}, got {out.dtype} "
            f"{tuple(out.shape)} on {out.device}"
        )
    if m == 0 or n == 0:
        return lambda: out
    # (3) launch
    spec = load_kernel(epilogue, origin=origin, cache_dir=kernel_cache_dir)
    if config is None:
        run = (lambda cfg: launch(spec, a, w, out, v, cfg)) if autotune else None
        config = get_config(
            KERNEL_NAME, spec.signature, m, n, k, run=run, cache_dir=autotune_cache_dir
        ).config

    def run_planned() -> torch.Tensor:
        launch(spec, a, w, out, v, config)
        return out

    return run_planned


def example_epilogue(kind: str) -> Epilogue:
    """Representative epilogues: "requant" (w8a8-static: bias + per-channel dyadic),
    "dequant" (w8a8 dynamic: per-token x per-channel scales + bias -> bf16), "int32"."""
    if kind == "requant":
        return Epilogue((Bias(), Requantize(per_channel=True)))
    if kind == "dequant":
        return Epilogue((Dequantize("bfloat16", has_bias=True),))
    if kind == "int32":
        return Epilogue()
    raise ValueError(f"unknown epilogue kind {kind!r}: requant, dequant or int32")


def tune_gemm(
    m: int,
    n: int,
    k: int,
    epilogue: Epilogue,
    *,
    cache_dir: str | os.PathLike | None = None,
    kernel_cache_dir: str | os.PathLike | None = None,
) -> TuneResult:
    """Autotune (or, without a GPU, look up the default for) one shape on random data."""
    if qdevice.triton_target() != "cuda":
        return get_config(KERNEL_NAME, epilogue.signature(), m, n, k, cache_dir=cache_dir)
    spec = load_kernel(epilogue, origin=f"tune_gemm {m}x{k}x{n}", cache_dir=kernel_cache_dir)
    a, w, values = random_operands(epilogue, m, n, k, device="cuda")
    v = bind_operands(epilogue, m, n, a.device, values)
    out = torch.empty((m, n), dtype=epilogue.out_dtype, device=a.device)
    return get_config(
        KERNEL_NAME, spec.signature, m, n, k,
        run=lambda cfg: launch(spec, a, w, out, v, cfg), cache_dir=cache_dir,
    )


__all__ = ["gemm_int8", "plan_gemm_int8", "example_epilogue", "tune_gemm"]
