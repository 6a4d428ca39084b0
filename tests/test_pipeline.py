"""The pipeline table (qcompile/pipeline.py): every pass appears once, after what it
requires, and the table alone decides which passes a configuration runs."""

import pkgutil

import qcompile.passes
from qcompile.config import Options
from qcompile.pass_manager import PassContext, PassManager
from qcompile.pipeline import PIPELINE, steps


def test_every_pass_module_is_in_the_table_once():
    modules = {info.name for info in pkgutil.iter_modules(qcompile.passes.__path__)
               if not info.name.startswith("_")}  # _name: a helper of passes
    names = [s.name for s in PIPELINE]
    assert len(names) == len(set(names))
    assert {n.replace("-", "_") for n in names} == modules


def test_prerequisites_come_first_with_everything_on():
    opts = Options.from_user(None, {"recipe": "mixed", "budget": {"weight_bits": 5},
                                    "smooth": True, "integer_nonlinear": True, "rotate": True,
                                    "online_hadamard": True, "gptq": True,
                                    "bias_correction": True, "learn": True})
    everything = steps(opts)
    assert [s.name for s in everything] == [s.name for s in PIPELINE]
    PassManager([s.fn for s in everything], PassContext(opts))  # raises on a bad order


def test_conditions_pick_the_passes():
    def names(**kw):
        return [s.name for s in steps(Options.from_user(None, kw))]

    assert names(recipe="float") == ["freeze-params", "canonicalize-linear",
                                     "canonicalize-conv", "canonicalize-attention",
                                     "canonicalize-norm", "select-layers"]
    assert "fold-batchnorm" in names(recipe="w8a8")
    dynamic = names(recipe="w8a8")
    assert "insert-observers" not in dynamic and "calibrate-qparams" not in dynamic
    assert "analyze-structure" not in dynamic and dynamic[-2:] == ["lower", "measure-sqnr"]
    static = names(recipe="w8a8-static")
    assert static.index("insert-observers") < static.index("calibrate-qparams")
    assert "rotate-residual" in names(recipe="w4a8")
    assert "rotate-residual" not in names(recipe="w4a8", rotate=False)
    assert [(s.name, s.snapshot) for s in PIPELINE if s.snapshot] == [
        ("canonicalize-norm", "canonical_gm"), ("smooth-qparams", "float_gm")]
