"""Generated kernel files: a damaged file is never imported but regenerated (with one
warning), a directory others can write is refused, concurrent processes keep the file
whole and every origin they record, and the directory is checked once per process.

Kernels run in the Triton interpreter without a GPU (tests/conftest.py).
"""

import os

import pytest
import torch

from qcompile.lowering import cache_dir, codegen
from qcompile.lowering import device as qdevice
from qcompile.lowering.autotune import GemmConfig
from qcompile.lowering.cache_dir import CacheWarning, UnsafeCacheDirError
from qcompile.lowering.codegen import generated_source, kernel_path, load_kernel
from qcompile.lowering.epilogue import Bias, Epilogue, Requantize
from qcompile.lowering.gemm import gemm_int8
from qcompile.lowering.reference import gemm_int8_ref, random_operands
from tests.helpers import run_together

pytestmark = pytest.mark.skipif(
    qdevice.triton_target() == "none", reason="needs CUDA or TRITON_INTERPRET=1"
)
EP = Epilogue((Bias(), Requantize()))


def cache_warnings(recwarn):
    return [str(w.message) for w in recwarn.list if w.category is CacheWarning]


def ignoring(path, problem):
    return f"qcompile: ignoring the generated kernel {path}: {problem}; it will be rebuilt"


def computes_exactly(kdir):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    a, w, vals = random_operands(EP, 5, 24, 40, seed=3, device=dev)
    got = gemm_int8(a, w, EP, **vals, config=GemmConfig(16, 16, 16, 2), kernel_cache_dir=kdir)
    return torch.equal(got, gemm_int8_ref(a, w, EP, **vals))


def _edited_body(text):
    return text.replace("out_dtype=tl.int32", "out_dtype=tl.int16")


def _extra_first_line(text):
    return "import os  # not ours\n" + text


_DAMAGE = {
    "edited body": (
        _edited_body, "it differs from the source the template generates (edited or truncated)"
    ),
    "truncated": (
        lambda text: text[: len(text) // 2],
        "it differs from the source the template generates (edited or truncated)",
    ),
    "empty": (lambda text: "", "it does not start with the generated header (edited or "
                               "truncated)"),
    "line added on top": (
        _extra_first_line, "it does not start with the generated header (edited or truncated)"
    ),
}


@pytest.mark.parametrize("damage", list(_DAMAGE))
def test_damaged_file_is_regenerated_not_imported(tmp_path, recwarn, damage):
    edit, problem = _DAMAGE[damage]
    path = kernel_path(EP, tmp_path.resolve())
    path.write_text(edit(generated_source(EP, origin="old.node")))
    spec = load_kernel(EP, origin="model.fc1", cache_dir=tmp_path)
    assert spec.path == path
    assert path.read_text() == generated_source(EP, origin="model.fc1")
    assert cache_warnings(recwarn) == [ignoring(path, problem)]
    assert computes_exactly(tmp_path)


def test_lines_after_the_kernel_must_be_origin_records(tmp_path, recwarn):
    # It would not even import: the body is intact, so only the strict check catches it.
    path = kernel_path(EP, tmp_path.resolve())
    source = generated_source(EP, origin="old.node")
    path.write_text(source + "# also serves: model.fc0\nthis is not python(\n")
    load_kernel(EP, origin="model.fc1", cache_dir=tmp_path)
    line = source.count("\n") + 2
    assert cache_warnings(recwarn) == [ignoring(
        path, f"line {line} after the kernel is not an '# also serves:' record: "
              "'this is not python(\\n'"
    )]
    assert path.read_text() == generated_source(EP, origin="model.fc1")


def test_directory_in_place_of_the_file_is_replaced(tmp_path, recwarn):
    path = kernel_path(EP, tmp_path.resolve())
    (path / "__pycache__").mkdir(parents=True)
    load_kernel(EP, origin="model.fc1", cache_dir=tmp_path)
    assert cache_warnings(recwarn) == [ignoring(path, "it is a directory, not a file")]
    assert path.read_text() == generated_source(EP, origin="model.fc1")
    assert computes_exactly(tmp_path)


def test_intact_file_from_another_process_is_kept(tmp_path, recwarn):
    path = kernel_path(EP, tmp_path.resolve())
    earlier = generated_source(EP, origin="other.fc1") + "# also serves: other.fc2\n"
    path.write_text(earlier)
    load_kernel(EP, origin="model.fc1", cache_dir=tmp_path)
    load_kernel(EP, origin="other.fc2", cache_dir=tmp_path)  # already named in the file
    assert cache_warnings(recwarn) == []
    assert path.read_text() == earlier + "# also serves: model.fc1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", path.name]


def test_template_that_does_not_import_is_a_loud_error(tmp_path, monkeypatch):
    monkeypatch.setattr(codegen, "_body",
                        lambda ep, template=codegen.GEMM: "\ndef gemm_int8_kernel(:\n")
    with pytest.raises(RuntimeError, match=(
        r"the generated kernel .*gemm_int8_bias_requant_.*\.py matches its template but does "
        r"not import \(SyntaxError: .*\): the template in qcompile/lowering/kernels/gemm_int8.py "
        r"is broken"
    )):
        load_kernel(EP, cache_dir=tmp_path)


def test_directory_others_can_write_is_refused_before_anything_runs(tmp_path):
    kdir = tmp_path / "kernels"
    kdir.mkdir()
    kdir.chmod(0o777)
    with pytest.raises(UnsafeCacheDirError) as e:
        load_kernel(EP, origin="model.fc1", cache_dir=kdir)
    assert str(e.value) == (
        f"qcompile refuses the kernel cache directory {kdir}: it is writable by group and "
        "others (mode 0777). What qcompile keeps there decides the code it runs as you, so no "
        f"other user may be able to write there. Fix: chmod go-w {kdir}; or choose another "
        "directory: kernel_cache_dir= (gemm_int8, load_kernel), --cache DIR (python -m "
        "qcompile.lowering.autotune)."
    )
    assert list(kdir.iterdir()) == []


def test_new_kernel_directory_is_private(tmp_path):
    load_kernel(EP, cache_dir=tmp_path / "a" / "kernels")
    for d in (tmp_path / "a", tmp_path / "a" / "kernels"):
        assert os.stat(d).st_mode & 0o777 == 0o700


def test_directory_checked_once_per_process_not_per_call(tmp_path, monkeypatch):
    calls = []
    real_stat = cache_dir._stat
    monkeypatch.setattr(cache_dir, "_stat", lambda p: calls.append(p) or real_stat(p))
    kdir = tmp_path / "kernels"
    load_kernel(EP, origin="model.fc1", cache_dir=kdir)
    first = len(calls)
    assert first == len(kdir.resolve().parts)  # the directory and each parent, once
    for origin in ("model.fc1", "model.fc2", "model.fc3"):
        load_kernel(EP, origin=origin, cache_dir=kdir)
    load_kernel(Epilogue((Bias(),)), cache_dir=str(kdir))
    assert computes_exactly(kdir)  # a GEMM call loads its kernel too
    assert len(calls) == first


LOADER = """
import sys, time
from pathlib import Path
from qcompile.lowering import codegen
from qcompile.lowering.epilogue import Bias, Epilogue, Requantize

folder, me, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
ep = Epilogue((Bias(), Requantize()))
(folder / f"ready{me}").touch()
deadline = time.time() + 120
while not (folder / "go").exists():  # start together, so the writes overlap
    assert time.time() < deadline, "never told to go"
    time.sleep(0.005)
for j in range(count):
    spec = codegen.load_kernel(ep, origin=f"proc{me}.fc{j}", cache_dir=folder / "kernels")
    problem = codegen._source_problem(spec.path.read_text(), ep)  # always a whole file
    assert problem is None, problem
print("ok")
"""


def test_concurrent_processes_keep_the_file_whole_and_every_origin(tmp_path):
    procs, count = 4, 10
    run_together(LOADER, tmp_path, procs, count, timeout=180)
    path = kernel_path(EP, (tmp_path / "kernels").resolve())
    text = path.read_text()
    assert codegen._source_problem(text, EP) is None
    every = {f"proc{i}.fc{j}" for i in range(procs) for j in range(count)}
    assert codegen._origins_in(text) == every
    assert len(text.splitlines()) == len(generated_source(EP).splitlines()) + len(every) - 1
    assert sorted(p.name for p in path.parent.iterdir()) == [".lock", path.name]
