"""Ahead-of-time compilation of every Triton kernel of qcompile for a GPU, without a GPU.

What: `launches(arch)` lists the kernel launches the wrappers make (the generated int8
GEMM for each epilogue and config, the generated packed W4A4 GEMM, the quantize, Hadamard,
W4, attention and integer non-linear kernels), each with example arguments (a torch dtype
stands for a tensor of that dtype) and launch options. `compile_launch` compiles one with
triton.compile for GPUTarget("cuda", arch, 32) and returns what the GPU compiler made of
it: the PTX, the registers and spill bytes ptxas reported, and the shared memory from the
compiled metadata.
The kernel's own binder specialises the arguments (ints equal to 1 become constants,
multiples of 16 get divisibility hints) exactly as a launch with those arguments would, so
the code is what the GPU would run.

Why: tests run the kernels in the Triton interpreter, which accepts programs the GPU
compiler rejects and knows nothing of registers or shared memory. Triton and its bundled
ptxas compile for sm_80 / sm_90 on any machine, so CI checks that every kernel compiles,
uses tensor cores, keeps integer-only epilogues free of float instructions, fits in shared
memory and does not spill (tests/lowering/test_gpu_aot.py).

Pre: TRITON_INTERPRET unset (Triton chooses interpreter or compiler when a kernel is
decorated, so this must hold when qcompile's kernel modules are imported: run it as its
own process); Triton's NVIDIA backend with its ptxas. `main` checks both.

CLI: python -m qcompile.lowering.aot [--arch 80,90] [--match REGEX] [--jobs N] [--out DIR]
[--json FILE] prints registers, spills and shared memory per launch; --json writes the
results (the tests read them), --out keeps the PTX files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qcompile.lowering.autotune import SM80_CONFIGS, SM90_CONFIGS, GemmConfig, default_config
from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize

ARCHS = (80, 90)
SHARED_MEMORY_LIMIT = 232448  # bytes a block may use on sm_80 (A100) and sm_90 (H100): 227 KB
DEFAULT_CONFIG_M = (1, 16, 64, 128, 4096)  # M values whose default configs must not spill
_N = _K = 4096  # a representative large layer


@dataclass(frozen=True)
class Launch:
    """One kernel launch to compile for one target.

    kernel: "module:function" of a @triton.jit kernel, or the Epilogue of a generated GEMM.
    args: by parameter name; a torch.dtype stands for a (16-byte aligned) tensor of it.
    tags: what the tests check: "default" (the config launched untuned), "tuned" (a config
    the autotuner may pick), "gemm" (the generated GEMM), "integer_only" (no float at all),
    "mma:s8" / "mma:f16" / "mma:bf16" (tensor-core products on those operand types).
    """

    arch: int
    name: str
    kernel: str | Epilogue
    args: dict[str, Any]
    options: dict[str, Any]
    tags: frozenset[str] = field(default_factory=frozenset)
    template: str = "gemm_int8"  # an Epilogue's generated kernel: "gemm_int8", "gemm_w4a4"

    @property
    def id(self) -> str:
        return f"sm{self.arch}/{self.name}"


# --------------------------------------------------------------------------- catalogue


def gemm_epilogues() -> list[Epilogue]:
    """Every epilogue signature the project builds: requantization (linear_int8,
    linear_w4a8), the int32 accumulator with input zero point and bias (the fused integer
    LayerNorm), float32 dequantization (linear_int8_dq, linear_dynamic), each with and
    without input zero point and bias; float16 / bfloat16 outputs (benchmarks, callers of
    gemm_int8)."""
    prefixes = [tuple(s for s, on in ((InputZeroPoint(), z), (Bias(), b)) if on)
                for z in (False, True) for b in (False, True)]
    eps = [Epilogue((*pre, Requantize(per_channel=pc))) for pre in prefixes for pc in (False, True)]
    eps += [Epilogue(pre) for pre in prefixes]
    izp = (InputZeroPoint(),)
    eps += [Epilogue((*pre, Dequantize("float32", has_bias=b))) for pre in ((), izp)
            for b in (False, True)]
    eps += [Epilogue((Dequantize(dt, has_bias=b),)) for dt in ("float16", "bfloat16")
            for b in (False, True)]
    return eps


def _gemm_launch(arch: int, ep: Epilogue, cfg: GemmConfig, ms: list[int], family: str) -> Launch:
    from qcompile.lowering.codegen import _emit  # the kernel's epilogue arguments, by name

    code = _emit(ep)
    # As lowering/gemm.py's _launch passes them, for contiguous A [M, K] and W [N, K].
    args: dict[str, Any] = dict(
        a_ptr=torch.int8, w_ptr=torch.int8, c_ptr=ep.out_dtype, M=ms[0], N=_N, K=_K,
        stride_am=_K, stride_ak=1, stride_wn=_K, stride_wk=1, stride_cm=_N, stride_cn=1,
    )
    vector_dtype = {"bias": torch.int32, "zp_term": torch.int32, "q": torch.int64,
                    "shift": torch.int64, "row_scale": torch.float32,
                    "col_scale": torch.float32, "float_bias": torch.float32}
    args.update({f"{p}_ptr": vector_dtype[p] for p in code.pointers})
    args.update({s: 1 for s, _ in code.strides})  # contiguous per-token / per-channel scales
    scalars = {"q": 1 << 30, "shift": 40, "out_zero_point": 3, "qmin": -128, "qmax": 127}
    args.update({s: scalars[s] for s in code.scalars})
    args.update(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m)
    options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                   enable_fp_fusion=ep.integer_only)
    tags = {"gemm", "mma:s8", family} | ({"integer_only"} if ep.integer_only else set())
    name = f"gemm_int8[{ep.signature()}] {cfg} M={','.join(map(str, ms))}"
    return Launch(arch, name, ep, args, options, frozenset(tags))


def gemm_launches(arch: int) -> list[Launch]:
    """The generated GEMM for every epilogue, at every config the autotuner may pick on the
    target ("tuned", M = 4096) and at the default config for each M in DEFAULT_CONFIG_M
    ("default"; Ms that compile to the same kernel share one launch: same config, and M
    specialised alike, as 1 or as a multiple of 16)."""
    defaults: dict[tuple[GemmConfig, bool], list[int]] = {}
    for m in DEFAULT_CONFIG_M:
        cfg = default_config((arch // 10, arch % 10), m, _N, _K)
        defaults.setdefault((cfg, m == 1), []).append(m)
    out = []
    for ep in gemm_epilogues():
        for cfg in SM90_CONFIGS if arch >= 90 else SM80_CONFIGS:
            out.append(_gemm_launch(arch, ep, cfg, [4096], "tuned"))
        for (cfg, _), ms in defaults.items():
            out.append(_gemm_launch(arch, ep, cfg, ms, "default"))
    return out


_KERNELS = "qcompile.lowering.kernels."
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_Q8 = dict(QMIN=-128, QMAX=127)


def _short(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _launch(arch, name, kernel, args, options=None, tags=()) -> Launch:
    """A handwritten kernel's launch, at the config its wrapper chooses ("default")."""
    return Launch(arch, name, _KERNELS + kernel, args, options or {}, frozenset({"default", *tags}))


def quantize_launches(arch: int) -> list[Launch]:
    from qcompile.lowering.kernels.hadamard import hadamard_launch_meta

    out = []
    for dt in _FLOATS:
        args = dict(x_ptr=dt, q_ptr=torch.int8, M=4096, K=_K, scale=0.02, zero_point=0,
                    stride_xm=_K, stride_xk=1, stride_qm=_K, stride_qk=1, **_Q8, BLOCK_M=16,
                    BLOCK_K=1024)
        out.append(_launch(arch, f"quantize_per_tensor[{_short(dt)}]",
                           "quantize:_quantize_per_tensor_kernel", args))
    for pc in (False, True):
        args = dict(acc_ptr=torch.int32, q_ptr=torch.int64, shift_ptr=torch.int64,
                    out_ptr=torch.int8, M=4096, N=_N, zero_point=0, stride_am=_N, stride_an=1,
                    stride_om=_N, stride_on=1, PER_CHANNEL=pc, **_Q8, BLOCK_M=16, BLOCK_N=256)
        out.append(_launch(arch, f"requantize[{'per_channel' if pc else 'per_tensor'}]",
                           "quantize:_requantize_kernel", args, tags={"integer_only"}))
    # One pass up to the longest row held in registers, then the two-pass variant.
    for dt in _FLOATS:
        for k, block_k in ((4096, 4096), (16384, 16384), (32768, 16384)):
            args = dict(x_ptr=dt, q_ptr=torch.int8, scale_ptr=torch.float32,
                        zp_ptr=torch.int32, K=k, clip=1.0, stride_xm=k, stride_xk=1,
                        stride_qm=k, stride_qk=1, **_Q8, EPS=1e-8, BLOCK_K=block_k,
                        ONE_PASS=block_k >= k, SYMMETRIC=True)
            out.append(_launch(arch, f"quantize_per_token[{_short(dt)}] K={k}",
                               "quantize:_quantize_per_token_kernel", args,
                               dict(num_warps=min(16, max(1, block_k // 512)))))
    for dt in _FLOATS:
        for n in (4096, 3072, 14336):
            meta, m = hadamard_launch_meta(n)
            warps = meta.pop("num_warps")
            args = dict(x_ptr=dt, h_ptr=torch.float32, q_ptr=torch.int8,
                        scale_ptr=torch.float32, m=m, norm=n**-0.5, stride_xm=n, stride_xk=1,
                        stride_qm=n, **_Q8, EPS=1e-8, **meta)
            out.append(_launch(arch, f"hadamard_quantize_per_token[{_short(dt)}] n={n}",
                               "quantize:_hadamard_quantize_kernel", args,
                               dict(num_warps=warps)))
    return out


def hadamard_launches(arch: int) -> list[Launch]:
    from qcompile.lowering.kernels.hadamard import hadamard_launch_meta

    out = []
    for dt in _FLOATS:
        for n in (128, 4096, 3072, 11008, 14336):  # 2**k alone, and 2**k times 12, 172, 28
            meta, m = hadamard_launch_meta(n)
            warps = meta.pop("num_warps")
            args = dict(x_ptr=dt, h_ptr=torch.float32, y_ptr=dt, m=m, norm=n**-0.5,
                        stride_xm=n, stride_xk=1, stride_ym=n, stride_yk=1, **meta)
            out.append(_launch(arch, f"hadamard[{_short(dt)}] n={n}",
                               "hadamard:_hadamard_kernel", args, dict(num_warps=warps)))
    return out


def w4_launches(arch: int) -> list[Launch]:
    import triton.language as tl

    from qcompile.lowering.kernels.w4 import w4a16_config

    tl_dtype = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
    out, g = [], 128
    for dt in _FLOATS:
        for m in (1, 128):
            for extras in (False, True):  # group zero points and bias, or neither
                cfg = dict(w4a16_config(m, _N, _K, dt))
                warps = cfg.pop("num_warps")
                y = torch.float32 if cfg["SPLIT_K"] > 1 else dt  # split K accumulates in f32
                args = dict(x_ptr=dt, w_ptr=torch.uint8, s_ptr=dt,
                            z_ptr=torch.int8 if extras else dt, b_ptr=dt, y_ptr=y, M=m, N=_N,
                            K=_K, G=g, stride_xm=_K, stride_xk=1, stride_wn=_K // 2,
                            stride_wk=1, stride_sn=_K // g, stride_sg=1, stride_ym=_N,
                            stride_yn=1, DOT_DTYPE=tl_dtype[dt], HAS_ZEROS=extras,
                            HAS_BIAS=extras, IEEE=dt == torch.float32, UPCAST=False, **cfg)
                # float32 activations take the exact FMA dot (IEEE), not tensor cores
                tags = {torch.float16: {"mma:f16"}, torch.bfloat16: {"mma:bf16"}}.get(dt, ())
                name = f"w4a16[{_short(dt)}{'+zeros+bias' if extras else ''}] M={m}"
                out.append(_launch(arch, name, "w4:_w4a16_kernel", args, dict(num_warps=warps),
                                   tags))
    for m in (1, 128):
        common = dict(x_ptr=torch.int8, w_ptr=torch.uint8, M=m, N=_N, K=_K, stride_xm=_K,
                      stride_xk=1, stride_wn=_K // 2, stride_wk=1, stride_ym=_N, stride_yn=1,
                      BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=128)
        opts = dict(num_warps=4, enable_fp_fusion=False)
        for pc in (False, True):
            for bias in (False, True):
                args = dict(common, b_ptr=torch.int32 if bias else torch.int64,
                            q_ptr=torch.int64, r_ptr=torch.int64, y_ptr=torch.int8,
                            zero_point=3, REQUANT=True, PER_CHANNEL=pc, HAS_BIAS=bias, **_Q8)
                sig = f"requant.{'pc' if pc else 'pt'}{'+bias' if bias else ''}"
                out.append(_launch(arch, f"w4a8[{sig}] M={m}", "w4:_w4a8_kernel", args, opts,
                                   {"mma:s8", "integer_only"}))
        for dt in _FLOATS:
            args = dict(common, b_ptr=torch.float32, q_ptr=torch.float32, r_ptr=torch.float32,
                        y_ptr=dt, zero_point=0, REQUANT=False, PER_CHANNEL=False,
                        HAS_BIAS=True, QMIN=0, QMAX=0)
            out.append(_launch(arch, f"w4a8[dequant.{_short(dt)}+bias] M={m}",
                               "w4:_w4a8_kernel", args, opts, {"mma:s8"}))
    return out


# the epilogue operands that are not float32 (lowering/epilogue.py: bind_operands)
_OPERAND_DTYPES = {"row_zero_point": torch.int32, "col_sum": torch.int32}


def w4a4_epilogues() -> list[Epilogue]:
    """What the packed W4A4 GEMM runs: linear_a4w4_dynamic's float32 dequantization, with
    and without bias, and the widest, after the row zero points' term (asymmetric
    activations) with bias."""
    from qcompile.lowering.ops import dynamic_epilogue

    return [dynamic_epilogue(False), dynamic_epilogue(True), dynamic_epilogue(True, True)]


def w4a4_launches(arch: int) -> list[Launch]:
    """The generated W4A4 GEMM (kernels/gemm_w4a4.py: x and w packed int4, two int8 dots a
    K step) at every config the autotuner may pick ("tuned": on a GPU its wrapper always
    tunes, no untuned default is launched), each made valid by its fit_config (BLOCK_K //
    2 >= 32 on GPUs); and the per-token quantizer that packs x."""
    from qcompile.lowering.codegen import _emit
    from qcompile.lowering.kernels.quantize import int4_groups_block, int4_packed_block

    def fit(cfg: GemmConfig) -> GemmConfig:  # gemm_w4a4.fit_config on a GPU target
        return GemmConfig(cfg.block_m, cfg.block_n, max(cfg.block_k, 64), cfg.group_m,
                          cfg.num_warps, cfg.num_stages)

    out = []
    for ep in w4a4_epilogues():
        code = _emit(ep)
        for cfg in map(fit, SM90_CONFIGS if arch >= 90 else SM80_CONFIGS):
            args: dict[str, Any] = dict(
                a_ptr=torch.uint8, w_ptr=torch.uint8, c_ptr=ep.out_dtype, M=4096, N=_N, K=_K,
                stride_am=_K // 2, stride_ak=1, stride_wn=_K // 2, stride_wk=1, stride_cm=_N,
                stride_cn=1, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                GROUP_M=cfg.group_m)
            args.update({f"{p}_ptr": _OPERAND_DTYPES.get(p, torch.float32)
                         for p in code.pointers})
            args.update({st: 1 for st, _ in code.strides})
            options = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                           enable_fp_fusion=ep.integer_only)
            name = f"gemm_w4a4[{ep.signature()}] {cfg} M=4096"
            out.append(Launch(arch, name, ep, args, options, frozenset({"tuned", "mma:s8"}),
                              "gemm_w4a4"))
    for dt in _FLOATS:  # one pass up to 16384, then two
        for k, sym in itertools.product((4096, 32768), (True, False)):
            block_b = int4_packed_block(k, sym)
            args = dict(x_ptr=dt, p_ptr=torch.uint8, scale_ptr=torch.float32,
                        zp_ptr=torch.int32, K=k, clip=0.9, stride_xm=k, stride_xk=1,
                        stride_pm=k // 2, stride_pk=1, EPS=1e-8, BLOCK_B=block_b,
                        ONE_PASS=block_b >= k // 2, SYMMETRIC=sym)
            kind = "" if sym else ", asymmetric"
            out.append(_launch(arch, f"quantize_per_token_int4_packed[{_short(dt)}{kind}] "
                                     f"K={k}",
                               "quantize:_quantize_per_token_int4_packed_kernel", args,
                               dict(num_warps=min(16, max(1, block_b // 256)))))
        # groups: one pass, then two; one float type (the loads are the per-token kernel's)
        for k, group in ((4096, 16), (32768, 16)) if dt == torch.bfloat16 else ():
            block_g = int4_groups_block(k, group)
            args = dict(x_ptr=dt, v_ptr=torch.int8, scale_ptr=torch.float32, K=k, clip=0.9,
                        stride_xm=k, stride_xk=1, stride_vm=k, stride_vk=1, QMAX=7,
                        MULT_MAX=15, EPS=1e-8, GROUP=group, GROUP_P=group, BLOCK_G=block_g,
                        ONE_PASS=block_g >= k // group)
            out.append(_launch(arch, f"quantize_int4_groups[{_short(dt)}, groups of {group}] "
                                     f"K={k}",
                               "quantize:_quantize_int4_groups_kernel", args,
                               dict(num_warps=min(16, max(1, block_g * group // 512)))))
    return out


def _attention_args(d: int, mask_dtype, out_dtype, has_mask: bool) -> dict:
    """q [2, 32, 2048, d], k and v [2, 8, 2048, d] (grouped-query), contiguous."""
    hq, hkv, s = 32, 8, 2048
    args = dict(q_ptr=torch.int8, k_ptr=torch.int8, v_ptr=torch.int8, o_ptr=out_dtype,
                mask_ptr=mask_dtype, Hq=hq, Sq=s, Sk=s, D=d, GROUP=hq // hkv)
    for t in "qkvo":
        h = hq if t in "qo" else hkv
        args.update({f"stride_{t}b": h * s * d, f"stride_{t}h": s * d, f"stride_{t}s": d,
                     f"stride_{t}d": 1})
    # A [Sq, Sk] mask expanded over batch and heads (strides 0), or no mask at all.
    mask = (0, 0, s, 1) if has_mask else (0, 0, 0, 0)
    args.update(zip(("stride_mb", "stride_mh", "stride_mq", "stride_mk"), mask))
    return args


def attention_launches(arch: int) -> list[Launch]:
    out = []
    for d in (64, 128, 256):
        block_d = max(32, d)
        for causal, has_mask, kpm in ((False, False, False), (True, False, False),
                                      (False, True, True)):
            for out_dt in (torch.float16, torch.bfloat16) if d == 128 else (torch.float16,):
                args = _attention_args(d, torch.float32, out_dt, has_mask)
                args.update(kpm_ptr=torch.int8 if kpm else torch.float32, c_ptr=torch.float32,
                            vs_ptr=torch.float32, stride_pb=2048 if kpm else 0,
                            stride_pk=1 if kpm else 0, CAUSAL=causal, HAS_MASK=has_mask,
                            HAS_KPM=kpm, BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d)
                flags = ("+causal" if causal else "") + ("+mask+kpm" if has_mask else "")
                # Q K^T on int8, P V on float16 (P rounded to float16, V's codes exact)
                out.append(_launch(arch, f"attention[{_short(out_dt)}{flags}] D={d}",
                                   "attention:_attention_kernel", args,
                                   dict(num_warps=4 if block_d <= 64 else 8),
                                   {"mma:s8", "mma:f16"}))
    return out


# The integer constants of GELU(S = 0.05) -> S = 0.03 and of LayerNorm over C channels (S =
# 0.05 -> 0.03, eps 1e-5) as the I-BERT parameter functions make them; the values only
# choose the argument types (all fit in int32), so they are written out.
_GELU = dict(in_zp=0, up=6, q_b=-3203, q_c=-11346261, q_one=-11346261, q=10336555, shift=53,
             out_zp=-50, qmin=-128, qmax=127)
_LAYERNORM = {384: (226492, 10, 18, 42), 768: (1811939, 8, 18, 42), 4096: (274877907, 5, 16, 40)}


def int_nonlinear_launches(arch: int) -> list[Launch]:
    from qcompile.lowering.kernels import int_nonlinear

    args = dict(x_ptr=torch.int8, y_ptr=torch.int8, n=1 << 20, **_GELU, BLOCK=1024)
    out = [_launch(arch, "gelu_int8", "int_nonlinear:_gelu_int8_kernel", args,
                   tags={"integer_only"})]
    for c, (eps, f, frac, shift) in _LAYERNORM.items():
        block_c = 1 << (c - 1).bit_length()
        args = dict(x_ptr=torch.int8, y_ptr=torch.int8, gamma_ptr=torch.int64,
                    beta_ptr=torch.int64, C=c, in_zp=0, eps=eps, f=f, frac=frac, shift=shift,
                    out_zp=0, qmin=-128, qmax=127, BLOCK_C=block_c,
                    STEPS=int_nonlinear.ISQRT_STEPS)
        out.append(_launch(arch, f"layernorm_int8 C={c}", "int_nonlinear:_layernorm_int8_kernel",
                           args, dict(num_warps=min(16, max(1, block_c // 256))),
                           {"integer_only"}))
    for d in (64, 128):
        for causal, has_mask in ((False, False), (True, False), (False, True)):
            args = _attention_args(d, torch.int64, torch.float16, has_mask)
            args.update(qm_ptr=torch.int64, sm_ptr=torch.int64, os_ptr=torch.float32,
                        CAUSAL=causal, HAS_MASK=has_mask, SM_BITS=int_nonlinear.SOFTMAX_BITS,
                        BLOCK_M=16, BLOCK_N=32, BLOCK_D=d)
            flags = ("+causal" if causal else "") + ("+mask" if has_mask else "")
            # Q K^T on int8 tensor cores; P V is an exact float32 FMA product by design
            out.append(_launch(arch, f"isoftmax_attention[float16{flags}] D={d}",
                               "int_nonlinear:_isoftmax_attention_kernel", args,
                               dict(num_warps=4), {"mma:s8"}))
    return out


def launches(arch: int) -> list[Launch]:
    """Every launch to compile for sm_<arch>; ids are unique."""
    out = (gemm_launches(arch) + quantize_launches(arch) + hadamard_launches(arch)
           + w4_launches(arch) + w4a4_launches(arch) + attention_launches(arch)
           + int_nonlinear_launches(arch))
    ids = [x.id for x in out]
    assert len(set(ids)) == len(ids), "launch ids must be unique"
    return out


# --------------------------------------------------------------------------- compile

_PTXAS_FRAME = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def _jit_function(kernel: str | Epilogue, kernel_dir: Path, template: str = "gemm_int8"):
    from triton.runtime.jit import JITFunction

    if isinstance(kernel, Epilogue):
        from qcompile.lowering.codegen import load_kernel
        from qcompile.lowering.kernels.gemm_w4a4 import load_w4a4_kernel

        load = load_w4a4_kernel if template == "gemm_w4a4" else load_kernel
        fn = load(kernel, origin="qcompile.lowering.aot", cache_dir=kernel_dir).fn
    else:
        module, name = kernel.split(":")
        fn = getattr(importlib.import_module(module), name)
    if not isinstance(fn, JITFunction):
        raise RuntimeError(f"{kernel} is not a compilable JITFunction (TRITON_INTERPRET is set)")
    return fn


def compile_launch(launch: Launch, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Compile one launch; the result dict says ok/error, and for a success the registers,
    spill stores/loads and stack frame (from ptxas), shared memory (bytes) and the path of
    the PTX written under out_dir."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import MockTensor, create_function_from_signature

    result: dict[str, Any] = dict(id=launch.id, ok=False)
    start = time.perf_counter()
    log = io.StringIO()
    try:
        fn = _jit_function(launch.kernel, Path(out_dir) / "kernels", launch.template)
        target = GPUTarget("cuda", launch.arch, 32)
        backend = make_backend(target)
        # The launch path's own binder and packing (JITFunction.run does the same with the
        # active device's backend): the same signature, constants and alignment hints.
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        args = {k: MockTensor(v) if isinstance(v, torch.dtype) else v
                for k, v in launch.args.items()}
        bound, specialization, options = binder(**args, **launch.options)
        options, signature, constexprs, attrs = fn._pack_args(
            backend, dict(launch.options), bound, specialization, options
        )
        # ptxas's report (-v) is printed when TRITON_DUMP_PTXAS_LOG is set; main sets it
        # and forces a fresh compile (TRITON_ALWAYS_COMPILE), so every launch has one.
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
    except Exception as e:  # noqa: BLE001 - reported per launch, the others go on
        lines = [ln for ln in f"{type(e).__name__}: {e}".splitlines() if ln.strip()]
        result["error"] = "\n".join(lines[:6])
        result["compile_s"] = round(time.perf_counter() - start, 2)
        return result
    text = log.getvalue()
    frame, regs = _PTXAS_FRAME.search(text), _PTXAS_REGS.search(text)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    ptx_path = Path(out_dir) / (re.sub(r"[^A-Za-z0-9.+=-]+", "_", launch.id) + ".ptx")
    ptx_path.write_text(compiled.asm["ptx"])
    result.update(
        ok=True,
        compile_s=round(time.perf_counter() - start, 2),
        registers=int(regs.group(1)) if regs else None,
        stack=int(frame.group(1)) if frame else None,
        spill_stores=int(frame.group(2)) if frame else None,
        spill_loads=int(frame.group(3)) if frame else None,
        shared=int(compiled.metadata.shared),
        num_warps=int(compiled.metadata.num_warps),
        num_stages=int(compiled.metadata.num_stages),
        ptx=str(ptx_path),
    )
    return result


def unavailable() -> str | None:
    """Why nothing can be compiled here, or None: the interpreter is on, or Triton's NVIDIA
    backend or its ptxas is missing."""
    if os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on"):
        return "TRITON_INTERPRET is set: kernels would be interpreter functions"
    try:
        import subprocess

        from triton.backends import backends
        from triton.backends.nvidia.compiler import get_ptxas

        if "nvidia" not in backends:
            return "Triton has no NVIDIA backend"
        for arch in ARCHS:
            subprocess.run([get_ptxas(arch).path, "--version"], check=True, capture_output=True)
    except Exception as e:  # noqa: BLE001 - any failure means: cannot compile here
        return f"Triton's NVIDIA backend or ptxas is unavailable: {type(e).__name__}: {e}"
    return None


def _compile_all(selected: list[Launch], out_dir: Path, jobs: int) -> list[dict]:
    # The largest tiles compile slowest: start them first so the workers finish together.
    order = sorted(selected, key=lambda x: -_cost(x))
    if jobs <= 1:
        return [compile_launch(x, out_dir) for x in order]
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of a process with torch threads
    with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        return list(pool.map(compile_launch, order, [out_dir] * len(order), chunksize=1))


def _cost(x: Launch) -> int:
    a = x.args
    return a.get("BLOCK_M", 1) * a.get("BLOCK_N", 1) * a.get("BLOCK_K", 1) * x.options.get(
        "num_stages", 3
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qcompile.lowering.aot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default=",".join(map(str, ARCHS)), help="e.g. 80,90")
    p.add_argument("--match", default=None, help="compile only launches whose id matches")
    p.add_argument("--ids", default=None, help="file with one launch id a line to compile")
    p.add_argument("--list", action="store_true", help="print the launch ids and exit")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--out", default=None, help="directory for PTX files (default: temporary)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    selected = [x for arch in map(int, args.arch.split(",")) for x in launches(arch)]
    if args.match:
        selected = [x for x in selected if re.search(args.match, x.id)]
    if args.ids:
        wanted = set(Path(args.ids).read_text().splitlines())
        selected = [x for x in selected if x.id in wanted]
    if args.list:
        print("\n".join(x.id for x in selected))
        return 0
    reason = unavailable()
    if reason:
        if args.json:
            Path(args.json).write_text(json.dumps({"unavailable": reason}))
        print(f"cannot compile: {reason}", file=sys.stderr)
        return 2
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="qcompile-aot-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Spawned workers inherit these: a private Triton cache, always compiled, ptxas -v shown.
    os.environ.setdefault("TRITON_CACHE_DIR", str(out_dir / "triton-cache"))
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    start = time.perf_counter()
    results = _compile_all(selected, out_dir, args.jobs)
    wall = time.perf_counter() - start
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "wall_s": wall}, indent=1))
    print(f"{'launch':<78} {'regs':>4} {'spill st/ld':>11} {'shared':>7} {'s':>5}")
    for r in sorted(results, key=lambda r: r["id"]):
        if r["ok"]:
            print(f"{r['id']:<78} {r['registers']!s:>4} "
                  f"{r['spill_stores']!s:>5}/{r['spill_loads']!s:<5} {r['shared']:>7} "
                  f"{r['compile_s']:>5}")
        else:
            print(f"{r['id']:<78} FAILED {r['error'].splitlines()[0][:160]}")
    failed = sum(not r["ok"] for r in results)
    print(f"{len(results)} launches, {failed} failed, {wall:.0f} s on {args.jobs} processes")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
