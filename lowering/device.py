"""Where kernels can run: CUDA, the Triton interpreter, or neither. Read once, then cached.

Why: Triton chooses between compiling and interpreting when a kernel is decorated
(`TRITON_INTERPRET` must be set before the generated kernel module is imported), and
`torch.cuda.is_available()` is not free. Every lowering module asks here instead of
reading the environment itself, so the answer is read once, in one place, at first use
(never at import time).

Post: `triton_target()` is one of "cuda", "interpreter", "none" for the life of the
process (unless `enable_interpreter()` is called first, before any kernel is loaded).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

_TRUTHY = ("1", "true", "yes", "on")


@functools.cache
def has_cuda() -> bool:
    """A usable CUDA device is present (torch built with CUDA and a GPU visible)."""
    return torch.cuda.is_available()


@functools.cache
def has_triton() -> bool:
    """The triton package is importable."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def interpreter_requested() -> bool:
    """TRITON_INTERPRET was set when qcompile first asked (read once)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUTHY


def enable_interpreter() -> None:
    """Run Triton kernels in the interpreter (CPU tensors) from now on in this process.

    For tools (benchmark smoke runs, the autotune CLI) run on a machine without a GPU.
    Must be called before the first kernel is loaded: Triton decides at decoration time.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    interpreter_requested.cache_clear()


def triton_target() -> str:
    """"cuda" (compiled kernels), "interpreter" (TRITON_INTERPRET=1) or "none"."""
    if not has_triton():
        return "none"
    if interpreter_requested():
        return "interpreter"
    return "cuda" if has_cuda() else "none"


def triton_runs_on(device: str) -> bool:
    """Whether Triton kernels run on tensors of this device type here: compiled on CUDA
    tensors, or interpreted on CPU tensors (TRITON_INTERPRET=1)."""
    target = triton_target()
    return (target, device) in (("cuda", "cuda"), ("interpreter", "cpu"))


def check_can_launch(t: torch.Tensor) -> None:
    """Raise a clear error if a Triton kernel cannot run on tensors on t's device."""
    target = triton_target()
    if target == "none":
        raise RuntimeError(
            "Triton kernels need a CUDA device or the Triton interpreter (TRITON_INTERPRET=1 set "
            "before kernels load); on CPU use qcompile.lowering.cpu instead"
        )
    if target == "interpreter" and t.device.type != "cpu":
        raise RuntimeError(f"the Triton interpreter runs on CPU tensors, got {t.device}")
    if target == "cuda" and t.device.type != "cuda":
        raise RuntimeError(
            f"compiled Triton kernels need CUDA tensors, got {t.device}; "
            "use qcompile.lowering.cpu for CPU tensors"
        )


def device_name(device: torch.device | str | None = None) -> str:
    """A stable name for autotune keys: the GPU's marketing name, or "cpu"."""
    dev = torch.device(device) if device is not None else None
    if (dev is None or dev.type == "cuda") and has_cuda():
        return torch.cuda.get_device_name(dev)
    return "cpu"


def cuda_capability(device: torch.device | str | None = None) -> tuple[int, int] | None:
    """(major, minor) of the CUDA device, or None without one."""
    if not has_cuda():
        return None
    return torch.cuda.get_device_capability(device)


def inside_compiler() -> bool:
    """True while Dynamo traces or a backend (ours included) compiles: a nested
    torch.compile'd helper must then run eagerly (nesting re-enters Dynamo)."""
    import torch._guards

    return torch.compiler.is_compiling() or torch._guards.TracingContext.try_get() is not None
