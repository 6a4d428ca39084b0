"""freeze-params: model parameters and buffers become constants of the compiled artifact.

What: every placeholder whose Dynamo source is a module parameter or buffer (or whose
example value is an nn.Parameter) is replaced by a get_attr constant holding that very
tensor (no copy), named after its module path (`model.layers.0.q_proj.weight`): the
model's name for it (qcompile/state.py `param_name`), when the model's state is known.
Dropout in eval mode (training=False) is dropped: it is the identity.

Why: later passes fold transforms into weights and quantize them; they need the values.

Pre: a Dynamo graph with `example_value` on every node; ctx.example_inputs holds the real
inputs in placeholder order.
Module float attributes that Dynamo passes as 0-d tensors read through .item() (RMSNorm
eps, attention scaling under dynamic=True) become plain numbers, so canonicalization sees
the same graph with static and dynamic shapes.
Post: no placeholder is a parameter or buffer (rule in verify.py); ctx.frozen records,
per frozen input index, the tensor, its `_version` and its name (and each folded scalar's
value), so the artifact can notice another instance of the module or weights changed
in place. Inference only: a
graph with dropout or batch norm in training mode is rejected with a clear error.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch.fx import GraphModule

from qcompile.fx_utils import is_call
from qcompile.pass_manager import PassContext, PassResult, graph_pass


class TrainingModeError(RuntimeError):
    pass


_MODULE_STATE = re.compile(r"\._(parameters|buffers)\[")


def source_name(node) -> str | None:
    """Dynamo's name for where a placeholder came from (set by seed_meta_from_dynamo)."""
    return node.meta.get("qc_source")


def param_path(source: str) -> str:
    """L['self']._modules['layers']._modules['0']._parameters['weight'] -> layers.0.weight
    (and L['args'][0]._modules['layers']... alike: the module as a wrapper's argument)"""
    parts = re.findall(r"\[['\"]?([^'\"\]]+)['\"]?\]", source)
    if parts and parts[0] in ("self", "mod", "model", "m"):
        parts = parts[1:]
    elif len(parts) > 2 and parts[0] == "args" and parts[1].isdigit():
        parts = parts[2:]  # the module passed as an argument: a decorated forward(self, ...)
    return ".".join(parts) or source


def is_module_state(node, example) -> bool:
    """A module parameter or buffer: an nn.Parameter, or a placeholder Dynamo sourced from
    a module's _parameters / _buffers."""
    if isinstance(example, torch.nn.Parameter):
        return True
    name = source_name(node)
    return bool(name and _MODULE_STATE.search(name))


def _training_ops(gm: GraphModule) -> list[str]:
    bad = []
    for node in gm.graph.nodes:
        if is_call(node, F.dropout, torch.dropout, F.dropout1d, F.dropout2d, F.alpha_dropout):
            training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
            p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
            if training and p:
                bad.append(f"{node.name}: dropout(p={p}, training=True)")
        if is_call(node, F.batch_norm):
            training = node.kwargs.get("training", node.args[5] if len(node.args) > 5 else False)
            if training:
                bad.append(f"{node.name}: batch_norm(training=True)")
    return bad


@graph_pass("freeze-params")
def freeze_params(gm: GraphModule, ctx: PassContext) -> PassResult:
    bad = _training_ops(gm)
    if bad:
        raise TrainingModeError(
            "qcompile compiles models for inference, but this graph is in training mode "
            f"({'; '.join(bad[:3])}). Call model.eval() before compiling, and run it under "
            "torch.no_grad() or torch.inference_mode()."
        )
    example_inputs = ctx.analysis.get("example_inputs")
    if example_inputs is None:
        raise ValueError("freeze-params needs ctx.analysis['example_inputs'] (capture sets it)")
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    frozen_idx, frozen_tensors, frozen_names = [], [], []
    counters = {"frozen": 0, "eval_dropout_removed": 0}
    for idx, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(example, torch.Tensor) or not is_module_state(node, example):
            continue
        path = param_path(source_name(node) or node.name)
        if ctx.state is not None:  # unique in the model, whichever frame Dynamo compiled
            path = ctx.state.param_name(example, path)
        attr = re.sub(r"\W", "_", path)
        while hasattr(gm, attr):
            attr += "_"
        gm.register_buffer(attr, example.detach(), persistent=False)
        with gm.graph.inserting_before(node):
            const = gm.graph.get_attr(attr)
        const.meta.update(node.meta)
        const.meta["qc_param_name"] = path
        const.meta.pop("grapharg", None)
        node.replace_all_uses_with(const)
        gm.graph.erase_node(node)
        frozen_idx.append(idx)
        frozen_tensors.append(example)
        frozen_names.append(path)
        counters["frozen"] += 1
    scalars = []
    for idx, (node, example) in enumerate(zip(placeholders, example_inputs)):
        if idx in frozen_idx or not _is_module_scalar(node, example):
            continue
        value = example.item()
        for item in list(node.users):  # every use is x.item(): substitute the number
            def substitute(a, i=item, v=value):
                return v if a is i else a

            for user in list(item.users):
                user.args = torch.fx.node.map_arg(user.args, substitute)
                user.kwargs = torch.fx.node.map_arg(user.kwargs, substitute)
            gm.graph.erase_node(item)
        gm.graph.erase_node(node)
        scalars.append((idx, value))
        counters["scalars"] = counters.get("scalars", 0) + 1
    for node in list(gm.graph.nodes):
        if is_call(node, F.dropout, torch.dropout) and node.users is not None:
            counters["eval_dropout_removed"] += 1
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    ctx.frozen = {
        "indices": frozen_idx,
        "tensors": frozen_tensors,
        "versions": [t._version for t in frozen_tensors],
        "names": frozen_names,
        "scalars": scalars,
        "num_inputs": len(placeholders),
    }
    modified = bool(frozen_idx or scalars) or counters["eval_dropout_removed"] > 0
    return PassResult(gm, modified=modified, counters=counters)


def _is_module_scalar(node, example) -> bool:
    """A module's float attribute (an RMSNorm eps, an attention scaling) that Dynamo passes
    as a 0-d tensor input read only through .item() (it does so under dynamic=True)."""
    source = source_name(node) or ""
    if not (isinstance(example, torch.Tensor) and example.dim() == 0):
        return False
    # the module is L['self'], or an argument of a wrapper Dynamo traced (transformers
    # decorates forward, so its frames see the model as L['args'][0]): a submodule's
    # attribute goes through ._modules[...]
    of_module = source.startswith("L['self']") or "._modules[" in source
    if not of_module or _MODULE_STATE.search(source):
        return False
    return bool(node.users) and all(u.op == "call_method" and u.target == "item"
                                    for u in node.users)
