"""The C++ CPU kernels' one way to be built: Inductor's C++ toolchain (the compiler, flags
and on-disk cache Inductor uses for its own CPU kernels), and a loud answer where it fails.

Each kernel module keeps a cached `_kernel()` (load_kernel of its source) and a cached
`kernel_builds()` (builds(...)), so tests can swap `_kernel` for one that fails.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable


def load_kernel(argtypes: list[str], source: str):
    """The `kernel` function of `source` (C++ with Inductor's cpp_prefix.h), called with
    Python tensors and numbers in the order of `argtypes`."""
    from torch._inductor.codecache import CppPythonBindingsCodeCache

    return CppPythonBindingsCodeCache.load_pybinding(argtypes, source)


def builds(load: Callable[[], object], what: str, otherwise: str) -> bool:
    """Whether load() builds; a warning naming `what` and what runs `otherwise` if not."""
    try:
        load()
    except Exception as e:  # noqa: BLE001 - no compiler, or one without the ISA's targets
        warnings.warn(f"qcompile: the {what} did not build ({type(e).__name__}: {e}); "
                      f"{otherwise}", stacklevel=3)
        return False
    return True
