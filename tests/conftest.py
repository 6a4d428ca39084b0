import os

# The Triton interpreter must be chosen before triton is imported anywhere; without a GPU
# every kernel test runs in it.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Every compile in the tests runs the stage verifier after every pass.
os.environ.setdefault("QCOMPILE_VERIFY", "1")
# The test models are far too small for an int8 GEMM to beat float32 on a CPU, so
# kernels="auto" would keep them float: the suite asks for the CPU integer path itself
# (tests of "auto" pass it explicitly).
os.environ.setdefault("QCOMPILE_KERNELS", "cpu")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries (or recompile limits) carry over."""
    import torch._dynamo

    torch._dynamo.reset()
    yield
