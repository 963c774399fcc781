"""Where a transformer's growth operators act, found from the model itself: its block stack, each block's MLP (from
a ``torch.fx`` trace of the MLP module, and where the MLP spans two modules, from one traced run of the model) and
each block's attention projections.

- ``find_stack(model)``: the ``nn.ModuleList`` of transformer blocks (modules of one class, each holding linear
  layers; the largest such list by parameter count).
- ``find_mlp(model, block_name, example_inputs)``: the block's feed-forward unit as expanders (the linear layers
  that map the hidden state to the intermediate features: GPT-2's ``c_fc``, BERT's ``intermediate.dense``,
  Llama's ``gate_proj`` and ``up_proj``), the per-feature operations between (activations, dropout, SiLU gating:
  elementwise products of two intermediate tensors, scalar arithmetic) and one contractor (``c_proj``,
  ``output.dense``, ``down_proj``). Each descendant of the block is traced with linear layers as leaves; the
  first whose graph holds the pattern is the MLP. When the intermediate features leave the traced module (BERT's
  ``BertIntermediate`` returns them), the model runs once on ``example_inputs`` under a ``TorchFunctionMode``
  that records every torch operation reading that output: exactly one linear layer must consume it, and nothing
  else. A block with no MLP raises ``GraphError`` listing every module tried and why it failed: the tracing error,
  or the node where the rule failed.
- ``find_attention(model, block_name)``: q/k/v (separate, or fused like GPT-2's ``c_attn``) and output
  projections with the head size and the query and key-value head counts. HF attention modules cannot be traced
  by ``torch.fx`` (their attention kernel is looked up at run time), so they are recognised by their projection
  names (``q_proj/k_proj/v_proj/o_proj``, ``query/key/value`` + the enclosing ``output.dense``, ``c_attn`` +
  ``c_proj``); anything else raises ``GraphError`` naming the block.
"""

import dataclasses
import inspect
import operator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nnopt.layers import in_out_features, is_linear_like
from nnopt.prune.compact import _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS, _ELEMENTWISE_MODULES, _SCALAR_OPERATORS

__all__ = ["Attention", "GraphError", "MLP", "find_attention", "find_mlp", "find_stack"]


class GraphError(ValueError):
    """The operator cannot find (or cannot follow) what it must change; the message names the layer or node."""


# Operations that act on each feature separately (on top of nnopt.prune.compact's lists): the tanh-GELU of
# GPT-2 (pow, tanh), erf-GELU, casts.
_PER_FEATURE_FUNCTIONS = _ELEMENTWISE_FUNCTIONS | _SCALAR_OPERATORS | {
    torch.pow, operator.pow, operator.neg, torch.neg, torch.erf, torch.sqrt, torch.rsqrt, torch.square,
    torch.nn.functional.gelu, torch._C._nn.gelu, F.silu, torch.nn.functional.relu,
}
_PER_FEATURE_METHODS = _ELEMENTWISE_METHODS | {"pow", "mul", "add", "sub", "div", "float", "to", "type_as", "neg",
                                               "sqrt", "rsqrt", "erf", "square"}
_TENSOR_BINARY = {operator.mul, operator.add, operator.sub, operator.truediv, torch.mul, torch.add, torch.sub,
                  torch.div}
_BINARY_METHODS = {"mul", "add", "sub", "div", "type_as"}


# ------------------------------------------------------------------------------------------------- the stack
def _params(m):
    return sum(p.numel() for p in m.parameters())


def find_stack(model):
    """(qualified name, nn.ModuleList) of the model's transformer blocks."""
    best = None
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) == 0:
            continue
        kinds = {type(b) for b in m}
        if len(kinds) != 1 or not any(is_linear_like(x) for x in m[0].modules()):
            continue
        if best is None or _params(m) > _params(best[1]):
            best = (name, m)
    if best is None:
        raise GraphError(f"{type(model).__name__} has no stack of transformer blocks (an nn.ModuleList of modules of "
                         "one class holding linear layers)")
    return best


def block_names(model, layers, what):
    """Qualified names of the blocks ``layers`` (indices; None = all) of the stack; GraphError for bad indices."""
    stack_name, stack = find_stack(model)
    n = len(stack)
    if layers is None:
        idx = list(range(n))
    else:
        idx = [layers] if isinstance(layers, int) else list(layers)
        for i in idx:
            if isinstance(i, bool) or not isinstance(i, int) or not -n <= i < n:
                raise GraphError(f"{what}: layer index {i!r} out of range for {stack_name!r} ({n} blocks)")
        idx = sorted({i % n for i in idx})
    return [f"{stack_name}.{i}" for i in idx]


# --------------------------------------------------------------------------------------------------- the MLP
@dataclasses.dataclass
class MLP:
    """A block's feed-forward unit: expanders -> per-feature ops (``through``) -> contractor; ``width``: the
    intermediate size; ``traced``: the module whose fx graph showed it; ``observed``: how the contractor was found
    when the intermediate features leave that module (a traced run)."""

    block: str
    traced: str
    expanders: list
    contractor: str
    width: int
    through: list
    observed: bool = False


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return is_linear_like(m) or super().is_leaf_module(m, qualname)


def _unwrapped(module):
    """``module`` seen through a subclass whose forward is the undecorated one (HF wraps forwards in decorators that
    torch.fx cannot read); it shares the module's state, so traced names are the module's own."""
    cls = type(module)
    fwd = inspect.unwrap(cls.forward)
    if fwd is cls.forward:
        return module
    sub = type(cls.__name__, (cls,), {"forward": fwd, "__module__": cls.__module__})
    shim = object.__new__(sub)
    shim.__dict__ = module.__dict__
    return shim


def _node_label(node):
    target = getattr(node.target, "__name__", node.target)
    return f"node {node.name!r} ({node.op} {target})"


def _analyse(module, graph):
    """(expanders, contractors, through, mid_escapes, why) from a traced graph of ``module``.

    Spaces: "in" (the module's inputs and anything not derived from an expander), "mid" (intermediate features),
    "out" (a contractor's output and what follows). ``why`` names the node where the per-feature rule fails."""
    space, expanders, contractors, through = {}, [], [], []
    for node in graph.nodes:
        tensors = [a for a in node.all_input_nodes]
        spaces = {space.get(a, "in") for a in tensors}
        if node.op == "placeholder" or node.op == "get_attr":
            space[node] = "in" if node.op == "placeholder" else "const"
            continue
        if node.op == "output":
            return expanders, contractors, through, "mid" in spaces, None
        if node.op == "call_module" and is_linear_like(module.get_submodule(node.target)):
            if spaces <= {"in"}:
                if contractors:
                    return expanders, contractors, through, False, (
                        f"{_node_label(node)} reads the input after the contractor {contractors[0]!r}")
                expanders.append(node.target)
                space[node] = "mid"
            elif spaces == {"mid"}:
                contractors.append(node.target)
                space[node] = "out"
            else:
                why = f"{_node_label(node)} mixes intermediate features with other tensors"
                return expanders, contractors, through, False, why
            continue
        if "mid" not in spaces:
            space[node] = "out" if "out" in spaces else "in"
            continue
        binary = node.target in _TENSOR_BINARY or node.target in _BINARY_METHODS
        if spaces != {"mid"} or (len(tensors) > 1 and not binary):
            ok = False  # mixes intermediate features with the input, a parameter, or several of them non-elementwise
        elif node.op == "call_module":
            ok = isinstance(module.get_submodule(node.target), _ELEMENTWISE_MODULES)
        elif node.op == "call_function":
            ok = node.target in _PER_FEATURE_FUNCTIONS or node.target in _TENSOR_BINARY
        else:
            ok = node.op == "call_method" and node.target in _PER_FEATURE_METHODS
        if not ok:
            return expanders, contractors, through, False, (
                f"{_node_label(node)} is not a per-feature operation on the intermediate features")
        space[node] = "mid"
        through.append(node.name)
    return expanders, contractors, through, False, "the graph has no output"


def _linear_names(module):
    return [n for n, m in module.named_modules() if is_linear_like(m)]


def _dummy(model, example_inputs):
    if example_inputs is not None:
        return example_inputs
    dummy = getattr(model, "dummy_inputs", None)
    if isinstance(dummy, dict):
        return dummy
    raise GraphError(f"example_inputs are needed to follow the data flow of {type(model).__name__} (it has no "
                     "dummy_inputs)")


def run_model(model, inputs):
    """``model`` on ``inputs`` (a dict of keyword arguments, a tuple of positional ones, or one tensor)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


class _Readers(TorchFunctionMode):
    """Records the torch operations that read ``self.watched`` outside the linear layer being entered."""

    def __init__(self):
        super().__init__()
        self.watched, self.inside, self.reads = None, 0, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.watched is not None and self.inside == 0:
            flat = [*args, *kwargs.values()]
            flat = [y for x in flat for y in (x if isinstance(x, (tuple, list)) else [x])]
            if any(x is self.watched for x in flat):
                self.reads.append(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)


@torch.no_grad()
def _observe_consumer(model, name, inputs):
    """The one linear layer that reads the output of module ``name`` in a run of the model; GraphError otherwise."""
    target = model.get_submodule(name)
    mode = _Readers()
    calls, consumers, handles = [0], [], []

    def grab(m, args, out):
        calls[0] += 1
        if mode.watched is None and isinstance(out, torch.Tensor):
            mode.watched = out

    def enter(qual):
        def pre(m, args):
            if mode.watched is not None and args and args[0] is mode.watched:
                consumers.append(qual)
                mode.inside += 1
        return pre

    def leave(qual):
        def post(m, args, out):
            if consumers and consumers[-1] == qual and mode.inside:
                mode.inside -= 1
        return post

    handles.append(target.register_forward_hook(grab))
    for qual, m in model.named_modules():
        if is_linear_like(m):
            handles.append(m.register_forward_pre_hook(enter(qual)))
            handles.append(m.register_forward_hook(leave(qual)))
    was = model.training
    model.eval()
    try:
        with mode:
            run_model(model, inputs)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    if calls[0] != 1:
        raise GraphError(f"{name!r} ran {calls[0]} times in one forward pass; its output cannot be followed")
    if len(consumers) != 1 or mode.reads:
        readers = consumers + mode.reads
        raise GraphError(f"the intermediate features leaving {name!r} are read by {readers or 'nothing'}; expected "
                         "exactly one linear layer (the MLP's output projection)")
    return consumers[0]


def find_mlp(model, block, example_inputs=None):
    """The MLP of block ``block`` (a qualified name) of ``model``; GraphError naming every failure otherwise."""
    root = model.get_submodule(block)
    tried = []
    todo = [(block, root)]
    while todo:
        qual, m = todo.pop(0)
        if not _linear_names(m) or is_linear_like(m):
            continue
        try:
            graph = _Tracer().trace(_unwrapped(m))
        except Exception as e:  # noqa: BLE001 - any tracing failure: look inside it
            first = str(e).splitlines()[0] if str(e) else ""
            tried.append(f"{qual}: torch.fx cannot trace it ({type(e).__name__}: {first[:120]})")
            todo[:0] = [(f"{qual}.{n}", c) for n, c in m.named_children()]
            continue
        expanders, contractors, through, escapes, why = _analyse(m, graph)
        if why is None and expanders and (len(contractors) == 1 or (escapes and not contractors)):
            full = [f"{qual}.{e}" for e in expanders]
            widths = {in_out_features(model.get_submodule(e))[1] for e in full}
            if len(widths) != 1:
                tried.append(f"{qual}: its expanders {expanders} have different widths {sorted(widths)}")
                continue
            width = widths.pop()
            if contractors:
                contractor, observed = f"{qual}.{contractors[0]}", False
            else:
                contractor, observed = _observe_consumer(model, qual, _dummy(model, example_inputs)), True
            takes = in_out_features(model.get_submodule(contractor))[0]
            if takes != width:
                raise GraphError(f"the contractor {contractor!r} takes {takes} features, not the {width} of {full}")
            return MLP(block, qual, full, contractor, width, through, observed)
        if why is None:
            why = (f"{len(contractors)} output projections" if len(contractors) > 1
                   else "no linear layer reads the input" if not expanders else "no output projection")
        tried.append(f"{qual}: {why}")
        todo[:0] = [(f"{qual}.{n}", c) for n, c in m.named_children()]
    raise GraphError(f"no MLP found in {block!r} ({type(root).__name__}):\n  " + "\n  ".join(tried))


# --------------------------------------------------------------------------------------------- the attention
@dataclasses.dataclass
class Attention:
    """A block's self-attention: ``module`` holds the head-count attributes; ``qkv`` is a fused projection (GPT-2)
    or None, else ``q``/``k``/``v`` name separate ones; ``o`` the output projection."""

    module: str
    q: str | None
    k: str | None
    v: str | None
    qkv: str | None
    o: str
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def groups(self):
        return self.heads // self.kv_heads


_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size")


def _head_dim(m):
    for a in _HEAD_DIM_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, int) and v > 0:
            return v
    raise GraphError(f"{type(m).__name__} has no head size attribute ({', '.join(_HEAD_DIM_ATTRS)})")


def find_attention(model, block):
    """The self-attention of block ``block``; GraphError when its layout is not one this module knows."""
    root = model.get_submodule(block)
    for qual, m in [(block, root)] + [(f"{block}.{n}", c) for n, c in root.named_modules() if n]:
        kids = dict(m.named_children())
        lin = {n for n, c in kids.items() if is_linear_like(c)}
        if {"q_proj", "k_proj", "v_proj", "o_proj"} <= lin:
            q, k, v, o = (f"{qual}.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
            d = _head_dim(m)
        elif {"query", "key", "value"} <= lin:
            pname = qual.rpartition(".")[0]
            parent = model.get_submodule(pname)
            out = getattr(parent, "output", None)
            if out is None or not is_linear_like(getattr(out, "dense", None)):
                raise GraphError(f"{qual!r} has query/key/value but its parent {pname!r} has no output.dense")
            q, k, v, o = f"{qual}.query", f"{qual}.key", f"{qual}.value", f"{pname}.output.dense"
            d = _head_dim(m)
        elif {"c_attn", "c_proj"} <= lin and not hasattr(m, "q_attn"):
            d = _head_dim(m)
            qkv_out = in_out_features(kids["c_attn"])[1]
            if qkv_out % 3:
                raise GraphError(f"{qual}.c_attn has {qkv_out} outputs, not 3 equal q/k/v parts")
            heads = qkv_out // 3 // d
            return Attention(qual, None, None, None, f"{qual}.c_attn", f"{qual}.c_proj", heads, heads, d)
        else:
            continue
        heads = in_out_features(model.get_submodule(q))[1] // d
        kv = in_out_features(model.get_submodule(k))[1] // d
        if heads % kv:
            raise GraphError(f"{qual!r}: {heads} query heads do not split into {kv} key-value groups")
        return Attention(qual, q, k, v, None, o, heads, kv, d)
    raise GraphError(f"no self-attention found in {block!r} ({type(root).__name__}): expected q_proj/k_proj/v_proj/"
                     "o_proj, query/key/value with an output.dense, or a fused c_attn with c_proj")
