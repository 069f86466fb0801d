"""Discovery of the attention layouts with a fused or ``dense``-named projection: Phi-3,
GPT-NeoX (Pythia), Phi and Falcon.

Like ``find``, recognition is structural (the projections a module owns and the attributes that
say how they are laid out), so look-alikes are found too: Persimmon shares GPT-NeoX's per-head
``query_key_value``. Each family's widths are checked against its head geometry; a module whose
layout or positions a converted layer could not reproduce (ALiBi: Falcon with ``alibi=True``,
Bloom) is not convertible, with the reason. Nothing here mutates the model.
"""

from __future__ import annotations

from torch import nn

from .rules import forward_parameters, returned_values

# family -> the projections it is recognised by
FUSED_FAMILIES = {
    "phi3": ("qkv_proj", "o_proj"),
    "neox": ("query_key_value", "dense"),
    "falcon": ("query_key_value", "dense"),
    "phi": ("q_proj", "k_proj", "v_proj", "dense"),
}
LOOKED_FOR_FUSED = (
    "Phi-3 attention with a fused qkv_proj ([q | k | v], GQA) and o_proj, GPT-NeoX/Pythia "
    "attention with a per-head fused query_key_value and dense, Falcon attention (query_key_value "
    "read from multi_query/new_decoder_architecture) and dense, Phi attention with q_proj/k_proj/"
    "v_proj and dense"
)
_FALCON_ATTRS = ("new_decoder_architecture", "multi_query")


def classify_fused(module: nn.Module) -> str | None:
    """The family of a Phi-3 / GPT-NeoX / Falcon / Phi style attention module, else None."""
    if _linears(module, "qkv_proj", "o_proj") and _int(module, "head_dim"):
        return "phi3"
    if _linears(module, "query_key_value", "dense"):
        if any(isinstance(getattr(module, a, None), bool) for a in _FALCON_ATTRS):
            return "falcon"
        if _int(module, "head_dim") or _int(module, "head_size"):
            return "neox"
    if _linears(module, "q_proj", "k_proj", "v_proj", "dense") and _int(module, "head_dim"):
        return "phi"
    return None


def fused_problem(module: nn.Module, family: str) -> str | None:
    """None when a module of ``family`` can become retention, else the reason (kept as
    attention and listed in ``handle.skipped``)."""
    if "alibi" in forward_parameters(module) and _alibi_on(module):
        return (
            "it adds ALiBi position biases to its scores (Falcon with config.alibi=True, Bloom); "
            "retention has no ALiBi (its positions come from the decay and the rotary embedding "
            "only), so a converted layer would lose them"
        )
    count = returned_values(module)
    if count is not None and count != 2:
        return (
            f"its forward returns {count} values (e.g. GPT-NeoX-Japanese's separate dense bias); "
            "a converted layer returns (output, None) like other Hugging Face attentions"
        )
    try:
        fused_geometry(module, family)
    except ValueError as err:
        return str(err)
    return None


def fused_geometry(module: nn.Module, family: str) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) read from the projection widths; ValueError with the widths
    found when they do not fit the family's layout."""
    dim = _int(module, "head_dim") or _int(module, "head_size")
    out = module.o_proj if family == "phi3" else module.dense
    out_in = out.in_features
    heads = out_in // dim if dim and out_in % dim == 0 else None
    if family == "phi":
        widths = {p: getattr(module, p).out_features for p in ("q_proj", "k_proj", "v_proj")}
        kv = widths["k_proj"] // dim if dim else None
        expect = {"q_proj": out_in, "k_proj": (kv or 0) * dim, "v_proj": (kv or 0) * dim}
        layout = "q = heads * head_dim, k = v = kv_heads * head_dim"
    else:
        name = "qkv_proj" if family == "phi3" else "query_key_value"
        widths = {name: getattr(module, name).out_features}
        kv, layout = _fused_kv(module, family, widths[name], heads, dim)
        expect = {name: ((heads or 0) + 2 * (kv or 0)) * (dim or 0)}
    if not (heads and kv) or widths != expect or heads % kv:
        raise ValueError(
            f"its projection widths {widths} do not fit the {family} layout ({layout}) with "
            f"head_dim {dim}, {heads} heads (from the output projection's input {out_in}) and "
            f"{kv} K/V heads; a converted layer could not split them"
        )
    return heads, kv, dim


def _fused_kv(
    module: nn.Module, family: str, total: int, heads: int | None, dim: int | None
) -> tuple[int | None, str]:
    """K/V heads of a fused projection and its layout in words."""
    if not (heads and dim):
        return None, "heads * head_dim must be the output projection's input"
    if family == "phi3":
        rest = total - heads * dim
        kv = rest // (2 * dim) if rest > 0 and rest % (2 * dim) == 0 else None
        return kv, "[q | k | v] = (heads + 2 * kv_heads) * head_dim"
    grouped = getattr(module, "new_decoder_architecture", False) is True
    multi_query = getattr(module, "multi_query", False) is True
    if family == "neox" or not (grouped or multi_query):
        return heads, "per head [q k v]: 3 * heads * head_dim"
    if grouped:
        return _int(module, "num_kv_heads"), (
            "per K/V group [q ... q k v]: (heads + 2 * num_kv_heads) * head_dim"
        )
    return 1, "multi-query [q | k | v] with one K/V head: (heads + 2) * head_dim"


def _alibi_on(module: nn.Module) -> bool:
    """Whether a module whose forward takes ``alibi`` gets one: Falcon says so in
    ``config.alibi``; a model without that switch (Bloom) always passes it."""
    return getattr(getattr(module, "config", None), "alibi", True) is not False


def _linears(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Linear) for n in names)


def _int(obj, name: str) -> int | None:
    value = getattr(obj, name, None)
    ok = isinstance(value, int) and not isinstance(value, bool) and value > 0
    return value if ok else None
