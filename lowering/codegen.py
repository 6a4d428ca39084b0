"""Generate, write, and load the Triton source of an int8 GEMM for one Epilogue.

What: each Epilogue step emits its kernel arguments and epilogue lines; they fill the
template in kernels/gemm_int8.py. The result is written to a cache directory (default
~/.cache/qcompile/kernels) as gemm_int8_<signature>_<hash>.py, with a header naming the
graph nodes it serves, and imported as a module (Triton reads a kernel's source from its
file, so a real file is needed anyway, and it is what a person debugging reads).

Why generated: an integer-only epilogue is then literally integer-only (tests FileCheck
the text), and the requantization lines are the dyadic contract spelled out: int64
multiply, add half, arithmetic shift, sign, zero point, clamp.

Post: `load_kernel` returns one kernel per (epilogue signature, cache directory) per
process; a later request from another graph node reuses it and is recorded at the end of
the file. Same signature -> same source body -> Triton's own compile cache hits too.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.lowering.epilogue import Bias, Dequantize, Epilogue, InputZeroPoint, Requantize
from qcompile.lowering.kernels.gemm_int8 import BODY, HEADER, TEMPLATE_VERSION

_TL_DTYPE = {"float32": "tl.float32", "float16": "tl.float16", "bfloat16": "tl.bfloat16"}
_IND = "    "


@dataclass(frozen=True)
class KernelSpec:
    """A loaded kernel and how to call it: which bound epilogue values go where."""

    fn: Any  # triton JITFunction (or InterpretedFunction)
    path: Path
    signature: str
    pointer_operands: tuple[str, ...]  # passed as <name>_ptr
    stride_operands: tuple[tuple[str, str], ...]  # (kernel arg, operand) for stride(0)
    scalar_operands: tuple[str, ...]  # passed under their own name
    fp_fusion: bool  # False for float epilogues: no FMA contraction, matches the reference


@dataclass
class _Code:
    pointers: list[str]
    strides: list[tuple[str, str]]
    scalars: list[str]
    body: list[str]


def default_cache_dir() -> Path:
    """~/.cache/qcompile/kernels (resolved when called, not at import)."""
    return Path.home() / ".cache" / "qcompile" / "kernels"


def _emit(epilogue: Epilogue) -> _Code:
    code = _Code([], [], [], [])
    b = code.body
    if not epilogue.steps:
        b.append("out = acc  # [BLOCK_M, BLOCK_N] int32: no epilogue steps")
        return code
    wide = epilogue.requantize is not None or (
        epilogue.dequantize is not None and len(epilogue.steps) > 1
    )
    if wide:
        # Integer steps before a requantization or a float conversion run in int64: exact,
        # since |acc + bias - zp_term| <= 2**31.
        b.append("x = acc.to(tl.int64)  # [BLOCK_M, BLOCK_N]")
    else:
        # int32 out: int32 adds wrap modulo 2**32, so the sum comes out exact whenever it
        # fits int32, which the range check ensures; an int64 tile would double the registers.
        # (Triton's debug-mode overflow check may still flag a wrap in x - zp_term.)
        b.append("x = acc  # [BLOCK_M, BLOCK_N] int32")
    widen = ".to(tl.int64)" if wide else ""
    for step in epilogue.steps:
        if isinstance(step, InputZeroPoint):
            code.pointers.append("zp_term")
            b += [
                "# input zero point: subtract zp_x * colsum(W)[c]",
                "zp_term = tl.load(zp_term_ptr + offs_n, mask=mask_n, other=0)  # [BLOCK_N] int32",
                f"x = x - zp_term{widen}[None, :]",
            ]
        elif isinstance(step, Bias):
            code.pointers.append("bias")
            b += [
                "# bias, already in the accumulator's scale s_x * s_w[c]",
                "bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0)  # [BLOCK_N] int32",
                f"x = x + bias{widen}[None, :]",
            ]
        elif isinstance(step, Requantize):
            b += _emit_requantize(code, step)
        elif isinstance(step, Dequantize):
            b += _emit_dequantize(code, step)
    if epilogue.requantize is None and epilogue.dequantize is None:
        b.append("out = x  # int32: the range check bounds |x| by 2**31 - 1")
    return code


def _emit_requantize(code: _Code, step: Requantize) -> list[str]:
    lines = ["# dyadic requantization (qcompile.numerics.dyadic): integer-only, one rounding"]
    if step.per_channel:
        code.pointers += ["q", "shift"]
        lines += [
            "# Stored as int64, held as int32 (exact: 0 <= q < 2**31, 1 <= shift <= 62): a",
            "# thread holds these for each of its columns, and registers are what bound the tile",
            "q = tl.load(q_ptr + offs_n, mask=mask_n, other=0).to(tl.int32)[None, :]  # [1, BN]",
            "# other=1 keeps the shift of masked columns in range",
            "shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=1).to(tl.int32)[None, :]",
        ]
    else:
        code.scalars += ["q", "shift"]
        lines.append("shift = shift.to(tl.int64)")
    code.scalars += ["out_zero_point", "qmin", "qmax"]
    lines += [
        "# |x| <= 2**31 and q < 2**31, so |p| < 2**62 and |p| + 2**61 fits in int64",
        "p = x * q.to(tl.int64)",
        "half = tl.full((1, 1), 1, tl.int64) << (shift - 1)  # 2**(shift - 1), shift in 1..62",
        "mag = (tl.abs(p) + half) >> shift  # round half away from zero, on |p|",
        "y = tl.where(p < 0, -mag, mag) + out_zero_point.to(tl.int64)",
        "y = tl.maximum(y, qmin.to(tl.int64))  # a ReLU is qmin = out_zero_point",
        "y = tl.minimum(y, qmax.to(tl.int64))",
        "out = y.to(tl.int8)",
    ]
    return lines


def _emit_dequantize(code: _Code, step: Dequantize) -> list[str]:
    code.pointers += ["row_scale", "col_scale"]
    code.strides += [("stride_rs", "row_scale"), ("stride_cs", "col_scale")]
    lines = [
        "# dequantize: ((float32(acc) * row_scale[m]) * col_scale[c]) + bias[c], the reference's",
        "# op order; the launch disables FMA contraction so each op rounds once, as in torch",
        "row_scale = tl.load(row_scale_ptr + offs_m * stride_rs, mask=mask_m, other=0.0)  # [BM]",
        "col_scale = tl.load(col_scale_ptr + offs_n * stride_cs, mask=mask_n, other=0.0)  # [BN]",
        "y = x.to(tl.float32) * row_scale[:, None]",
        "y = y * col_scale[None, :]",
    ]
    if step.has_bias:
        code.pointers.append("float_bias")
        lines += [
            "float_bias = tl.load(float_bias_ptr + offs_n, mask=mask_n, other=0.0)  # [BLOCK_N]",
            "y = y + float_bias[None, :]",
        ]
    if step.out_dtype == "bfloat16":
        lines += [
            "# float32 -> bfloat16 rounding to nearest even, spelled out in integer ops (as torch",
            "# does it): the Triton interpreter truncates in .to(tl.bfloat16); this is exact on",
            "# every target. Finite inputs only (scales are finite).",
            "bits = y.to(tl.uint32, bitcast=True)",
            "bits = bits + (0x7FFF + ((bits >> 16) & 1))",
            "out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)",
        ]
    else:
        lines.append(f"out = y.to({_TL_DTYPE[step.out_dtype]})  # round to nearest even")
    return lines


def _arg_lines(names: list[str]) -> str:
    if not names:
        return _IND + "# (none)"
    return _IND + " ".join(f"{n}," for n in names)


def _body(epilogue: Epilogue) -> str:
    code = _emit(epilogue)
    sig = epilogue.signature()
    return BODY.substitute(
        signature=sig,
        do_not_specialize=", ".join(repr(s) for s in code.scalars),
        epilogue_pointers=_arg_lines([f"{p}_ptr" for p in code.pointers]),
        epilogue_strides=_arg_lines([s for s, _ in code.strides]) + "\n" if code.strides else "",
        epilogue_scalars=_arg_lines(code.scalars),
        epilogue_body="\n".join(_IND + line for line in code.body),
    )


def _header(epilogue: Epilogue, origin: str) -> str:
    origin = " ".join(origin.split()) or "(no graph node named)"  # one comment line
    return HEADER.substitute(
        version=TEMPLATE_VERSION, signature=epilogue.signature(), origin=origin
    )


def generated_source(epilogue: Epilogue, origin: str = "") -> str:
    """The full text of the generated kernel module for `epilogue`, header naming `origin`."""
    return _header(epilogue, origin) + _body(epilogue)


def kernel_path(epilogue: Epilogue, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the kernel for `epilogue` is (or will be) written."""
    body = _body(epilogue)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", epilogue.signature()).strip("_")
    return Path(cache_dir or default_cache_dir()) / f"gemm_int8_{slug}_{digest}.py"


_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], KernelSpec] = {}


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _origins_in(text: str) -> set[str]:
    found = set()
    for line in text.splitlines():
        for tag in ("# serves:", "# also serves:"):
            if line.startswith(tag):
                found.add(line[len(tag):].strip())
    return found


def _record_origin(path: Path, origin: str) -> None:
    # Appended at the end so the line numbers of an already loaded kernel never move.
    origin = " ".join(origin.split())
    if origin and origin not in _origins_in(path.read_text()):
        with open(path, "a") as f:
            f.write(f"# also serves: {origin}\n")


def load_kernel(
    epilogue: Epilogue, *, origin: str = "", cache_dir: str | os.PathLike | None = None
) -> KernelSpec:
    """Generate (once), write, import and return the kernel for `epilogue`."""
    path = kernel_path(epilogue, Path(cache_dir or default_cache_dir()).expanduser().resolve())
    key = (epilogue.signature(), str(path.parent))
    with _LOCK:
        spec = _LOADED.get(key)
        if spec is None:
            spec = _import_kernel(epilogue, path, origin)
            _LOADED[key] = spec
        _record_origin(path, origin)
        return spec


def _import_kernel(epilogue: Epilogue, path: Path, origin: str) -> KernelSpec:
    body = _body(epilogue)
    # The file name hashes the body, so an existing file differs only by its header and
    # recorded origins, unless someone edited it: then it is regenerated.
    if not path.exists() or body not in path.read_text():
        _write_atomic(path, _header(epilogue, origin) + body)
    module_name = "qcompile_generated_" + path.stem
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    loader_spec.loader.exec_module(module)
    code = _emit(epilogue)
    return KernelSpec(
        fn=module.gemm_int8_kernel,
        path=path,
        signature=epilogue.signature(),
        pointer_operands=tuple(code.pointers),
        stride_operands=tuple(code.strides),
        scalar_operands=tuple(code.scalars),
        fp_fusion=epilogue.integer_only,
    )
