"""Per-model state shared by every graph compiled from one model.

Dynamo compiles a model into several graphs (graph breaks) and compiles again for new
shapes; all of them belong to the same model and share one ModelState: its calibration
observers and quantization parameters, keyed by stable site names (parameter paths),
so a recompile for a new sequence length reuses the calibration. Two models have
disjoint parameters and therefore disjoint states: nothing leaks between them.

The state is found through the model's parameter tensors (by identity, weakly), because
the backend never sees the nn.Module, only the parameters Dynamo passes as inputs.

Threads: a model may be called from several threads at once. The registry of states and
each state's set of graphs take a lock; a calibration belongs to the thread that entered
`qcompile.calibrate` (`calibrating` is true in that thread only), so no other thread's
call is ever observed into its statistics.

Parameter names are the state's too (`param_name`): Dynamo names a parameter by its path
from the frame it compiled, which after a graph break inside a submodule (or a loop over
layers) is the submodule: every layer of a model can call its weight "weight" or
"self_attn.q_proj.weight" there. The state gives each tensor one name, unique in the
model and the same in every graph: the frame's path, unless another tensor of the model
holds it already; then its path in the model, when the model has been seen (`calibrate`,
`report`, `load` pass it), else the frame's path with "#1", "#2", ... (the frame's path
first: a saved quantization names layers the way Dynamo does, tied weights included).
"""

from __future__ import annotations

import re
import threading
import weakref
from typing import Any

import torch


class Artifacts:
    """The compiled graphs of one model, held weakly. Iterating gives a snapshot, so a
    graph compiled in another thread meanwhile never breaks a loop over them."""

    def __init__(self) -> None:
        self._set: weakref.WeakSet = weakref.WeakSet()
        self._lock = threading.Lock()

    def add(self, artifact) -> None:
        with self._lock:
            self._set.add(artifact)

    def discard(self, artifact) -> None:
        with self._lock:
            self._set.discard(artifact)

    def __iter__(self):
        with self._lock:
            return iter(list(self._set))

    def __len__(self) -> int:
        with self._lock:
            return len(self._set)

    def __contains__(self, artifact) -> bool:
        with self._lock:
            return artifact in self._set


class ModelState:
    def __init__(self) -> None:
        self.artifacts = Artifacts()
        self.lock = threading.RLock()  # calibrate's entry and exit
        self.calibrating_thread: int | None = None  # the thread inside qcompile.calibrate
        self.calibrated: set[str] = set()  # option fingerprints with finished calibration
        self.batches = 0
        self.observers: dict[str, Any] = {}  # "<options fingerprint>|<site>|<kind>" -> observer
        self.qparams: dict[str, Any] = {}  # site -> frozen quantization parameters
        self.stats: dict[str, Any] = {}  # site -> per-channel statistics, Hessians
        # options fingerprint -> {"bits": {site: bits}, "plan": PrecisionPlan} that
        # choose-precision decided (recipe "mixed"): a graph compiled later (a new shape)
        # keeps the same widths
        self.precision: dict[str, dict[str, Any]] = {}
        # "<options fingerprint>|<site>" -> (Migration, why) that smooth measured for the
        # linears reading the site: a graph compiled later (a new shape) reuses it
        self.migrations: dict[str, Any] = {}
        # "<options fingerprint>|clip|<layer>" -> learned clip ratios (None: learning kept
        # nothing) and "<options fingerprint>|let|<site>" -> Migration, from learn-transforms:
        # a graph compiled later (a new shape) applies them instead of learning again
        self.learned: dict[str, Any] = {}
        # the calibration batches' graph inputs, {input name: tensor} (artifact.Replay), where
        # finalizing replays them (learn-transforms, sequential GPTQ): every graph of the
        # model (a static and a dynamic variant see different batches) and a graph compiled
        # after calibration take what matches its own inputs
        self.calib_batches: list[dict[str, Any]] = []
        # options fingerprint -> serialize.Loaded: a saved quantization, in place of
        # calibration data (qcompile.load)
        self.loaded: dict[str, Any] = {}
        self.paths: dict[int, str] = {}  # id(tensor) -> its path in the model, once seen
        self.names: dict[str, weakref.ref] = {}  # parameter name -> its tensor

    def param_name(self, tensor: torch.Tensor, local: str) -> str:
        """The model-wide name of a parameter Dynamo's frame calls `local`."""

        def free(name):
            return name not in self.names or self.names[name]() is None

        for name, ref in self.names.items():
            if ref() is tensor:
                return name
        name = local
        if not free(name) and free(self.paths.get(id(tensor), name)):
            name = self.paths[id(tensor)]
        head, dot, leaf = local.rpartition(".")
        k = 0
        while not free(name):
            k += 1
            name = f"{head}#{k}.{leaf}" if dot else f"{leaf}#{k}"
        self.names[name] = weakref.ref(tensor)
        return name

    def learn_paths(self, module: torch.nn.Module) -> None:
        """The model's own paths for its tensors (a tied weight: its first path)."""
        named = [*module.named_parameters(remove_duplicate=False),
                 *module.named_buffers(remove_duplicate=False)]
        for name, tensor in named:
            self.paths.setdefault(id(tensor), name)

    @property
    def calibrating(self) -> bool:
        """Whether the calling thread is inside a `qcompile.calibrate` block of this model
        (other threads see False: their calls are never calibration batches)."""
        return self.calibrating_thread == threading.get_ident()

    def observer(self, site: str, factory) -> Any:
        if site not in self.observers:
            self.observers[site] = factory()
        return self.observers[site]


# id(tensor) -> (weakref to the tensor, state); entries die with their tensors.
_BY_TENSOR: dict[int, tuple[weakref.ref, ModelState]] = {}
_BY_TENSOR_LOCK = threading.RLock()  # lookups that register and merge (entries die freely)


def _lookup(t: torch.Tensor) -> ModelState | None:
    entry = _BY_TENSOR.get(id(t))
    if entry is not None and entry[0]() is t:
        return entry[1]
    return None


def _register(t: torch.Tensor, state: ModelState) -> None:
    key = id(t)
    _BY_TENSOR[key] = (weakref.ref(t, lambda _r, key=key: _BY_TENSOR.pop(key, None)), state)


def state_for_tensors(tensors: list[torch.Tensor]) -> ModelState:
    """The state owning these parameter tensors, created (and registered) if new.

    A graph break gives each graph only its own parameters, so one model can start out
    with several states; any lookup that finds more than one merges them into one."""
    with _BY_TENSOR_LOCK:
        return _state_for_tensors(tensors)


def _state_for_tensors(tensors: list[torch.Tensor]) -> ModelState:
    found: list[ModelState] = []
    for t in tensors:
        state = _lookup(t)
        if state is not None and all(state is not f for f in found):
            found.append(state)
    state = found[0] if found else ModelState()
    for other in found[1:]:
        _merge(state, other)
    for t in tensors:
        if _lookup(t) is not state:
            _register(t, state)
    return state


def _merge(into: ModelState, other: ModelState) -> None:
    # A name both states gave to different tensors (graphs compiled before one of them
    # showed they belong to one model): the graphs of `other` that use it are compiled
    # again on their next call, with names from the merged state (until then the report
    # still lists them); their statistics go.
    clash = {name for name, ref in other.names.items()
             if name in into.names and into.names[name]() is not ref()}
    for name, ref in other.names.items():
        if name not in clash:
            into.names[name] = ref
    into.paths.update(other.paths)
    for artifact in list(other.artifacts):
        if clash & set(artifact.ctx.frozen.get("names", ())):
            artifact.stale = True
        into.artifacts.add(artifact)
        artifact.state = artifact.ctx.state = into
    # everything keyed by site or parameter (smooth's migrations and what learn-transforms
    # learned included: a graph compiled later reuses them instead of measuring again)
    for name in ("observers", "qparams", "stats", "loaded", "migrations", "learned"):
        items = getattr(other, name).items()
        getattr(into, name).update((k, v) for k, v in items if not _names_any(k, clash))
    for fingerprint, decided in other.precision.items():
        into.precision.setdefault(fingerprint, decided)  # the first decision stands
    # replayed batches: each graph takes the ones matching its own inputs
    into.calib_batches.extend(b for b in other.calib_batches
                              if all(b is not mine for mine in into.calib_batches))
    into.batches = max(into.batches, other.batches)  # both counted the model's calls
    into.calibrated |= other.calibrated
    for key, (ref, st) in list(_BY_TENSOR.items()):
        if st is other:
            _BY_TENSOR[key] = (ref, into)


def _names_any(key: str, names: set[str]) -> bool:
    """Whether a statistics key ("<fingerprint>|<site>|<kind>", or a site: "in:<layer>",
    "attn:<layer>:q", a parameter name) is about one of the parameters `names`."""
    parts = set(re.split(r"[|:]", key))
    return any(name in parts or name.removesuffix(".weight") in parts for name in names)


_HOW = 'torch.compile(model, backend="qcompile", options=...)'


def model_tensors(model: Any) -> list[torch.Tensor]:
    """The parameters and buffers of a model compiled with qcompile: what torch.compile
    returned, or the nn.Module of one that ran. Refused: anything else, a model compiled
    with another backend, a module never compiled with qcompile (it has no quantization
    to calibrate, report or save)."""
    module = getattr(model, "_orig_mod", model)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(
            f"qcompile: model must be the model {_HOW} returned (or its nn.Module), got "
            f"{type(model).__name__}"
        )
    tensors = [*module.parameters(), *module.buffers()]
    backend, _ = _backend(model)
    if tensors and backend not in ("qcompile", None) and (
            backend or not any(_lookup(t) is not None for t in tensors)):
        what = (f"was compiled with backend={backend!r}" if backend else
                "is an nn.Module that was never compiled with qcompile")
        raise TypeError(f"qcompile: model {what}: pass the model {_HOW} returned")
    return tensors


def state_for_model(model: Any) -> ModelState:
    tensors = model_tensors(model)
    if not tensors:
        raise ValueError("this model has no parameters or buffers: nothing to quantize")
    state = state_for_tensors(tensors)
    state.learn_paths(getattr(model, "_orig_mod", model))
    return state


def _backend(model: Any) -> tuple[str | None, Any]:
    """(name, callback) of the backend torch.compile gave `model`: ("", None) for a model
    torch.compile did not return, (None, None) when Dynamo's internals cannot be read."""
    if not hasattr(model, "_orig_mod"):
        return "", None
    obj = getattr(getattr(model, "dynamo_ctx", None), "callback", None)
    for _ in range(8):
        if obj is None:
            break
        name = getattr(obj, "compiler_name", None)
        if isinstance(name, str):
            return name, obj
        obj = getattr(obj, "_torchdynamo_orig_backend", None)
    return None, None


def compile_fingerprint(model: Any) -> str | None:
    """The options fingerprint `torch.compile(..., backend="qcompile", options=...)` gave
    this compiled model, or None when it cannot be read (a plain module, or Dynamo's
    internals moved): then callers act on every graph of the model."""
    from qcompile.config import Options

    backend, obj = _backend(model)
    kwargs = getattr(obj, "kwargs", None)
    if backend != "qcompile" or not isinstance(kwargs, dict):
        return None
    try:
        return Options.from_user(kwargs.get("mode"), kwargs.get("options")).fingerprint()
    except Exception:
        return None
