"""retrofit(): replace a fraction of a model's attention layers by retention, in place.

handle = rtpcompile.retrofit(model, ratio=0.5, placement="front")
print(model)          # converted layers show as LlamaStyleRetention(retention, layer=0, ...)
print(handle)         # one line per attention layer: converted or kept
handle.undo()         # puts the original modules back (same weight tensors)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .find import (
    LOOKED_FOR,
    AttentionSite,
    SkippedAttention,
    round_half_up,
    select_layers,
    survey,
)
from .layers import CONVERTERS, RetrofitRetention


class RetrofitHandle:
    """What retrofit changed, and the way back.

    ``sites``: every attention layer found; ``converted``: indices (into ``sites``) this call
    made retention; ``earlier``: indices that were retention already (an earlier retrofit; left
    as they are); ``skipped``: attention modules that cannot become retention (cross-attention,
    bidirectional), with the reason; ``modules``: the new modules by site index. ``undo()``
    restores the original modules of this call; the projection weights are shared, so
    parameters changed by end-to-end fine-tuning stay changed.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: list[AttentionSite],
        skipped: list[SkippedAttention] | None = None,
    ) -> None:
        self.model = model
        self.sites = sites
        self.skipped = list(skipped or [])
        self.earlier = [s.index for s in sites if s.converted]
        self.converted: list[int] = []
        self.modules: dict[int, RetrofitRetention] = {}
        self._originals: dict[int, nn.Module] = {}
        self.active = True

    def _parent(self, site: AttentionSite) -> tuple[nn.Module, str]:
        parent_name, attr = site.parent_and_attr
        return (self.model.get_submodule(parent_name) if parent_name else self.model), attr

    def _swap(self, site: AttentionSite, new: nn.Module) -> nn.Module:
        parent, attr = self._parent(site)
        old = getattr(parent, attr)
        setattr(parent, attr, new)
        return old

    def undo(self) -> None:
        """Put every original attention module back; idempotent."""
        if not self.active:
            return
        for i in self.converted:
            self._swap(self.sites[i], self._originals[i])
        self.active = False

    def new_parameters(self) -> list[nn.Parameter]:
        """The decays and output norms retrofit added (stage 1 of ``distill`` trains these)."""
        return [p for m in self.modules.values() for p in m.new_parameters()]

    def retention_cache_layers(self) -> list[int]:
        """Cache indices of the layers that are retention now among this handle's sites: its own
        (until ``undo()``), an earlier and a later retrofit's, read off the model (a module a
        later retrofit's ``predicate=`` found but this handle's survey did not is not among them).

        NOTE: not from ``earlier``: another handle's ``undo()`` turns its layers back into
        attention (a cache that kept a retention slot there stored the layer's keys where
        nothing counted them: logits off by 0.35 until 2026-11-25)."""
        return [
            site.cache_index
            for site in self.sites
            if isinstance(getattr(*self._parent(site)), RetrofitRetention)
        ]

    def new_cache(self):
        """An empty ``RetrofitCache`` for ``model(..., past_key_values=)`` / ``generate``.

        Raises ValueError after ``undo()``: the layers are attention again, so a
        ``transformers.DynamicCache`` (or no ``past_key_values``) is the cache to use.
        """
        from .cache import RetrofitCache, _require_transformers

        if not self.active:
            raise ValueError(
                "handle.new_cache() after handle.undo(): this handle's layers are attention "
                "again, so there is no retention cache to build; pass a plain "
                "transformers.DynamicCache(config=model.config) or no past_key_values"
            )
        _require_transformers()
        return RetrofitCache(getattr(self.model, "config", None), self.retention_cache_layers())

    def __repr__(self) -> str:
        earlier = f", {len(self.earlier)} converted earlier" if self.earlier else ""
        lines = [
            f"RetrofitHandle({len(self.converted)}/{len(self.sites)} attention layers "
            f"converted{earlier}{'' if self.active else ', undone'})"
        ]
        for site in self.sites:
            kind = "retention" if site.index in self.converted else "attention (kept)"
            kind = "retention (converted earlier, left as is)" if site.converted else kind
            lines.append(f"  [{site.index}] {site.name}: {kind}")
        for skip in self.skipped:
            lines.append(f"  [-] {skip.name}: attention (kept, not convertible: {skip.reason})")
        return "\n".join(lines)


def retrofit(
    model: nn.Module,
    ratio: float = 0.5,
    placement="front",
    *,
    head_mix: float | None = None,
    decay="retnet",
    learn_decay: bool = True,
    predicate: Callable[[str, nn.Module], bool] | None = None,
    norm_eps: float = 1e-6,
) -> RetrofitHandle:
    """Convert attention layers of ``model`` to retention in place; returns a ``RetrofitHandle``.

    ratio: fraction of the attention layers converted ("front"/"back").
    placement: "front" (retention first, attention kept at the back), "back", "interleave:N"
        (N - 1 of every N layers converted, the N-th kept) or an explicit list of layer indices.
    head_mix: None converts whole layers; a fraction f in (0, 1) converts f of the heads inside
        each chosen layer (type C: the rest stay softmax attention, K/V cached for them only).
    decay: "retnet" (gamma_h = 1 - 2**(-5 - h)), a sequence/tensor of per-head values, or a
        callable ``num_heads -> gamma``; ``learn_decay`` makes it a trained parameter.
    predicate: ``(name, module) -> bool`` picks the attention modules instead of discovery.

    Only causal self-attention is converted: cross-attention and bidirectional attention
    (``is_causal=False``, ``nn.TransformerEncoderLayer``) are kept and listed in
    ``handle.skipped`` (ValueError when ``predicate`` picks one). Layers an earlier retrofit
    converted count as sites (indices stay those of the original model) and are left as they are.
    """
    if head_mix is not None and not (isinstance(head_mix, (int, float)) and 0 < head_mix <= 1):
        raise ValueError(
            f"head_mix (fraction of retention heads) must be in (0, 1], got {head_mix!r}"
        )
    sites, skipped = survey(model, predicate)
    if not sites:
        raise ValueError(_nothing_found(model, skipped))
    handle = RetrofitHandle(model, sites, skipped)
    chosen = [i for i in select_layers(len(sites), ratio, placement) if not sites[i].converted]
    for i in chosen:
        _check_head_mix(sites[i], head_mix)
    for i in chosen:
        site = sites[i]
        original = model.get_submodule(site.name)
        new = CONVERTERS[site.family](
            original, site, head_mix=head_mix, decay=decay, learn_decay=learn_decay, eps=norm_eps
        )
        ref = next(original.parameters(), None)
        if ref is not None:
            new.to(device=ref.device)
        new.train(original.training)
        handle._originals[i] = handle._swap(site, new)
        handle.modules[i] = new
        handle.converted.append(i)
    return handle


def _nothing_found(model: nn.Module, skipped: list[SkippedAttention]) -> str:
    if skipped:
        listed = "; ".join(f"{s.name} ({s.kind}): {s.reason}" for s in skipped[:4])
        more = f" (and {len(skipped) - 4} more)" if len(skipped) > 4 else ""
        return (
            f"retrofit found {len(skipped)} attention module(s) in {type(model).__name__} but "
            f"none can become retention: {listed}{more}"
        )
    return (
        f"retrofit found no attention layers in {type(model).__name__}; looked for {LOOKED_FOR}. "
        "Pass predicate=lambda name, module: ... to pick them."
    )


def _check_head_mix(site: AttentionSite, head_mix: float | None) -> None:
    """Refuse a head_mix < 1 that would convert every head of a layer anyway.

    Heads are split in whole K/V groups (a K/V head is either a state or cached K/V), so the
    retention share is round(head_mix * kv_heads) groups, at least one.
    """
    if head_mix is None or head_mix >= 1:
        return
    kv = site.num_kv_heads
    if round_half_up(head_mix * kv) >= kv:
        what = "a single K/V head (MQA)" if kv == 1 else f"{kv} K/V heads"
        raise ValueError(
            f"head_mix={head_mix} cannot split layer {site.index} ({site.name}): it has {what} "
            f"and heads are split in whole K/V groups, so {head_mix} x {kv} rounds to all {kv} "
            f"and every one of its {site.num_heads} heads would become retention. Use "
            f"head_mix=None to convert whole layers"
            + ("" if kv == 1 else f" or head_mix < {(kv - 0.5) / kv:g} to keep some heads")
        )
