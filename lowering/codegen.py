"""Generate, write, and load the Triton source of an int8 GEMM for one Epilogue.

What: each Epilogue step emits its kernel arguments and epilogue lines; they fill the
template in kernels/gemm_int8.py. The result is written to a cache directory (default
~/.cache/qcompile/kernels) as gemm_int8_<signature>_<hash>.py, with a header naming the
graph nodes it serves, and imported as a module (Triton reads a kernel's source from its
file, so a real file is needed anyway, and it is what a person debugging reads).

Why generated: an integer-only epilogue is then literally integer-only (tests FileCheck
the text), and the requantization lines are the dyadic contract spelled out: int64
multiply, add half, arithmetic shift, sign, zero point, clamp.

Safety (lowering/cache_dir.py): the cache directory is created 0o700 and refused if
another user could write into it, checked once per directory per process, since the file
is run as code. Before a file is imported it must be exactly what the template generates
(header, body, then only "# also serves:" records); anything else (edited, truncated, a
directory where the file belongs) is ignored with one CacheWarning and regenerated, and
the text that was checked is the text that runs. Writes and origin records go through a
temporary file renamed into place, under an flock on the directory's .lock, so concurrent
processes neither tear the file nor lose each other's records.

Post: `load_kernel` returns one kernel per (epilogue signature, cache directory) per
process; a later request from another graph node reuses it and is recorded at the end of
the file. Same signature -> same source body -> Triton's own compile cache hits too.
Repeated calls cost a few dict lookups: no file is read again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.lowering.cache_dir import (
    locked,
    read_cache_text,
    trusted_dir,
    warn_once,
    write_atomic,
)
from qcompile.lowering.epilogue import (
    Bias,
    Dequantize,
    Epilogue,
    InputZeroPoint,
    Requantize,
    RowZeroPoint,
)
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


@dataclass(frozen=True)
class Template:
    """A generated kernel module: HEADER and BODY (string.Templates filled from an
    epilogue's emitted code), the file name prefix and where the template lives (for
    errors). The GEMM's is GEMM; kernels/conv.py declares the convolution's."""

    name: str  # "gemm_int8": files are <name>_<signature>_<hash of the body>.py
    header: Any  # string.Template: version, signature, origin
    body: Any  # string.Template: signature, do_not_specialize, epilogue_*
    version: int
    source: str  # the template's file
    runtime_scalars: tuple[str, ...] = ()  # the template's own unspecialized scalars


GEMM = Template("gemm_int8", HEADER, BODY, TEMPLATE_VERSION,
                "qcompile/lowering/kernels/gemm_int8.py")


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
    # RowZeroPoint alone before a Dequantize stays int32: its product and difference are
    # bounded by the per-token int4 ops (|zp| <= 8, |colsum| <= 128 K, |x| <= 15 * 128 K,
    # all below 2**31 for K <= 131071), and an int64 tile spills large float tiles
    wide = epilogue.requantize is not None or (
        epilogue.dequantize is not None
        and any(isinstance(s, (InputZeroPoint, Bias)) for s in epilogue.steps)
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
        elif isinstance(step, RowZeroPoint):
            code.pointers += ["row_zero_point", "col_sum"]
            b += [
                "# per-token zero points: subtract row_zero_point[m] * colsum(W)[c]",
                "row_zp = tl.load(row_zero_point_ptr + offs_m, mask=mask_m, other=0)  # [BM] int32",
                "col_sum = tl.load(col_sum_ptr + offs_n, mask=mask_n, other=0)  # [BLOCK_N] int32",
                f"x = x - row_zp{widen}[:, None] * col_sum{widen}[None, :]",
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


def _body(epilogue: Epilogue, template: Template = GEMM) -> str:
    code = _emit(epilogue)
    sig = epilogue.signature()
    return template.body.substitute(
        signature=sig,
        do_not_specialize=", ".join(repr(s) for s in (*template.runtime_scalars,
                                                       *code.scalars)),
        epilogue_pointers=_arg_lines([f"{p}_ptr" for p in code.pointers]),
        epilogue_strides=_arg_lines([s for s, _ in code.strides]) + "\n" if code.strides else "",
        epilogue_scalars=_arg_lines(code.scalars),
        epilogue_body="\n".join(_IND + line for line in code.body),
    )


def _header(epilogue: Epilogue, origin: str, template: Template = GEMM) -> str:
    origin = " ".join(origin.split()) or "(no graph node named)"  # one comment line
    return template.header.substitute(
        version=template.version, signature=epilogue.signature(), origin=origin
    )


def generated_source(epilogue: Epilogue, origin: str = "", template: Template = GEMM) -> str:
    """The full text of the generated kernel module for `epilogue`, header naming `origin`."""
    return _header(epilogue, origin, template) + _body(epilogue, template)


def kernel_path(epilogue: Epilogue, cache_dir: str | os.PathLike | None = None,
                template: Template = GEMM) -> Path:
    """Where the kernel for `epilogue` is (or will be) written."""
    body = _body(epilogue, template)
    digest = hashlib.sha256(body.encode()).hexdigest()[:12]
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", epilogue.signature()).strip("_")
    return Path(cache_dir or default_cache_dir()) / f"{template.name}_{slug}_{digest}.py"


_LOCK = threading.Lock()
# (template, signature, directory) -> (module, path); and the GEMM's KernelSpecs
_MODULES: dict[tuple[str, str, str], tuple[Any, Path]] = {}
_LOADED: dict[tuple[str, str], KernelSpec] = {}  # (signature, directory) -> kernel
_RECORDED: set[tuple[Path, str]] = set()  # (file, origin) already in the file
_WHAT = "generated kernel"
_ELSEWHERE = ("choose another directory: kernel_cache_dir= (gemm_int8, load_kernel), "
              "--cache DIR (python -m qcompile.lowering.autotune)")
_SERVES, _ALSO_SERVES = "# serves:", "# also serves:"


def kernel_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The resolved kernel cache directory, created 0o700 if missing and refused if another
    user could write into it (checked once per directory per process)."""
    return trusted_dir(cache_dir or default_cache_dir(), what="kernel cache directory",
                       elsewhere=_ELSEWHERE)


def _origins_in(text: str) -> set[str]:
    found = set()
    for line in text.splitlines():
        for tag in (_SERVES, _ALSO_SERVES):
            if line.startswith(tag):
                found.add(line[len(tag):].strip())
    return found


def _source_problem(text: str, epilogue: Epilogue, template: Template = GEMM) -> str | None:
    """What makes `text` other than a file this module wrote for `epilogue`, or None."""
    lines = text.splitlines(keepends=True)
    if len(lines) < 4 or not lines[3].startswith(_SERVES):
        return "it does not start with the generated header (edited or truncated)"
    expected = (_header(epilogue, lines[3][len(_SERVES):].strip(), template)
                + _body(epilogue, template))
    if not text.startswith(expected):
        return "it differs from the source the template generates (edited or truncated)"
    rest = text[len(expected):]
    for i, line in enumerate(rest.splitlines(keepends=True)):
        if not (line.startswith(_ALSO_SERVES) and line.endswith("\n")):
            n = expected.count("\n") + i + 1
            return f"line {n} after the kernel is not an {_ALSO_SERVES!r} record: {line!r:.60}"
    return None


def _checked_source(path: Path, epilogue: Epilogue, template: Template = GEMM) -> str | None:
    """The file's text if it is intact; None (warned once, unless absent) otherwise."""
    text = read_cache_text(path, _WHAT)
    if text is not None:
        problem = _source_problem(text, epilogue, template)
        if problem is not None:
            warn_once(path, _WHAT, problem)
            return None
    return text


def _record_origin(path: Path, epilogue: Epilogue, origin: str, template: Template) -> None:
    # Appended at the end so the line numbers of an already loaded kernel never move; as a
    # locked rewrite, not an append, so a concurrent reader never sees half a line and two
    # processes recording at once keep both records.
    with locked(path.parent / ".lock"):
        text = _checked_source(path, epilogue, template)
        if text is None:  # removed or damaged since it was loaded
            text = generated_source(epilogue, origin, template)
        elif origin in _origins_in(text):
            return
        else:
            text += f"{_ALSO_SERVES} {origin}\n"
        write_atomic(path, text)


def load_module(epilogue: Epilogue, template: Template = GEMM, *, origin: str = "",
                cache_dir: str | os.PathLike | None = None) -> tuple[Any, Path]:
    """Generate (once), write, import and return (module, file) of `template` for
    `epilogue`; a later request from another graph node is recorded in the file."""
    directory = kernel_dir(cache_dir)
    key = (template.name, epilogue.signature(), str(directory))
    origin = " ".join(origin.split())  # one comment line
    with _LOCK:
        loaded = _MODULES.get(key)
        if loaded is None:
            loaded = _MODULES[key] = _import_module(
                epilogue, template, kernel_path(epilogue, directory, template), origin)
        path = loaded[1]
        if origin and (path, origin) not in _RECORDED:
            _record_origin(path, epilogue, origin, template)
            _RECORDED.add((path, origin))
        return loaded


def _import_module(epilogue: Epilogue, template: Template, path: Path, origin: str):
    # The file name hashes the body, so an intact file differs from a fresh one only in
    # the origins it names.
    with locked(path.parent / ".lock"):
        text = _checked_source(path, epilogue, template)
        if text is None:
            text = generated_source(epilogue, origin, template)
            write_atomic(path, text)
    module_name = "qcompile_generated_" + path.stem
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        # The checked text, not the file read again: what was checked is what runs.
        exec(compile(text, str(path), "exec"), module.__dict__)
    except Exception as e:
        del sys.modules[module_name]
        raise RuntimeError(
            f"the generated kernel {path} matches its template but does not import "
            f"({type(e).__name__}: {e}): the template in {template.source} is broken"
        ) from e
    return module, path


def load_kernel(
    epilogue: Epilogue, *, origin: str = "", cache_dir: str | os.PathLike | None = None
) -> KernelSpec:
    """Generate (once), write, import and return the GEMM kernel for `epilogue`."""
    module, path = load_module(epilogue, GEMM, origin=origin, cache_dir=cache_dir)
    key = (epilogue.signature(), str(path.parent))
    spec = _LOADED.get(key)
    if spec is None:
        code = _emit(epilogue)
        spec = _LOADED[key] = KernelSpec(
            fn=module.gemm_int8_kernel,
            path=path,
            signature=epilogue.signature(),
            pointer_operands=tuple(code.pointers),
            stride_operands=tuple(code.strides),
            scalar_operands=tuple(code.scalars),
            fp_fusion=epilogue.integer_only,
        )
    return spec
