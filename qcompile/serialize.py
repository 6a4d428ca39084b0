"""Quantize once, load anywhere: a calibrated model's quantization as a safetensors file.

    qcompile.save(compiled_model, "model.qc.safetensors")      # after calibration
    cm = torch.compile(model, backend="qcompile", options=same_options)
    qcompile.load(cm, "model.qc.safetensors")                   # no calibration batch
    y = cm(x)                                                   # the same integers
    ep = qcompile.export(cm)                  # the quantized graph as a torch.export program

What is saved: everything the finalize phase derives from data, so loading needs none:
every calibrated site's activation parameters (scale, zero point, per-channel ranges, means
and rounding errors, and the shift and scale smooth chose for the linears reading it; the
sites are named after parameter paths, so every graph and every recompile finds them),
every quantized layer's weight (int8 values with their scales and spec: round-to-nearest
or GPTQ, after the transforms), the options that made them, a fingerprint of every float
weight (name, shape, dtype, sha256), and a format version.
Tensors go in the safetensors body, the rest as JSON in its header metadata: loading never
unpickles anything.
What is not saved: kernels. A loaded model is lowered on the machine that loads it (its
CPU route or Triton), since the artifact holds integers; the data-free transforms
(rotations from options["seed"], norm folding, online Hadamards) are recomputed exactly.

Loading checks what it is loaded into: the options must be the saved ones (a recipe or a
transform that differs would need other parameters), the model's parameters must be the
saved ones (names, shapes, values, by fingerprint), and the format must be one this
version reads; each mismatch is an error that says what differs.

Pre (save): the model ran, and calibration finished if its recipe needs it. Post (load):
the model's state holds the parameters; its graphs, compiled at their first call, finalize
at once with them (bit-identical integers to the saved model's on the same machine kind).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx import GraphModule

FORMAT = "qcompile-quantized"
FORMAT_VERSION = 2
_META_KEY = "qcompile"


class ArtifactMismatchError(ValueError):
    """The saved quantization does not belong to the model (or options) it is loaded into."""


@dataclass
class Loaded:
    """What `load` puts in a ModelState: read by calibrate-qparams (sites), quantize-weights
    and select-layers (weights)."""

    sites: dict[str, Any] = field(default_factory=dict)  # site -> CalibSite
    # layer -> {weight transforms (annotations.weight_transforms) -> QuantizedWeight}: two
    # graphs of one model may transform a layer differently (a structure one recognizes
    # and the other does not), and each saved weight is valid only under its own
    weights: dict[str, dict[tuple, Any]] = field(default_factory=dict)
    path: str = ""

    def weight(self, layer: str, transforms: tuple[str, ...]):
        """The saved weight of `layer` made under `transforms`; None when the layer is not
        in the file; an error when it is, but only under other transforms."""
        variants = self.weights.get(layer)
        if not variants:
            return None
        if transforms in variants:
            return variants[transforms]
        raise ArtifactMismatchError(
            f"{self.path}: layer {layer} was saved with weight transforms "
            f"{[list(t) for t in variants]}, but this graph applies {list(transforms)}: "
            "its saved integers do not fit this graph. Save from a model that ran this "
            "graph (the same shapes and options), or compile without loading")


# ---------------------------------------------------------------------- fingerprints


def _named_tensors(model) -> dict[str, torch.Tensor]:
    from qcompile.state import model_tensors

    module = getattr(model, "_orig_mod", model)
    named = dict(module.named_parameters())
    named.update(dict(module.named_buffers()))
    if not named:
        model_tensors(model)  # raises the usual error for a non-module
    return named


def _digest(t: torch.Tensor) -> str:
    data = t.detach().cpu().contiguous()
    if data.dtype == torch.bfloat16:  # numpy has no bfloat16: hash the bits
        data = data.view(torch.int16)
    return hashlib.sha256(data.numpy().tobytes()).hexdigest()


def fingerprint(model) -> dict[str, list]:
    """name -> [shape, dtype, sha256] of every parameter and buffer of the float model."""
    return {name: [list(t.shape), str(t.dtype).removeprefix("torch."), _digest(t)]
            for name, t in sorted(_named_tensors(model).items())}


def _compare(saved: dict, actual: dict) -> list[str]:
    missing = sorted(set(saved) - set(actual))
    extra = sorted(set(actual) - set(saved))
    problems = []
    if missing or extra:
        problems.append(f"other architecture: parameters missing {missing[:5]}, unexpected "
                        f"{extra[:5]}")
    shapes = [n for n in sorted(set(saved) & set(actual)) if saved[n][:2] != actual[n][:2]]
    if shapes:
        n = shapes[0]
        problems.append(f"other shapes or dtypes: {shapes[:5]} (e.g. {n}: saved "
                        f"{saved[n][:2]}, model {actual[n][:2]})")
    values = [n for n in sorted(set(saved) & set(actual))
              if saved[n][:2] == actual[n][:2] and saved[n][2] != actual[n][2]]
    if values:
        problems.append(f"other weights: {len(values)} tensor(s) differ, e.g. {values[:5]}")
    return problems


def path_arg(fn: str, path, *, exists: str | None = None) -> str:
    """path as a str; refused: not a str or os.PathLike, or (exists="file" / "directory")
    not an existing one of those."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{fn}: path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    found = {"file": os.path.isfile, "directory": os.path.isdir}.get(exists, lambda _: True)
    if not found(path):
        raise FileNotFoundError(f"{fn}: path {path!r} is not an existing {exists}")
    return path


# ---------------------------------------------------------------------- save


def _state_and_fingerprint(model):
    from qcompile.state import compile_fingerprint, state_for_model

    state = state_for_model(model)
    options_fp = compile_fingerprint(model)
    artifacts = [a for a in state.artifacts
                 if options_fp is None or a.options.fingerprint() == options_fp]
    return state, artifacts


def save(model, path: str | os.PathLike) -> str:
    """Write the quantization of a compiled, calibrated model to `path` (safetensors)."""
    import safetensors.torch

    from qcompile import annotations as ann

    state, artifacts = _state_and_fingerprint(model)
    path = path_arg("qcompile.save", path)
    finalized = [a for a in artifacts if a.finalized]
    if not finalized:
        raise RuntimeError(
            "qcompile.save: nothing to save yet: run the compiled model once (and calibrate "
            "it, for a recipe that needs calibration) before saving")
    options = finalized[0].options
    tensors: dict[str, torch.Tensor] = {}
    sites, layers = {}, {}
    for art in finalized:
        for name, site in art.ctx.analysis.get("calib", {}).items():
            entry = {"scale": site.scale, "zero_point": site.zero_point, "seen": site.seen,
                     "absmax": site.absmax, "bits": site.bits}
            if site.channel_range is not None:
                lo, hi = site.channel_range
                tensors[f"site/{name}/lo"], tensors[f"site/{name}/hi"] = lo.float(), hi.float()
                entry["channel_range"] = True
            for key in ("mean", "act_error"):  # bias correction's statistics
                if getattr(site, key) is not None:
                    tensors[f"site/{name}/{key}"] = getattr(site, key).double()
                    entry[key] = True
            # smooth's choice (measured on rows not saved) and learn-transforms'
            for key in ("migration", "learned"):
                m = getattr(site, key)
                if m is None and sites.get(name, {}).get(key):
                    entry[key] = sites[name][key]  # a graph that measured it
                elif m is not None:
                    entry[key] = m.label
                    tensors[f"site/{name}/{key}_scale"] = m.scale.double()
                    if m.shift is not None:
                        tensors[f"site/{name}/{key}_shift"] = m.shift.double()
            sites[name] = entry
        for node in art.gm.graph.nodes:
            layer = ann.get(node, ann.Layer)
            if layer is None or layer.qweight is None:
                continue
            variants = layers.setdefault(layer.name, [])
            if any(v["transforms"] == list(layer.qweight_transforms) for v in variants):
                continue
            qw, i = layer.qweight, len(variants)
            spec = qw.spec
            variants.append({"transforms": list(layer.qweight_transforms), "bits": spec.bits,
                             "symmetric": spec.symmetric, "granularity": spec.granularity,
                             "group_size": spec.group_size, "axis": spec.axis,
                             "group_levels": spec.group_levels})
            for key in ("qweight", "scale", "zero_point", "row_scale"):
                if getattr(qw, key) is not None:
                    tensors[f"layer/{layer.name}/{i}/{key}"] = getattr(qw, key).detach().cpu()
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "options": options.fingerprint(),
        "recipe": options.recipe, "sites": sites, "layers": layers,
        "fingerprint": fingerprint(model),
    }
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    safetensors.torch.save_file(tensors, path, metadata={_META_KEY: json.dumps(meta)})
    return path


# ---------------------------------------------------------------------- load


def read(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a saved file, the format checked."""
    from safetensors import safe_open

    path = os.fspath(path)
    with safe_open(path, framework="pt") as f:
        raw = (f.metadata() or {}).get(_META_KEY)
        if raw is None:
            raise ArtifactMismatchError(f"{path} is not a qcompile quantization (no "
                                        f"{_META_KEY!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    meta = json.loads(raw)
    if meta.get("format") != FORMAT:
        raise ArtifactMismatchError(f"{path}: format {meta.get('format')!r}, not {FORMAT!r}")
    if meta.get("version", 0) < FORMAT_VERSION:
        raise ArtifactMismatchError(
            f"{path} is format version {meta.get('version')}, which held one weight per "
            f"layer whatever its graph's transforms; this qcompile reads version "
            f"{FORMAT_VERSION}: save the model again")
    if meta.get("version", 0) > FORMAT_VERSION:
        raise ArtifactMismatchError(
            f"{path} was written by a newer qcompile (format version {meta['version']}; "
            f"this one reads up to {FORMAT_VERSION}): upgrade qcompile to load it")
    return meta, tensors


def load(model, path: str | os.PathLike) -> Loaded:
    """Give a model compiled with qcompile the quantization saved at `path`: its graphs
    finalize with it at their first call, without calibration."""
    from qcompile.numerics.specs import QuantSpec
    from qcompile.numerics.weights import QuantizedWeight
    from qcompile.passes._migration import Migration
    from qcompile.passes.calibrate_qparams import CalibSite
    from qcompile.state import compile_fingerprint, state_for_model

    compiled = compile_fingerprint(model)
    if compiled is None:
        raise ArtifactMismatchError(
            'qcompile.load takes the model torch.compile(model, backend="qcompile", '
            "options=...) returned, compiled with the options the file was saved with")
    path = path_arg("qcompile.load", path, exists="file")
    meta, tensors = read(path)
    if compiled != meta["options"]:
        raise ArtifactMismatchError(
            f"{os.fspath(path)} was saved with options {meta['options']}; this model is "
            f"compiled with {compiled}: compile it with the saved options")
    problems = _compare(meta["fingerprint"], fingerprint(model))
    if problems:
        raise ArtifactMismatchError(
            f"{os.fspath(path)} does not belong to this model: " + "; ".join(problems))
    loaded = Loaded(path=os.fspath(path))
    for name, entry in meta["sites"].items():
        rng = None
        if entry.get("channel_range"):
            rng = (tensors[f"site/{name}/lo"], tensors[f"site/{name}/hi"])
        migrations = {key: Migration(entry[key], tensors[f"site/{name}/{key}_scale"],
                                     tensors.get(f"site/{name}/{key}_shift"))
                      for key in ("migration", "learned") if entry.get(key) is not None}
        loaded.sites[name] = CalibSite(scale=entry["scale"], zero_point=entry["zero_point"],
                                       channel_range=rng, seen=entry["seen"],
                                       absmax=entry.get("absmax"),
                                       bits=entry.get("bits", 8), **migrations,
                                       **{key: tensors[f"site/{name}/{key}"]
                                          for key in ("mean", "act_error") if entry.get(key)})
    for name, variants in meta["layers"].items():
        for i, entry in enumerate(variants):
            spec = QuantSpec(bits=entry["bits"], symmetric=entry["symmetric"],
                             granularity=entry["granularity"], group_size=entry["group_size"],
                             axis=entry["axis"], group_levels=entry.get("group_levels"))
            loaded.weights.setdefault(name, {})[tuple(entry["transforms"])] = QuantizedWeight(
                *(tensors[f"layer/{name}/{i}/{k}"] for k in ("qweight", "scale", "zero_point")),
                spec, tensors.get(f"layer/{name}/{i}/row_scale"))
    state = state_for_model(model)
    if any(a.finalized for a in state.artifacts if a.options.fingerprint() == compiled):
        raise RuntimeError("qcompile.load: this compiled model already ran quantized; load "
                           "into a freshly compiled model, before its first call")
    state.loaded[compiled] = loaded
    state.calibrated.add(compiled)  # its graphs finalize at once, from the loaded sites
    return loaded


# ---------------------------------------------------------------------- torch.export


def export(model) -> torch.export.ExportedProgram:
    """The quantized graph of a compiled model as a torch.export ExportedProgram.

    The model must have run (and been calibrated, or loaded) and compile to one graph (no
    graph break). The program calls the qcompile ops (torch.ops.qcompile.*, registered by
    `import qcompile` in the process that loads it) with their implementation unbound, so
    each call runs the device's default implementation there; its inputs are the graph's
    (the tensors Dynamo lifted from the call), at the shapes of the graph's last sample
    (sizes and floats Dynamo passed as inputs, and 0-d tensor inputs read only through
    .item(), are baked in at the sample's values).
    `torch.export.save` / `load` round-trip it; AOTInductor packages it too (the qcompile
    ops run through its proxy executor, in Python).
    """
    _, artifacts = _state_and_fingerprint(model)
    graphs = [a for a in artifacts if a.finalized]
    if len(graphs) != 1:
        raise RuntimeError(
            f"qcompile.export exports a model that compiled to one quantized graph; this one "
            f"has {len(graphs)} (graph breaks or several input shapes): export each graph's "
            "GraphModule (qcompile.report(model).graphs) yourself, or remove the graph breaks")
    (variant,) = graphs
    graph = copy.deepcopy(variant.gm.graph)
    inputs = []
    for node, value in zip([n for n in graph.nodes if n.op == "placeholder"], variant.sample):
        items = [u for u in node.users if u.op == "call_method" and u.target == "item"]
        if isinstance(value, torch.Tensor) and not (value.dim() == 0 and items
                                                    and len(items) == len(node.users)):
            inputs.append(value)
            continue
        # a size or float Dynamo passed in (a module's float, e.g. an attention scaling,
        # arrives as a 0-d tensor read by .item()): the sample's value, baked in, not a
        # data-dependent scalar torch.export cannot guard on
        if isinstance(value, torch.Tensor):
            for item in items:
                item.replace_all_uses_with(value.item())
                graph.erase_node(item)
        else:
            node.replace_all_uses_with(value)
        graph.erase_node(node)
    for node in graph.nodes:
        if "impl" in node.kwargs:  # portable: bound where it runs, not where it was made
            node.update_kwarg("impl", "")
            node.update_kwarg("origin", "")
    gm = GraphModule(variant.gm, graph)
    return torch.export.export(gm, tuple(inputs), strict=False)
