"""``fastconv.fuse``: Conv2d -> BatchNorm2d (-> ReLU / ReLU6) chains as fastconv.nn.ConvBNReLU2d."""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import fx

from .nn import ACTIVATION_MODULES, ConvBNReLU2d, _hooks_of, fusable_conv_bn


class FuseWarning(UserWarning):
    """A part of a model that fuse() left unfused: its forward does not trace, or its traced
    graph depends on the train / eval mode."""


class _Unfusable(Exception):
    """Why a module's own forward cannot be fused through its torch.fx graph."""


def _conv_bn_pair(conv, bn) -> bool:
    return fusable_conv_bn(conv, bn) is None


def _activation_of(module) -> Optional[str]:
    """The activation name of a ReLU / ReLU6 module fuse() may absorb (not one with hooks,
    which the fused module would not run)."""
    if module is None or _hooks_of(module):
        return None
    return next((n for n, t in ACTIVATION_MODULES.items() if type(module) is t), None)


def _fuse_sequential(seq: torch.nn.Sequential) -> int:
    """Fuses the Conv2d, BatchNorm2d[, ReLU/ReLU6] runs among seq's children in place: the
    fused module takes the conv's place, nn.Identity the others' (as
    torch.ao.quantization.fuse_modules does). Returns how many it fused."""
    names = list(seq._modules)
    fused = i = 0
    while i + 1 < len(names):
        conv, bn = seq._modules[names[i]], seq._modules[names[i + 1]]
        if not _conv_bn_pair(conv, bn):
            i += 1
            continue
        act = _activation_of(seq._modules[names[i + 2]]) if i + 2 < len(names) else None
        seq._modules[names[i]] = ConvBNReLU2d.from_modules(conv, bn, act)
        seq._modules[names[i + 1]] = torch.nn.Identity()
        if act:
            seq._modules[names[i + 2]] = torch.nn.Identity()
        fused += 1
        i += 3 if act else 2
    return fused


# Functions (and tensor methods) after a BatchNorm2d that fuse as its activation.
_RELU_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu6: "relu6"}
_RELU_METHODS = {"relu": "relu", "relu_": "relu"}


def _activation_node(node: fx.Node, modules: dict) -> Optional[str]:
    if node.op == "call_module":
        return _activation_of(modules.get(node.target))
    if node.op == "call_function" and node.target in _RELU_FUNCTIONS:
        return _RELU_FUNCTIONS[node.target]
    if node.op == "call_function" and node.target is F.hardtanh:
        bounds = (list(node.args[1:3]) + [None, None])[:2]
        lo = node.kwargs.get("min_val", bounds[0])
        hi = node.kwargs.get("max_val", bounds[1])
        return "relu6" if (lo, hi) == (0.0, 6.0) else None
    if node.op == "call_method" and node.target in _RELU_METHODS:
        return _RELU_METHODS[node.target]
    return None


class _Tracer(fx.Tracer):
    """Keeps convolutions, batch norms and fused modules as leaves (fastconv's Conv2d lives
    outside torch.nn, so fx would otherwise trace into it)."""

    def is_leaf_module(self, m, qualname):
        if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d, ConvBNReLU2d)):
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: torch.nn.Module) -> tuple[fx.Graph, list]:
    """model's fx graph, which must not depend on the train / eval mode: tracing records
    the Python value of ``self.training`` (``F.dropout(x, p, self.training)``, stochastic
    depth), so such a graph would keep the mode it was traced in for good. Traced all-train
    and all-eval (the flags set directly: a train() override may do more), then in the
    model's own modes, which are restored. Returns the last graph and the names of the
    attributes its trace put on model (tensor constants, which the GraphModule copies);
    the other traces' are removed, so that each trace names its constants alike."""
    modes = [(m, m.training) for m in model.modules()]

    def trace() -> tuple[str, fx.Graph, list]:
        before = set(model.__dict__)
        graph = _Tracer().trace(model)
        return str(graph), graph, [n for n in model.__dict__ if n not in before]

    def drop(names) -> None:
        for name in names:
            delattr(model, name)

    try:
        texts = []
        for mode in (True, False):
            for m in model.modules():
                m.training = mode
            text, _, added = trace()
            drop(added)
            texts.append(text)
    finally:
        for m, training in modes:
            m.training = training
    text, graph, added = trace()
    if any(t != text for t in texts):
        drop(added)
        raise _Unfusable("its traced graph differs between train and eval mode (its forward "
                         "reads self.training)")
    return graph, added


def _fuse_graph(model: torch.nn.Module) -> tuple[torch.nn.Module, int]:
    """Traces model with torch.fx and fuses conv -> bn (-> activation) node chains whose
    intermediate results have no other use. Returns the GraphModule and the count; model
    itself is left as it was."""
    graph, added = _trace(model)  # added: attributes on model until the GraphModule has them
    modules = dict(model.named_modules())
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_module" or not isinstance(modules.get(node.target), torch.nn.Conv2d):
            continue
        users = list(node.users)
        if len(users) != 1 or users[0].op != "call_module":
            continue
        bn_node = users[0]
        if not _conv_bn_pair(modules[node.target], modules.get(bn_node.target)):
            continue
        if bn_node.args[0] is not node or len(bn_node.args) != 1 or bn_node.kwargs:
            continue
        last, act = bn_node, None
        bn_users = list(bn_node.users)
        if len(bn_users) == 1 and bn_users[0].args and bn_users[0].args[0] is bn_node:
            act = _activation_node(bn_users[0], modules)
            if act is not None:
                last = bn_users[0]
        fused_module = ConvBNReLU2d.from_modules(modules[node.target], modules[bn_node.target], act)
        name = node.target.replace(".", "_") + "_fused"
        while name in modules:
            name += "_"
        model.add_module(name, fused_module)
        modules[name] = fused_module
        added.append(name)
        with graph.inserting_after(last):
            new = graph.call_module(name, (node.args[0],))
        last.replace_all_uses_with(new)
        for dead in ([last, bn_node, node] if last is not bn_node else [bn_node, node]):
            graph.erase_node(dead)
        fused += 1
    try:
        if fused == 0:
            return model, 0
        graph.lint()
        result = fx.GraphModule(model, graph, model.__class__.__name__)
    finally:
        for name in added:  # else model's state_dict would hold every fused tensor twice
            delattr(model, name)
    result.training = model.training  # the root's flag only: children keep their own modes
    return result, fused


def _has_pair(module: torch.nn.Module) -> bool:
    kids = list(module.modules())
    return (any(isinstance(m, torch.nn.Conv2d) for m in kids)
            and any(type(m) is torch.nn.BatchNorm2d for m in kids))


def fuse(model: torch.nn.Module) -> torch.nn.Module:
    """Replaces Conv2d -> BatchNorm2d (-> ReLU / ReLU6) chains of ``model`` with
    :class:`fastconv.nn.ConvBNReLU2d` modules that share their parameters and buffers; the
    model's outputs are unchanged, in train and in eval. Returns the fused model: use the
    return value.

    * In ``nn.Sequential`` containers (anywhere in the model) the chains are fused in place;
      the fused module takes the conv's place and ``nn.Identity`` the others' (state_dict
      keys move under the fused module, as with torch.ao.quantization.fuse_modules).
    * Modules with their own forward are traced with torch.fx; a chain is fused where the
      conv's and the batch norm's outputs have no other use. ``F.relu``, ``torch.relu``,
      ``x.relu()``, ``F.relu6`` and ``F.hardtanh(x, 0, 6)`` after the batch norm count as
      its activation. The result is a torch.fx.GraphModule.
    * A module whose forward does not trace (data-dependent control flow, say), or whose
      traced graph differs between train and eval mode (it reads ``self.training``), is left
      as it is, with a :class:`FuseWarning` naming it and the reason; its children are still
      fused.
    * Only torch's and fastconv's own Conv2d and BatchNorm2d classes fuse, and only without
      forward or backward hooks: a subclass may compute differently (weight
      standardisation, parametrizations), and hooks (pruning, the older weight_norm) would
      no longer run.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"fuse expects a torch.nn.Module, got {type(model).__name__}")
    return _fuse(model, type(model).__name__)


def _fuse(module: torch.nn.Module, path: str) -> torch.nn.Module:
    if isinstance(module, ConvBNReLU2d) or not _has_pair(module):
        return module
    # Sequential's own forward only: a subclass's forward may use its children otherwise.
    if isinstance(module, torch.nn.Sequential) and type(module).forward is torch.nn.Sequential.forward:
        _fuse_sequential(module)
        for name, child in list(module._modules.items()):
            module._modules[name] = _fuse(child, f"{path}.{name}")
        return module
    try:
        fused, _ = _fuse_graph(module)
        return fused
    except _Unfusable as err:
        reason = f"left {path} ({type(module).__name__}) unfused: {err}"
    except Exception as err:  # fx raises many kinds of errors for untraceable code
        reason = f"could not trace {path} ({type(module).__name__}): {type(err).__name__}: {err}"
    warnings.warn(f"fastconv.fuse: {reason}. Its own Conv2d -> BatchNorm2d chains stay "
                  "unfused; its submodules are fused separately.", FuseWarning, stacklevel=3)
    for name, child in list(module._modules.items()):
        if child is not None:
            module._modules[name] = _fuse(child, f"{path}.{name}")
    return module
