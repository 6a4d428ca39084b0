"""The torch.compile entry: `torch.compile(model, backend="qcompile", options={...})`.

Registered through the `torch_dynamo_backends` entry-point group (pyproject.toml), so the
name resolves without `import qcompile`. torch.compile passes `mode=` and `options=` as
keyword arguments; both are validated here, before any work.
"""

from __future__ import annotations

from typing import Any

from torch.fx import GraphModule

from qcompile.artifact import CompiledArtifact
from qcompile.config import Options


def qcompile_backend(gm: GraphModule, example_inputs: list, *, mode: str | None = None,
                     options: dict[str, Any] | None = None, **unexpected: Any):
    if unexpected:
        raise TypeError(f"qcompile backend got unexpected arguments {sorted(unexpected)}; "
                        "pass settings as options={...}")
    return CompiledArtifact(gm, example_inputs, Options.from_user(mode, options))
