"""qcompile.save / qcompile.load: a calibrated model's quantization, saved and loaded into a
fresh compile of the same weights, runs the same integers (bit-identical outputs) without
any calibration batch, on every recipe and after a recompile for a new shape; a file that
does not belong to the model is a clear error saying what differs."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import qcompile
from qcompile.serialize import ArtifactMismatchError
from qcompile.state import state_for_model
from tests.models.zoo import MODELS

# w8a8-static exercises every saved piece (sites and weights); the others run in the full
# suite only ("w4a8 g16": group-wise int4 weights with their row scales)
RECIPES = [pytest.param(r, marks=[] if r == "w8a8-static" else [pytest.mark.slow])
           for r in ("w8a8", "w8a8-static", "w4a16", "w4a8", "w4a4", "w4a8 g16")]


def _compiled(name, options, seed=0):
    build, make, key = MODELS[name]
    torch.manual_seed(seed)
    model = build().eval()
    torch._dynamo.reset()
    return torch.compile(model, backend="qcompile", options=options, dynamic=True), make, key


def _calibrated(name, options):
    cm, make, key = _compiled(name, options)
    if qcompile.Options.from_user(None, options).needs_calibration:
        with torch.no_grad(), qcompile.calibrate(cm):
            for seq in (8, 9, 10):
                cm(*make(2, seq))
    return cm, make, key


def _outputs(cm, make, key):
    torch.manual_seed(1)  # the same inputs for both models
    with torch.no_grad():  # two shapes: the second recompiles (a new sequence length)
        outs = [cm(*make(b, s)) for b, s in ((3, 11), (1, 5))]
    return outs if key is None else [getattr(out, key) for out in outs]


@pytest.mark.parametrize("recipe", RECIPES)
def test_round_trip_is_bit_identical(tmp_path, recipe):
    recipe, _, group = recipe.partition(" g")
    options = {"recipe": recipe, **({"group_size": int(group)} if group else {})}
    cm, make, key = _calibrated("llama", options)
    want = _outputs(cm, make, key)
    path = qcompile.save(cm, tmp_path / "llama.qc.safetensors")
    fresh, _, _ = _compiled("llama", options)  # the same weights, another instance
    loaded = qcompile.load(fresh, path)
    assert loaded.weights and (loaded.sites or recipe in ("w8a8", "w4a16"))
    got = _outputs(fresh, make, key)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)
    graphs = [a for a in state_for_model(fresh).artifacts if a.finalized]
    assert len(graphs) >= 2  # the recompile for the new shape finalized from the file too
    assert all(a.ctx.counters.get("quantize-weights.loaded") for a in graphs)
    assert not any(a.ctx.counters.get("quantize-weights.gptq") for a in graphs)


# every other architecture of the model matrix, each with a transform that puts more in the
# file (smoothing vectors, integer nonlinearities, rotations)
OTHERS = {"mistral": {"rotate": True}, "qwen2": {"smooth": True}, "gpt2": {"smooth": True},
          "opt": {"smooth": True}, "bert": {"smooth": True, "integer_nonlinear": True},
          "vit": {}, "cnn": {}}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(OTHERS))
def test_round_trip_on_other_architectures_with_transforms(tmp_path, name):
    options = {"recipe": "w8a8-static", **OTHERS[name]}
    cm, make, key = _calibrated(name, options)
    want = _outputs(cm, make, key)
    path = qcompile.save(cm, tmp_path / "m.qc.safetensors")
    fresh, _, _ = _compiled(name, options)
    qcompile.load(fresh, path)
    for a, b in zip(want, _outputs(fresh, make, key), strict=True):
        assert torch.equal(a, b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A calibrated w8a8-static LLaMA-shaped model's file, with its outputs."""
    options = {"recipe": "w8a8-static"}
    cm, make, key = _calibrated("llama", options)
    want = _outputs(cm, make, key)
    path = qcompile.save(cm, tmp_path_factory.mktemp("saved") / "m.qc.safetensors")
    return path, options, want


def test_the_file_holds_tensors_and_json_only(saved):
    path, _, _ = saved
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["qcompile"])
        names = list(f.keys())
    assert meta["format"] == "qcompile-quantized" and meta["version"] == 2
    # per layer, one entry per set of weight transforms its graphs quantized it under
    assert all(isinstance(v, list) and v and "transforms" in v[0] for v in meta["layers"].values())
    assert meta["recipe"] == "w8a8-static" and meta["sites"] and meta["layers"]
    assert all(len(v) == 3 for v in meta["fingerprint"].values())  # shape, dtype, sha256
    assert any(n.endswith("/qweight") for n in names)


@pytest.mark.slow  # a second interpreter importing torch and compiling: 15-20 s
def test_loading_in_another_process(saved, tmp_path):
    path, options, want = saved
    torch.save(want[0], tmp_path / "want.pt")
    script = f"""
import torch, qcompile
from tests.models.zoo import MODELS
build, make, key = MODELS["llama"]
torch.manual_seed(0)
cm = torch.compile(build().eval(), backend="qcompile", options={options!r}, dynamic=True)
qcompile.load(cm, {str(path)!r})
torch.manual_seed(1)
with torch.no_grad():
    got = getattr(cm(*make(3, 11)), key)
assert torch.equal(got, torch.load({str(tmp_path / 'want.pt')!r})), "outputs differ"
print("same")
"""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=600, cwd=root, env=env)
    assert out.returncode == 0 and "same" in out.stdout, out.stderr[-2000:]


def test_other_weights_are_refused(saved):
    path, options, _ = saved
    fresh, _, _ = _compiled("llama", options, seed=1)  # same architecture, other weights
    with pytest.raises(ArtifactMismatchError, match="other weights"):
        qcompile.load(fresh, path)


def test_other_architecture_and_options_are_refused(saved):
    path, options, _ = saved
    other, _, _ = _compiled("bert", options)
    with pytest.raises(ArtifactMismatchError, match="other architecture"):
        qcompile.load(other, path)
    fresh, _, _ = _compiled("llama", {"recipe": "w8a8-static", "smooth": True})
    with pytest.raises(ArtifactMismatchError, match="compile it with the saved options"):
        qcompile.load(fresh, path)
    build, _, _ = MODELS["llama"]
    with pytest.raises(ArtifactMismatchError, match="takes the model torch.compile"):
        qcompile.load(build().eval(), path)


def test_newer_format_and_foreign_files_are_refused(saved, tmp_path):
    path, options, _ = saved
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["qcompile"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta["version"] = 99
    newer = str(tmp_path / "newer.safetensors")
    save_file(tensors, newer, metadata={"qcompile": json.dumps(meta)})
    fresh, _, _ = _compiled("llama", options)
    with pytest.raises(ArtifactMismatchError, match="newer qcompile"):
        qcompile.load(fresh, newer)
    meta["version"] = 1  # one weight per layer, whatever the transforms: not read
    older = str(tmp_path / "older.safetensors")
    save_file(tensors, older, metadata={"qcompile": json.dumps(meta)})
    with pytest.raises(ArtifactMismatchError, match="format version 1.*save the model again"):
        qcompile.load(fresh, older)
    foreign = str(tmp_path / "foreign.safetensors")
    save_file({"w": torch.zeros(2)}, foreign)
    with pytest.raises(ArtifactMismatchError, match="not a qcompile quantization"):
        qcompile.load(fresh, foreign)


def test_save_before_running_and_load_after_running_are_refused(saved, tmp_path):
    _, options, _ = saved
    fresh, make, key = _compiled("llama", options)
    with pytest.raises(RuntimeError, match="nothing to save yet"):
        qcompile.save(fresh, tmp_path / "early.safetensors")
    dynamic, make, key = _compiled("llama", {"recipe": "w8a8"})
    _outputs(dynamic, make, key)
    with pytest.raises(RuntimeError, match="already ran quantized"):
        qcompile.load(dynamic, qcompile.save(dynamic, tmp_path / "dyn.safetensors"))


def test_export_round_trips_through_torch_export(saved, tmp_path):
    path, options, _ = saved
    cm, make, key = _compiled("llama", options)
    qcompile.load(cm, path)
    torch.manual_seed(1)
    with torch.no_grad():
        cm(*make(3, 11))
    ep = qcompile.export(cm)
    calls = [n for n in ep.graph.nodes if str(n.target).startswith("qcompile.")]
    assert calls and all(n.kwargs.get("impl", "") == "" for n in calls)  # portable
    torch.export.save(ep, tmp_path / "m.pt2")
    program = torch.export.load(tmp_path / "m.pt2").module()
    (variant,) = [a for a in state_for_model(cm).artifacts if a.finalized]
    n_inputs = len([n for n in ep.graph.nodes if n.op == "placeholder"
                    and n.name in ep.graph_signature.user_inputs])
    tensors = [x for x in variant.sample if isinstance(x, torch.Tensor) and x.dim()][:n_inputs]
    with torch.no_grad():
        want = variant.gm(*variant.sample)
        got = program(*tensors)
    for a, b in zip(want, got, strict=True):
        assert torch.equal(a, b)


def test_graphs_that_transform_a_layer_differently_each_load_their_own_weight(saved):
    """Two graphs of one model may transform a layer differently (all-MiniLM's first graph,
    traced at static shapes, left layer 0's heads unrotated; the dynamic one rotated them):
    each saved weight is valid only under its graph's transforms. One weight per layer
    was saved once, and a loaded graph ran rotated activations against unrotated integers:
    outputs differed, silently."""
    from qcompile.serialize import Loaded

    path, options, _ = saved
    fresh, _, _ = _compiled("llama", options)
    loaded = qcompile.load(fresh, path)
    name, variants = next(iter(loaded.weights.items()))
    (transforms, weight), = variants.items()
    assert loaded.weight(name, transforms) is weight
    assert loaded.weight("no.such.layer", transforms) is None
    other = ("rotate-heads(v)",) if transforms != ("rotate-heads(v)",) else ()
    with pytest.raises(ArtifactMismatchError, match=(
            rf"layer {name} was saved with weight transforms .* but this graph applies "
            rf"\[.*\]: its saved integers do not fit this graph")):
        loaded.weight(name, other)
    assert isinstance(loaded, Loaded)
