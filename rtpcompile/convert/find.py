"""Find the attention modules of a model and decide which of them become retention.

Discovery is structural: a module is recognised by the projections it owns, not by its class
name, so every Hugging Face decoder written in the Llama style (Llama, Mistral, Qwen2, ...) and
GPT-2's fused ``c_attn`` are found without a per-model table. Nothing here mutates the model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

FAMILIES = ("llama", "gpt2", "mha", "generic")

LOOKED_FOR = (
    "Hugging Face decoder attention with q_proj/k_proj/v_proj/o_proj (Llama, Mistral, Qwen2, ...), "
    "GPT-2 attention with a fused c_attn and c_proj, torch.nn.MultiheadAttention, or (with "
    "predicate=) a module with q_proj/k_proj/v_proj or a fused qkv/Wqkv Linear, an output "
    "projection (o_proj/out_proj/proj) and a num_heads/n_head/num_attention_heads attribute"
)

_HEAD_ATTRS = ("num_heads", "n_heads", "n_head", "num_attention_heads")
_OUT_NAMES = ("o_proj", "out_proj", "proj", "c_proj")
_FUSED_NAMES = ("qkv", "Wqkv", "qkv_proj")


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

    @property
    def parent_and_attr(self) -> tuple[str, str]:
        parent, _, attr = self.name.rpartition(".")
        return parent, attr


def find_attention(
    model: nn.Module, predicate: Callable[[str, nn.Module], bool] | None = None
) -> list[AttentionSite]:
    """Every attention module of ``model`` in module order (outer modules win, no nesting).

    With ``predicate(name, module) -> bool`` only the modules it picks are taken; each must still
    have a recognisable structure (see ``LOOKED_FOR``), else ValueError names what is missing.
    """
    sites: list[AttentionSite] = []
    taken: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(p + ".") for p in taken):
            continue
        if predicate is not None:
            if not predicate(name, module):
                continue
            family = classify(module, allow_generic=True)
            if family is None:
                raise ValueError(
                    f"predicate picked {name!r} ({type(module).__name__}) but its structure is not "
                    f"recognised; looked for {LOOKED_FOR}"
                )
        else:
            family = classify(module, allow_generic=False)
            if family is None:
                continue
        sites.append(_describe(len(sites), name, module, family))
        taken.append(name)
    return sites


def classify(module: nn.Module, allow_generic: bool) -> str | None:
    """The family of an attention module, or None when it is not one we can convert."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    if _has(module, "q_proj", "k_proj", "v_proj", "o_proj") and hasattr(module, "head_dim"):
        return "llama"
    if _has(module, "c_attn", "c_proj") and not getattr(module, "is_cross_attention", False):
        if hasattr(module, "num_heads") and hasattr(module, "split_size"):
            return "gpt2"
    if allow_generic and _head_count(module) is not None and _out_proj(module) is not None:
        if _has(module, "q_proj", "k_proj", "v_proj") or _fused_qkv(module) is not None:
            return "generic"
    return None


def _has(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, n, None), nn.Module) for n in names)


def _head_count(module: nn.Module) -> int | None:
    for attr in _HEAD_ATTRS:
        value = getattr(module, attr, None)
        if isinstance(value, int) and value > 0:
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
        kv_heads = heads
    else:
        heads = _head_count(module)
        width = (
            module.q_proj.out_features
            if hasattr(module, "q_proj")
            else getattr(module, _fused_qkv(module)).out_features // 3
        )
        dim = width // heads
        kv_heads = module.k_proj.out_features // dim if hasattr(module, "k_proj") else heads
    layer_idx = getattr(module, "layer_idx", None)
    window = getattr(module, "sliding_window", None)
    return AttentionSite(
        index=index,
        name=name,
        family=family,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=dim,
        cache_index=layer_idx if isinstance(layer_idx, int) else index,
        sliding_window=window if isinstance(window, int) and window > 0 else None,
    )


def round_half_up(x: float) -> int:
    # NOTE: not round(): Python rounds half to even, so ratio=0.5 of 3 layers would give 2.
    return int(math.floor(x + 0.5 + 1e-9))


def select_layers(num_layers: int, ratio: float, placement) -> list[int]:
    """Indices (into the attention modules found) that become retention.

    ``placement``: "front" (the first round(ratio * L) layers), "back" (the last ones),
    "interleave:N" (in every group of N consecutive layers the first N - 1 are converted and the
    last keeps attention; ``ratio`` is ignored), or an explicit list of layer indices.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
        raise ValueError(f"ratio (fraction of layers converted) must be in [0, 1], got {ratio!r}")
    if isinstance(placement, (list, tuple, range)):
        return _explicit(num_layers, list(placement))
    count = round_half_up(ratio * num_layers)
    if placement == "front":
        return list(range(count))
    if placement == "back":
        return list(range(num_layers - count, num_layers))
    if isinstance(placement, str) and placement.startswith("interleave:"):
        period = placement.partition(":")[2]
        if not period.isdigit() or int(period) < 2:
            raise ValueError(
                f"interleave needs a period N >= 2 ('interleave:4'), got {placement!r}"
            )
        n = int(period)
        return [i for i in range(num_layers) if (i + 1) % n != 0]
    raise ValueError(
        "placement must be 'front', 'back', 'interleave:N' or a list of layer indices, "
        f"got {placement!r}"
    )


def _explicit(num_layers: int, indices: list) -> list[int]:
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, int) or not -num_layers <= i < num_layers:
            raise ValueError(
                f"layer index {i!r} is out of range for {num_layers} attention layers "
                f"(expected 0..{num_layers - 1})"
            )
    return sorted({i % num_layers for i in indices})
