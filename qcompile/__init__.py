"""qcompile: a quantizing compiler for PyTorch (`torch.compile(model, backend="qcompile")`)."""

__version__ = "0.1.0"
