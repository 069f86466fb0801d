"""Find the attention modules of a model and decide which of them become retention.

Discovery is structural: a module is recognised by the projections it owns, not by its class
name, so every Hugging Face decoder written in the Llama style (Llama, Mistral, Qwen2, ...) and
GPT-2's fused ``c_attn`` are found without a per-model table (Phi-3, GPT-NeoX, Phi and Falcon
layouts: ``families``). Retention is causal
self-attention, so cross-attention and bidirectional (encoder) attention are found but never
offered for conversion (``survey`` lists them with the reason), and layers an earlier retrofit
already converted are recognised as retention. Nothing here mutates the model.
"""

from __future__ import annotations

import collections
import inspect
from collections.abc import Callable
from dataclasses import dataclass, replace

from torch import nn

from .families import (
    FUSED_FAMILIES,
    LOOKED_FOR_FUSED,
    classify_fused,
    fused_geometry,
    fused_problem,
)
from .placement import round_half_up, select_layers  # noqa: F401  (re-exported)
from .rules import forward_parameters

FAMILIES = ("llama", "gpt2", *FUSED_FAMILIES, "mha", "generic")

LOOKED_FOR = (
    "Hugging Face decoder attention with q_proj/k_proj/v_proj/o_proj (Llama, Mistral, Qwen2, ...), "
    f"GPT-2 attention with a fused c_attn and c_proj, {LOOKED_FOR_FUSED}, "
    "torch.nn.MultiheadAttention, or (with "
    "predicate=) a module with q_proj/k_proj/v_proj or a fused qkv/Wqkv/qkv_proj Linear, an "
    "output projection (o_proj/out_proj/proj/c_proj) and a num_heads/n_heads/n_head/"
    "num_attention_heads attribute (on the module or its config)"
)

_HEAD_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "n_kv_head")
_OUT_NAMES = ("o_proj", "out_proj", "proj", "c_proj")
_FUSED_NAMES = ("qkv", "Wqkv", "qkv_proj")
# NOTE: module-path components (lower case) that hold cross-attention in common decoders:
# Mllama/Idefics `cross_attn`, BART/Whisper/Marian `encoder_attn`, BERT `crossattention`, T5
# `EncDecAttention`, GPT-2 `crossattention`.
_CROSS_NAMES = (
    "cross_attn",
    "cross_attention",
    "crossattention",
    "encoder_attn",
    "encdecattention",
)
_SLIDING_TYPES = ("sliding_attention", "hybrid_sliding")


@dataclass(frozen=True)
class AttentionSite:
    """One attention module found in the model: where it lives and its head geometry."""

    index: int  # position among the attention modules found, first layer first
    name: str  # dotted module path
    family: str  # one of FAMILIES
    num_heads: int
    num_kv_heads: int
    head_dim: int
    cache_index: int  # index of this layer in a Hugging Face cache (the module's layer_idx)
    sliding_window: int | None = None
    converted: bool = False  # already retention (an earlier retrofit); never converted again

    @property
    def parent_and_attr(self) -> tuple[str, str]:
        parent, _, attr = self.name.rpartition(".")
        return parent, attr


@dataclass(frozen=True)
class SkippedAttention:
    """An attention module that cannot become retention, and why (kept as attention)."""

    name: str
    kind: str  # type name of the module
    reason: str


def find_attention(
    model: nn.Module, predicate: Callable[[str, nn.Module], bool] | None = None
) -> list[AttentionSite]:
    """Every convertible or already converted attention module of ``model``, in module order.

    See ``survey``; cross-attention and bidirectional attention are left out.
    """
    return survey(model, predicate)[0]


def survey(
    model: nn.Module, predicate: Callable[[str, nn.Module], bool] | None = None
) -> tuple[list[AttentionSite], list[SkippedAttention]]:
    """Attention sites of ``model`` in module order (outer modules win, no nesting), and the
    attention modules skipped because retention cannot replace them.

    Layers converted by an earlier retrofit are sites with ``converted=True`` whatever the
    predicate. With ``predicate(name, module) -> bool`` only the modules it picks are taken; each
    must have a recognisable structure (see ``LOOKED_FOR``) and be causal self-attention, else
    ValueError names the module and the reason.
    """
    sites: list[AttentionSite] = []
    skipped: list[SkippedAttention] = []
    taken: list[str] = []
    # NOTE: named_modules() lists a module shared by two parents once (cross-layer sharing)
    paths = collections.Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in taken):
            continue
        if _is_converted(module):
            sites.append(replace(module.site, index=len(sites), name=name, converted=True))
            taken.append(name)
            continue
        picked = predicate is not None and predicate(name, module)
        if predicate is not None and not picked:
            continue
        family = classify(module, allow_generic=picked)
        if family is None:
            if picked:
                raise ValueError(
                    f"predicate picked {name!r} ({type(module).__name__}) but its structure is "
                    f"not recognised ({_missing(module)}); looked for {LOOKED_FOR}"
                )
            continue
        taken.append(name)
        reason = (
            why_not_convert(model, name, module)
            or _shared(paths[id(module)])
            or _width_problem(module, family)
            or _unread_arguments(module, family)
        )
        if reason is not None:
            if picked:
                raise ValueError(
                    f"predicate picked {name!r} ({type(module).__name__}) but it cannot become "
                    f"retention: {reason}"
                )
            skipped.append(SkippedAttention(name, type(module).__name__, reason))
            continue
        sites.append(_describe(len(sites), name, module, family))
    return sites, skipped


def classify(module: nn.Module, allow_generic: bool) -> str | None:
    """The family of an attention module, or None when it is not one we can convert.

    Structure only: ``why_not_convert`` decides whether a recognised module may be converted.
    """
    if _is_converted(module):
        return None
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if _has(module, "q_proj", "k_proj", "v_proj", "o_proj") and hasattr(module, "head_dim"):
        # NOTE: one picked with arguments Hugging Face's signature lacks is the generic family's
        # (which refuses a tensor argument it would ignore), as the refusal below advises
        generic = allow_generic and _head_count(module) is not None
        return "generic" if generic and _unread_arguments(module, "llama") else "llama"
    if _has(module, "c_attn", "c_proj") and hasattr(module, "num_heads"):
        if hasattr(module, "split_size"):
            return "gpt2"
    family = classify_fused(module)
    if family is not None:
        return family
    if allow_generic and _head_count(module) is not None and _out_proj(module) is not None:
        if _has(module, "q_proj", "k_proj", "v_proj") or _fused_qkv(module) is not None:
            return "generic"
    return None


def why_not_convert(model: nn.Module, name: str, module: nn.Module) -> str | None:
    """None when ``module`` (at ``name`` in ``model``) is causal self-attention, else the reason.

    Retention is causal self-attention: queries and keys come from the same sequence and a
    position sees only earlier ones.
    """
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    parts = [p.lower() for p in name.split(".")]
    if (
        getattr(module, "is_cross_attention", False) is True
        or any(p in _CROSS_NAMES for p in parts)
        or "crossattention" in type(module).__name__.lower()
        or (isinstance(parent, nn.TransformerDecoderLayer) and attr == "multihead_attn")
    ):
        return (
            "cross-attention (its keys and values come from another sequence, e.g. an encoder "
            "or an image); retention replaces causal self-attention only"
        )
    if isinstance(parent, nn.TransformerEncoderLayer) and attr == "self_attn":
        return (
            "self-attention of an nn.TransformerEncoderLayer (an encoder: bidirectional unless "
            "a causal mask is passed, and its fast path reads nn.MultiheadAttention internals); "
            "retention is causal"
        )
    if getattr(module, "is_causal", None) is False:
        return (
            "is_causal=False (bidirectional attention, e.g. an encoder or a vision tower); "
            "retention is causal: every position would lose its view of later positions"
        )
    if _vision(module):
        return (
            f"{type(module).__name__} is a vision tower's attention (bidirectional over an "
            "image's patches); retention is causal"
        )
    return None


def _vision(module: nn.Module) -> bool:
    """A vision tower's attention by name (Mllama's and Llama 4's have no ``is_causal``).

    NOTE: not a vision-language model's text attention (``Granite4VisionTextAttention``)."""
    name = type(module).__name__.lower()
    config = type(getattr(module, "config", None)).__name__
    return ("vision" in name and "text" not in name) or config.endswith("VisionConfig")


def _shared(paths: int) -> str | None:
    if paths < 2:
        return None
    return (
        f"the module is reachable at {paths} module paths (shared across layers): a converted "
        "module would replace it at one of them only, and one retention state cannot serve two "
        "layers"
    )


# what a converted Llama-style layer reads (or refuses: cross-attention inputs) besides the
# hidden states and ``**kwargs``: Hugging Face's attention signature
_LLAMA_ARGUMENTS = {
    "position_embeddings", "attention_mask", "past_key_values", "past_key_value", "cache",
    "layer_past", "cache_position", "position_ids", "output_attentions", "use_cache",
    "cross_attention_states", "key_value_states", "encoder_hidden_states",
}  # fmt: skip


def _unread_arguments(module: nn.Module, family: str) -> str | None:
    """The named arguments of a Llama-shaped module's forward that its converted layer would
    not read (a mask under its own name, Gemma 3n's ``shared_kv_states``), or None."""
    if family != "llama":
        return None
    try:
        parameters = list(inspect.signature(module.forward).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    unread = [p.name for p in parameters if p.kind not in variadic]
    unread = [name for name in unread if name not in _LLAMA_ARGUMENTS]
    if not unread:
        return None
    return (
        f"its forward takes {', '.join(unread)}, which a converted Llama-style layer (Hugging "
        "Face's attention signature: hidden states, position_embeddings, attention_mask, a "
        "cache) would not read; pick it with predicate= for the generic converter, which "
        "refuses a tensor argument it would ignore"
    )


def _is_converted(module: nn.Module) -> bool:
    from .layers import RetrofitRetention  # NOTE: layers imports this module

    return isinstance(module, RetrofitRetention)


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _head_count(module: nn.Module) -> int | None:
    """The query head count, from the module or (Hugging Face) its config."""
    return _int_attr(module, _HEAD_ATTRS) or _int_attr(getattr(module, "config", None), _HEAD_ATTRS)


def _missing(module: nn.Module) -> str:
    """What a predicate-picked module lacks for the generic family, in words."""
    lacks = []
    if _head_count(module) is None:
        lacks.append("no head count attribute (num_heads/n_heads/n_head/num_attention_heads)")
    if _out_proj(module) is None:
        lacks.append("no output projection Linear (o_proj/out_proj/proj/c_proj)")
    if not _has(module, "q_proj", "k_proj", "v_proj") and _fused_qkv(module) is None:
        lacks.append("no q_proj/k_proj/v_proj nor a fused qkv/Wqkv/qkv_proj Linear")
    return "; ".join(lacks) or "an unsupported combination of projections"


def _width(layer: nn.Module, attr: str) -> int | None:
    value = getattr(layer, attr, None)
    return value if isinstance(value, int) else None


def _width_problem(module: nn.Module, family: str) -> str | None:
    """None when the projections are as wide as the head geometry says, else the reason
    (Qwen3-Next's gated attention: q_proj also carries an output gate)."""
    if family == "llama":
        dim = int(module.head_dim)
        q_out, o_in = _width(module.q_proj, "out_features"), _width(module.o_proj, "in_features")
        # NOTE: compared with each other, not with the config's head count (which a pruned model
        # may not update); _describe reads the heads from q_proj's width.
        if q_out is not None and o_in is not None and (q_out != o_in or q_out % dim):
            return (
                f"q_proj gives {q_out} features but o_proj takes {o_in}; expected both to be "
                f"heads * head_dim {dim} (e.g. a gated attention whose q_proj also carries an "
                "output gate); a converted layer could not split it"
            )
    if family in FUSED_FAMILIES:
        return fused_problem(module, family)
    if family == "generic" and "position_embeddings" in forward_parameters(module):
        return (
            "its forward takes position_embeddings (a rotary embedding), which the generic "
            "converter would not apply"
        )
    if family == "gpt2":
        heads, dim = int(module.num_heads), int(module.head_dim)
        kv = _gpt2_kv_heads(module)
        fused = _width(module.c_attn, "out_features") or _width(module.c_attn, "nf")
        if fused is not None and fused != (heads + 2 * kv) * dim:
            return (
                f"c_attn gives {fused} features, expected (heads {heads} + 2 * kv_heads {kv}) * "
                f"head_dim {dim} = {(heads + 2 * kv) * dim}"
            )
    return None


def _gpt2_kv_heads(module: nn.Module) -> int:
    """K/V heads of a GPT-2-style module: GPTBigCode's ``kv_heads`` (1 with multi_query)."""
    return _int_attr(module, ("kv_heads",)) or int(module.num_heads)


def _int_attr(obj, names: tuple[str, ...]) -> int | None:
    for attr in names:
        value = getattr(obj, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _out_proj(module: nn.Module) -> str | None:
    return next((n for n in _OUT_NAMES if isinstance(getattr(module, n, None), nn.Linear)), None)


def _fused_qkv(module: nn.Module) -> str | None:
    return next((n for n in _FUSED_NAMES if isinstance(getattr(module, n, None), nn.Linear)), None)


def _describe(index: int, name: str, module: nn.Module, family: str) -> AttentionSite:
    if family == "mha":
        heads = module.num_heads
        dim = module.embed_dim // heads
        kv_heads = heads
    elif family == "llama":
        dim = int(module.head_dim)
        heads = module.q_proj.out_features // dim
        kv_heads = module.k_proj.out_features // dim
    elif family == "gpt2":
        heads = int(module.num_heads)
        dim = int(module.head_dim)
        kv_heads = _gpt2_kv_heads(module)
    elif family in FUSED_FAMILIES:
        heads, kv_heads, dim = fused_geometry(module, family)
    else:
        heads, kv_heads, dim = _generic_geometry(name, module)
    layer_idx = getattr(module, "layer_idx", None)
    cache_index = layer_idx if isinstance(layer_idx, int) else index
    return AttentionSite(
        index=index,
        name=name,
        family=family,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=dim,
        cache_index=cache_index,
        sliding_window=_sliding_window(module, cache_index),
    )


def _sliding_window(module: nn.Module, layer: int) -> int | None:
    """The layer's sliding window: Hugging Face keeps it on the config (``sliding_window``,
    per layer ``layer_types``); older models and plain modules on the module itself."""
    config = getattr(module, "config", None)
    window = getattr(config, "sliding_window", None)
    if getattr(config, "use_sliding_window", True) is False:  # NOTE: Qwen2 keeps an unused one
        window = None
    types = getattr(config, "layer_types", None)
    if isinstance(types, (list, tuple)) and 0 <= layer < len(types):
        window = window if types[layer] in _SLIDING_TYPES else None
    own = getattr(module, "sliding_window", None)
    window = own if isinstance(own, int) and own > 0 and types is None else window
    return (
        window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    )


def _generic_geometry(name: str, module: nn.Module) -> tuple[int, int, int]:
    """(heads, kv_heads, head_dim) of a predicate-picked module, checked against its widths.

    ``head_dim`` and the K/V head count are read from the module (or its ``config``) when
    present, else derived from the output projection (its input is heads * head_dim).
    """
    config = getattr(module, "config", None)
    heads = _head_count(module)
    dim = _int_attr(module, ("head_dim",)) or _int_attr(config, ("head_dim",))
    kv = _int_attr(module, _KV_HEAD_ATTRS) or _int_attr(config, _KV_HEAD_ATTRS)
    out_in = getattr(module, _out_proj(module)).in_features
    if dim is None and out_in % heads == 0:
        dim = out_in // heads
    fused = _fused_qkv(module) if not hasattr(module, "q_proj") else None
    if fused:
        widths = {"q+k+v": getattr(module, fused).out_features}
        total = widths["q+k+v"]
        if kv is None and dim and total % dim == 0 and (total // dim - heads) % 2 == 0:
            kv = (total // dim - heads) // 2
        ok = bool(dim and kv and total == (heads + 2 * kv) * dim)
    else:
        widths = {p: getattr(module, p).out_features for p in ("q_proj", "k_proj", "v_proj")}
        if kv is None and dim and widths["k_proj"] % dim == 0:
            kv = widths["k_proj"] // dim
        ok = bool(dim and kv and widths["q_proj"] == heads * dim)
        ok = ok and widths["k_proj"] == widths["v_proj"] == kv * dim
    if not ok or heads % kv != 0 or out_in != heads * dim:
        raise ValueError(
            f"cannot determine the head geometry of {name!r} ({type(module).__name__}): found "
            f"num_heads={heads}, kv_heads={kv}, head_dim={dim}, projection widths {widths}, "
            f"output projection input {out_in}; expected q = heads * head_dim, k = v = kv_heads "
            "* head_dim (fused: (heads + 2 * kv_heads) * head_dim) with heads a multiple of "
            "kv_heads. Set head_dim / num_key_value_heads on the module"
        )
    if fused and kv != heads:
        # NOTE: GenericRetention splits a fused projection into three equal parts.
        raise ValueError(
            f"{name!r} ({type(module).__name__}) has a fused {fused} projection with grouped K/V "
            f"heads ({heads} query heads, {kv} K/V heads); the generic converter supports a "
            "fused q/k/v only with as many K/V heads as query heads (use separate q_proj/k_proj/"
            "v_proj for GQA)"
        )
    return heads, kv, dim
