"""The op vocabulary of the position rules (``positions.py``): which ops are layout, casts,
scales, shifts, cut-offs, ..., and the spellings kept as causal although they shift positions
(two views of one ``arange``, ``i < j + 1``, a fill of 0 or +-inf)."""

from __future__ import annotations

import math
import operator

import torch.fx as fx

from .graph_view import boundary, example, is_identity_dropout, is_tensor, target_name

_SEEDS = {"arange", "range", "linspace", "logspace"}
_LAYOUT = {
    "getitem", "__getitem__", "view", "reshape", "unsqueeze", "squeeze", "expand", "expand_as",
    "transpose", "permute", "flatten", "unflatten", "contiguous", "clone", "detach", "movedim",
    "moveaxis", "swapaxes", "swapdims", "repeat", "t", "view_as", "broadcast_to", "getattr",
    "stack", "select", "diagonal", "unbind", "chunk", "split", "tensor_split", "atleast_2d",
    "atleast_3d", "repeat_interleave", "unsafe_split", "meshgrid", "cartesian_prod",
}  # fmt: skip
# NOTE: a flip reverses the order along its dims: layout over a dim of fixed size (the heads),
# anti-causal over a position axis (see position_checks._check_flip)
_FLIPS = {"flip", "fliplr", "flipud"}
_CASTS = {"to", "float", "double", "half", "bfloat16", "type_as", "type", "long", "int", "short",
          "bool", "byte", "char"}  # fmt: skip
_SCALES = {
    "mul", "__mul__", "__rmul__", "multiply", "truediv", "div", "__truediv__", "__rtruediv__",
    "divide", "true_divide", "neg", "__neg__", "negative", "abs", "__abs__", "exp", "exp2", "pow",
    "__pow__", "__rpow__", "float_power", "square", "positive", "imul", "itruediv",
}  # fmt: skip
_SHIFTS = {"add", "sub", "rsub", "__add__", "__sub__", "__radd__", "__rsub__", "subtract",
           "iadd", "isub"}  # fmt: skip
_SELECTS = {
    "where", "masked_fill", "logical_and", "logical_or", "logical_not", "logical_xor", "and_",
    "or_", "xor", "invert", "inv", "__and__", "__or__", "__xor__", "__invert__", "bitwise_and",
    "bitwise_or", "bitwise_not", "bitwise_xor", "not_", "iand", "ior",
}  # fmt: skip
# NOTE: smooth, no threshold; but an unsafe input could hide one (log(c - d) is nan past c)
_SMOOTH = {"sum", "sqrt", "rsqrt", "log", "log2", "reciprocal", "nan_to_num", "mean"}
_CUTOFFS = {
    "lt", "le", "gt", "ge", "eq", "ne", "less", "greater", "less_equal", "greater_equal",
    "not_equal", "__lt__", "__le__", "__gt__", "__ge__", "__eq__", "__ne__", "clamp",
    "clamp_min", "clamp_max", "clip", "relu", "maximum", "minimum", "fmax", "fmin", "sign",
    "heaviside", "signbit",
}  # fmt: skip
_PERIODS = {"mod", "remainder", "fmod", "floordiv", "floor_divide", "__mod__", "__floordiv__",
            "__rmod__", "__rfloordiv__", "imod", "ifloordiv"}  # fmt: skip
_PRODUCTS = {"mul", "__mul__", "__rmul__", "multiply", "truediv", "div", "__truediv__",
             "__rtruediv__", "divide", "true_divide", "imul", "itruediv"}  # fmt: skip
_POWERS = {"pow", "__pow__", "__rpow__", "float_power", "square"}
# ops after which a linear position stays linear (with a non-position operand for products)
_EXPS = _POWERS | {"exp", "exp2"}
_LINEAR = (
    _LAYOUT | _CASTS | _SHIFTS | _PRODUCTS | _FLIPS
    | {"neg", "__neg__", "negative", "abs", "__abs__", "positive", "tril", "triu", "relu",
       "clamp", "clamp_min", "clamp_max", "clip", "maximum", "minimum", "fmax", "fmin"}
)  # fmt: skip
_IN_PLACE_OK = {"mul_", "div_", "tril_", "triu_", "masked_fill_", "setitem", "neg_", "abs_"}
_FILLS = (0, 0.0, math.inf, -math.inf)
_CUMULATIVE = {"cumsum"}
_COMPARISONS = {"lt", "le", "gt", "ge", "__lt__", "__le__", "__gt__", "__ge__", "less",
                "greater", "less_equal", "greater_equal"}  # fmt: skip
_REDUCTIONS = {"sum", "mean"}
_LOGS = {"log", "log2"}
# NOTE: a tensor of one number: the number's taint (a size in it is a position, ``torch.tensor(
# T / 1100).clamp(min=1)`` compares one with 1); the argument positions that carry the value
_NUMBER_TENSORS = {"tensor": None, "scalar_tensor": None, "as_tensor": None, "full": (1,),
                   "full_like": (1,), "new_full": (2,), "fill": (1,)}  # fmt: skip
# ops that read a number argument as a value (every other op reads a size as a shape or index)
_VALUE_OPS = (
    _SCALES | _SHIFTS | _PERIODS | _CUTOFFS | _SMOOTH | _SELECTS | _POWERS | _EXPS
    | {"masked_fill", "where", "lerp", "addcmul", "addcdiv", "copysign", "hypot", "atan2"}
)  # fmt: skip
# arithmetic on sizes (``float(T)``, ``math.sqrt(T)``) as the tensor op it is
_SYM_NAMES = {"sym_float": "float", "_sym_sqrt": "sqrt", "sym_sqrt": "sqrt"}
# NOTE: tensors of one constant value, as a where/masked_fill value: the same as the number
_CONSTANT_MAKERS = {"zeros", "zeros_like", "new_zeros", "full", "full_like", "new_full",
                    "tensor", "scalar_tensor", "as_tensor"}  # fmt: skip


def _name(node: fx.Node) -> str:
    if node.target is operator.setitem:
        return "setitem"
    if is_identity_dropout(node) or node.target is boundary:
        return "clone"  # NOTE: eval-mode dropout returns its input: a copy for the rules here
    name = target_name(node)
    return _SYM_NAMES.get(name, name) if node.op == "call_function" else name


def _sources(node: fx.Node) -> set:
    """The tensors (or tuples of tensors) among a node's arguments, lists looked into; sizes
    (``view(x, s0, s0)``) are not."""
    found = set()
    todo = [*node.args, *node.kwargs.values()]
    while todo:
        arg = todo.pop()
        if isinstance(arg, (list, tuple)):
            todo += list(arg)
        elif isinstance(arg, fx.Node) and not isinstance(example(arg), (int, float, bool)):
            if not type(example(arg)).__name__.startswith("Sym"):
                found.add(arg)
    return found


# layout ops that lay several tensors' values out together
_COMBINES = {"meshgrid", "cartesian_prod", "stack", "cat", "concat", "concatenate"}


def _origin(node):
    """The tensor a chain of layout ops and casts views (through an op of several tensors --
    ``meshgrid(r, r)``, ``stack`` -- only when they are one tensor)."""
    while isinstance(node, fx.Node) and _name(node) in _LAYOUT | _CASTS and node.args:
        if _name(node) not in _COMBINES:
            node = node.args[0]  # NOTE: other tensors there are references (``type_as(q)``)
            continue
        sources = _sources(node)
        if len(sources) != 1:
            break
        node = sources.pop()
    return node


def _uniform(node, unshifted) -> bool:
    """``node`` (an ``_origin``) is an arange-like seed, or positions (``unshifted(node)``: no
    shift in them), with numbers or sizes added: any two of its values differ as the positions
    they hold do. NOTE: not a sum with a tensor: ``p[None] + tensor([[0], [1500]])`` holds
    ``i`` in one row and ``j + 1500`` in the other."""
    while isinstance(node, fx.Node):
        if _name(node) in _SEEDS:
            return True
        if _name(node).removesuffix("_") not in _SHIFTS or len(node.args) != 2 or node.kwargs:
            return unshifted(node)
        tensors = [a for a in node.args if isinstance(a, fx.Node) and is_tensor(example(a))]
        numbers = [a for a in node.args if a not in tensors and not isinstance(a, bool)]
        numbers = [a for a in numbers if isinstance(a, (int, float, fx.Node))]  # NOTE: sizes too
        if len(tensors) != 1 or len(numbers) != 1:
            return unshifted(node)
        node = _origin(tensors[0])
    return False


def _difference_of_one_origin(node: fx.Node, name: str, unshifted) -> bool:
    """``a - b`` where a and b view the same positions (their shifts cancel); ``unshifted``:
    whether a node holds positions with no shift (see ``_uniform``)."""
    if name.removesuffix("_") not in ("sub", "__sub__", "subtract") or len(node.args) < 2:
        return False
    a, b = (_origin(x) for x in node.args[:2])
    same = isinstance(a, fx.Node) and a is b and _uniform(a, unshifted)
    return same and node.kwargs.get("alpha", 1) == 1


def _unit_shift(node):
    """(origin, shift) of ``p + c`` / ``p - c`` with a literal c, else (origin, 0)."""
    x = _origin(node)
    name = _name(x) if isinstance(x, fx.Node) else ""
    if name in ("add", "__add__", "__radd__", "sub", "__sub__") and len(x.args) == 2:
        a, c = x.args
        if isinstance(c, (int, float)) and not isinstance(c, bool) and isinstance(a, fx.Node):
            return _origin(a), (c if "add" in name else -c)
    return x, 0


def _unit_shift_comparison(node: fx.Node, name: str, unshifted) -> bool:
    """``i < j + 1`` (or ``i - 1 < j``, ...) with i and j views of one integer arange: the same
    as ``i <= j``, a causal mask (Hugging Face's ``_make_causal_mask`` spells it so)."""
    if name not in _COMPARISONS or len(node.args) != 2:
        return False
    if not all(isinstance(a, fx.Node) for a in node.args):
        return False
    (a, sa), (b, sb) = (_unit_shift(x) for x in node.args)
    value = example(a) if isinstance(a, fx.Node) else None
    integral = is_tensor(value) and not value.is_floating_point()
    return a is b and integral and abs(sa - sb) <= 1 and _uniform(a, unshifted)


def _constant_fill(node: fx.Node) -> bool:
    """A tensor holding one value of 0 or +-inf (``zeros_like(x)``, ``torch.tensor(0.)``)."""
    name = _name(node)
    if name not in _CONSTANT_MAKERS:
        return False
    if name in ("zeros", "zeros_like", "new_zeros"):
        return True
    fill = node.kwargs.get("fill_value", node.args[1] if len(node.args) > 1 else None)
    if name in ("tensor", "scalar_tensor", "as_tensor"):
        fill = node.args[0] if node.args else node.kwargs.get("data")
    return isinstance(fill, (int, float)) and not isinstance(fill, bool) and fill in _FILLS
