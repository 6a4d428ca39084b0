"""One compiled model, several threads.

Calls from several threads each get their own input's result, bit for bit what a call
from one thread gives, while graphs compile, variants are chosen for several instances of
one module class, and first calls race. Calibration belongs to the thread that entered
`qcompile.calibrate`: a second thread entering it for the same model is refused, and a
call from another thread into a graph still waiting for calibration is refused rather than
mixed into the statistics.
"""

from __future__ import annotations

import threading

import pytest
import torch

import qcompile
from qcompile.calibration import CalibrationError
from tests.helpers import TinyMLP

THREADS = 4


def _run_threads(fn, n: int = THREADS, timeout: float = 60.0) -> list:
    """Run fn(i) in n threads released together by a barrier; returns each result, or
    the exception it raised."""
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def work(i):
        try:
            barrier.wait(timeout)
            results[i] = fn(i)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        assert not t.is_alive(), "a thread hung"
    return results


def _no_errors(results: list) -> list:
    errors = [r for r in results if isinstance(r, BaseException)]
    if errors:
        raise errors[0]
    return results


def _compiled(recipe: str, kernels: str, *, dynamic: bool | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = TinyMLP().eval()
    cm = torch.compile(model, backend="qcompile", dynamic=dynamic,
                       options={"recipe": recipe, "kernels": kernels})
    if recipe == "w8a8-static":
        with torch.no_grad(), qcompile.calibrate(cm):
            for _ in range(2):
                cm(torch.randn(4, 16) * 3)
    return cm


def _inputs(shapes) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(*shape, generator=gen) * (i + 1) for i, shape in enumerate(shapes)]


def _hammer(cm, xs, expected, iterations: int) -> None:
    def work(i):
        with torch.no_grad():
            for _ in range(iterations):
                y = cm(xs[i])
                if not torch.equal(y, expected[i]):
                    return f"thread {i}: max diff {(y - expected[i]).abs().max()}"
        return "ok"

    assert _no_errors(_run_threads(work)) == ["ok"] * THREADS


CONFIGS = [(r, k) for r in ("w8a8", "w8a8-static") for k in ("cpu", "reference")]


@pytest.mark.parametrize("recipe,kernels", CONFIGS)
def test_threads_get_their_own_results(recipe, kernels):
    cm = _compiled(recipe, kernels)
    xs = _inputs([(4, 16)] * THREADS)  # one shape, different contents per thread
    with torch.no_grad():
        expected = [cm(x) for x in xs]
    assert len({tuple(y.flatten().tolist()) for y in expected}) == THREADS
    _hammer(cm, xs, expected, iterations=20)


@pytest.mark.parametrize("recipe,kernels", [("w8a8", "cpu"), ("w8a8-static", "reference")])
def test_threads_with_other_shapes_under_dynamic_shapes(recipe, kernels):
    cm = _compiled(recipe, kernels, dynamic=True)
    xs = _inputs([(i + 1, 3 + i, 16) for i in range(THREADS)])
    with torch.no_grad():
        expected = [cm(x) for x in xs]
    _hammer(cm, xs, expected, iterations=20)


@pytest.mark.parametrize("kernels", ["cpu", "reference"])
def test_first_calls_from_several_threads_compile_safely(kernels):
    torch.manual_seed(0)
    model = TinyMLP().eval()
    cm = torch.compile(model, backend="qcompile", options={"recipe": "w8a8", "kernels": kernels})
    xs = _inputs([(4, 16)] * THREADS)

    def first(i):
        with torch.no_grad():
            return cm(xs[i])

    outs = _no_errors(_run_threads(first))
    with torch.no_grad():
        for x, y in zip(xs, outs):
            assert torch.equal(cm(x), y)
    report = qcompile.report(cm)
    assert [layer.name for layer in report.layers] == ["fc1", "fc2"]
    assert all(layer.quantized for layer in report.layers)


def test_instances_of_one_class_in_threads_get_their_own_weights():
    """Dynamo shares one compiled graph between instances of a module class; the graph
    keeps a variant per instance and picks one per call, from every thread at once."""
    models = [_compiled("w8a8", "cpu", seed=s) for s in range(2)]
    xs = _inputs([(4, 16)] * THREADS)
    with torch.no_grad():
        expected = [models[i % 2](x) for i, x in enumerate(xs)]

    def work(i):
        with torch.no_grad():
            for _ in range(20):
                y = models[i % 2](xs[i])
                if not torch.equal(y, expected[i]):
                    return f"thread {i} got another instance's result"
        return "ok"

    assert _no_errors(_run_threads(work)) == ["ok"] * THREADS


def test_variants_evicted_and_rebuilt_in_threads(monkeypatch):
    """More instances than variants kept: threads evict and rebuild each other's variants.
    Builds of one graph take turns (its variants share one fake tensor mode): a slowed
    build shows whether two ever overlap."""
    import time

    import qcompile.artifact as artifact

    monkeypatch.setattr(artifact, "MAX_VARIANTS", 1)
    models = [_compiled("w8a8", "cpu", seed=s) for s in range(2)]
    xs = _inputs([(4, 16)] * THREADS)
    with torch.no_grad():
        expected = [models[i % 2](x) for i, x in enumerate(xs)]
    building, most = [0], [0]
    init = artifact.GraphVariant.__init__

    def slow_init(self, *args, **kwargs):
        building[0] += 1
        most[0] = max(most[0], building[0])
        time.sleep(0.02)
        try:
            init(self, *args, **kwargs)
        finally:
            building[0] -= 1

    monkeypatch.setattr(artifact.GraphVariant, "__init__", slow_init)

    def work(i):
        with torch.no_grad():
            for _ in range(3):
                if not torch.equal(models[i % 2](xs[i]), expected[i]):
                    return f"thread {i} got another instance's result"
        return "ok"

    assert _no_errors(_run_threads(work)) == ["ok"] * THREADS
    assert most[0] == 1


# ---------------------------------------------------------------------- calibration


def _static(seed: int = 0):
    torch.manual_seed(seed)
    return torch.compile(TinyMLP().eval(), backend="qcompile",
                         options={"recipe": "w8a8-static", "kernels": "cpu"})


def _enter_from_two_threads(cm) -> list[str]:
    tried = threading.Barrier(2)  # passed once both threads have tried to enter

    def enter(i):
        try:
            with qcompile.calibrate(cm):
                tried.wait(10)
                with torch.no_grad():
                    cm(torch.randn(4, 16))
            return "calibrated"
        except CalibrationError as exc:
            tried.wait(10)
            return str(exc)

    return _no_errors(_run_threads(enter, n=2))


def test_calibrate_entered_in_two_threads_at_once_admits_one():
    for round_ in range(3):
        cm = _static(round_)
        results = sorted(_enter_from_two_threads(cm), key=len)
        assert results[0] == "calibrated", results
        assert "another thread" in results[1] and "qcompile.calibrate" in results[1], results
        with torch.no_grad():
            assert cm(torch.randn(4, 16)).shape == (4, 16)  # calibrated once, finalized


def test_nesting_in_one_thread_is_still_refused():
    cm = _static()
    with qcompile.calibrate(cm):
        with pytest.raises(CalibrationError, match="do not nest"):
            with qcompile.calibrate(cm):
                pass
        with torch.no_grad():
            cm(torch.randn(4, 16))


def _calibrated_alone(batches):
    cm = _static()
    with torch.no_grad(), qcompile.calibrate(cm):
        for x in batches:
            cm(x)
    return cm


def test_calls_from_another_thread_during_calibration_are_refused_not_observed():
    torch.manual_seed(3)
    batches = [torch.randn(4, 16) for _ in range(3)]
    outlier = torch.randn(4, 16) * 1000  # would widen every range if it were observed
    probe = torch.randn(4, 16)
    cm = _static()
    other: list = []

    def another_thread():
        try:
            with torch.no_grad():
                other.append(cm(outlier))
        except BaseException as exc:  # noqa: BLE001
            other.append(exc)

    with torch.no_grad(), qcompile.calibrate(cm):
        cm(batches[0])
        t = threading.Thread(target=another_thread)
        t.start()
        t.join(60)
        for x in batches[1:]:
            cm(x)
    (err,) = other
    assert isinstance(err, CalibrationError), err
    assert "another thread" in str(err) and "qcompile.calibrate" in str(err)
    alone = _calibrated_alone(batches)
    with torch.no_grad():
        expected = alone(probe)
        assert torch.equal(cm(probe), expected)  # the same statistics: no outlier

    def after(i):  # after the block, every thread runs the calibrated model
        with torch.no_grad():
            return torch.equal(cm(probe), expected)

    assert _no_errors(_run_threads(after, n=2)) == [True, True]


def test_finalized_graphs_run_in_other_threads_during_calibration_and_do_not_count():
    """Another thread's calls to graphs that need nothing (here the model compiled with a
    dynamic recipe) run as usual while a block is open, and are no batch of that block."""
    torch.manual_seed(0)
    model = TinyMLP().eval()
    static = torch.compile(model, backend="qcompile",
                           options={"recipe": "w8a8-static", "kernels": "cpu"})
    dynamic = torch.compile(model, backend="qcompile", options={"recipe": "w8a8",
                                                                "kernels": "cpu"})
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = dynamic(x)
    results: list = []

    def serve():
        with torch.no_grad():
            results.append(torch.equal(dynamic(x), expected))

    with pytest.raises(CalibrationError, match="no batch ran"):
        with qcompile.calibrate(static):
            t = threading.Thread(target=serve)
            t.start()
            t.join(60)
    assert results == [True]


def test_a_call_while_another_thread_finalizes_waits_for_it(monkeypatch):
    """Right after a block, the calibrating thread finalizes the graphs; a call from
    another thread meanwhile waits for that (it is calibrated) instead of failing."""
    import time

    import qcompile.artifact as artifact

    cm = _static()
    x = torch.randn(4, 16)
    started = threading.Event()
    finalize = artifact.GraphVariant._finalize

    def slow_finalize(self):
        if not self.finalized:
            started.set()
            time.sleep(0.2)
        finalize(self)

    monkeypatch.setattr(artifact.GraphVariant, "_finalize", slow_finalize)
    got: list = []

    def call_meanwhile():
        started.wait(30)
        try:
            with torch.no_grad():
                got.append(cm(x))
        except BaseException as exc:  # noqa: BLE001
            got.append(exc)

    t = threading.Thread(target=call_meanwhile)
    t.start()
    with torch.no_grad(), qcompile.calibrate(cm):
        cm(torch.randn(4, 16))
    t.join(60)
    (y,) = got
    assert isinstance(y, torch.Tensor), y
    with torch.no_grad():
        assert torch.equal(y, cm(x))
