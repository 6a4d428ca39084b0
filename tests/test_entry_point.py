"""backend="qcompile" resolves in a fresh interpreter without `import qcompile`."""

import subprocess
import sys
import textwrap


def test_backend_name_resolves_without_import():
    code = textwrap.dedent("""
        import sys, torch
        m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
        cm = torch.compile(m, backend="qcompile", options={"recipe": "float"})
        x = torch.randn(2, 8)
        with torch.no_grad():
            assert torch.equal(cm(x), m(x))
        assert "qcompile" in sys.modules  # loaded through the entry point
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK" in out.stdout
