"""RTPHybridLM: a decoder-only language model mixing retention and attention.

Layouts follow the Retformer paper (Retformers, sec. 3) with ``ratio`` = the fraction of
retention (the paper's attention-retention ratio chi corresponds to ``ratio = 1 / (1 + chi)``):

- "A": attention layers first, retention layers last;
- "B": retention layers first, attention layers last (the RTP layout, default);
- "C": every layer holds both, ``round(ratio * num_heads)`` retention heads and the rest
  attention heads, concatenated and projected together.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    check_bool,
    check_choice,
    check_divisible,
    check_positive,
    check_positive_number,
)
from .block import FFNS, NORMS, RTPBlock, make_norm
from .cache import HybridCache, LayerCache

LAYOUTS = ("A", "B", "C")


@dataclass(frozen=True)
class RTPConfig:
    """Everything that defines an RTPHybridLM; validated on construction (ValueError)."""

    vocab_size: int = 256
    dim: int = 256
    num_layers: int = 6
    num_heads: int = 8
    layout: str = "B"
    ratio: float = 2 / 3
    head_dim_v: int | None = None  # retention value width per head; None -> 2 * dim // heads
    ffn: str = "swiglu"
    ffn_mult: float = 8 / 3
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    rotary: bool = True
    rope_base: float = 10000.0
    gate: bool = True
    group_norm: bool = True
    learnable_decay: bool = False
    bias: bool = False
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "num_layers", "num_heads"):
            check_positive(name, getattr(self, name))
        check_divisible(self.dim, self.num_heads)
        check_choice("layout", self.layout, LAYOUTS)
        check_choice("ffn", self.ffn, FFNS)
        check_choice("norm", self.norm, NORMS)
        ratio = self.ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1:
            raise ValueError(f"ratio (fraction of retention) must be in [0, 1], got {ratio!r}")
        if self.head_dim_v is not None:  # checked even when no layer is retention
            check_positive("head_dim_v", self.head_dim_v)
        for name in ("norm_eps", "rope_base", "ffn_mult"):
            check_positive_number(name, getattr(self, name))
        for name in ("rotary", "gate", "group_norm", "learnable_decay", "bias", "tie_embeddings"):
            check_bool(name, getattr(self, name))

    def layer_plan(self) -> list[tuple[str, int]]:
        """(mixer kind, retention heads) per layer, first layer first."""
        if self.layout == "C":
            r = _round_half_up(self.ratio * self.num_heads)
            kind = "attention" if r == 0 else "retention" if r == self.num_heads else "hybrid"
            return [(kind, r)] * self.num_layers
        n_ret = _round_half_up(self.ratio * self.num_layers)
        ret = [("retention", self.num_heads)] * n_ret
        att = [("attention", 0)] * (self.num_layers - n_ret)
        return ret + att if self.layout == "B" else att + ret


def _round_half_up(x: float) -> int:
    # NOTE: not round(): Python rounds half to even, which would make ratio=0.5 of 3 layers 2.
    return int(math.floor(x + 0.5 + 1e-9))


class RTPHybridLM(nn.Module):
    """Embedding -> blocks (per ``config.layer_plan()``) -> final norm -> LM head.

    ``RTPHybridLM(vocab_size, dim, num_layers, num_heads, layout="B", ratio=2/3, **options)``
    where options are the other fields of :class:`RTPConfig`. ``model.config`` holds them all,
    ``model.layer_types`` lists "retention" / "attention" / "hybrid" per layer.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        num_layers: int,
        num_heads: int,
        layout: str = "B",
        ratio: float = 2 / 3,
        **options,
    ) -> None:
        super().__init__()
        valid = {f.name for f in dataclasses.fields(RTPConfig)}
        unknown = sorted(set(options) - valid)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; valid options: {sorted(valid)}")
        self.config = RTPConfig(vocab_size, dim, num_layers, num_heads, layout, ratio, **options)
        cfg = self.config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.blocks = nn.ModuleList(
            _make_block(cfg, kind, heads) for kind, heads in cfg.layer_plan()
        )
        self.norm = make_norm(cfg.norm, cfg.dim, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, False)

    @classmethod
    def from_config(cls, config: RTPConfig) -> RTPHybridLM:
        fields = dataclasses.asdict(config)
        pos = [fields.pop(n) for n in ("vocab_size", "dim", "num_layers", "num_heads")]
        return cls(*pos, **fields)

    @classmethod
    def default(cls) -> RTPHybridLM:
        """The small type-B byte-level model of the demo (see :func:`default_config`)."""
        return cls.from_config(default_config())

    @property
    def layer_types(self) -> list[str]:
        return [block.kind for block in self.blocks]

    def forward(self, input_ids: Tensor, cache: HybridCache | None = None) -> Tensor:
        """input_ids [B, T] (integer) -> logits [B, T, vocab_size].

        With ``cache`` the tokens continue the cached sequence at position ``cache.seq_len``
        and the cache is updated: an empty cache is prefilled (parallel retention, full K/V),
        a filled one is extended (recurrent retention, appended K/V). A call that raises
        (an out-of-memory error in a later layer or the head, an interrupt) leaves the cache as
        it was, so the same call can be retried.
        """
        _check_input_ids(input_ids)
        if cache is None:
            return self._logits(input_ids, [None] * len(self.blocks), 0)
        _check_cache(cache, input_ids, self.layer_types)
        offset = cache.seq_len
        # NOTE: each layer replaces its cache's tensors (never writes into them): keeping the
        # old references is the whole undo, for a failure in any layer or in the head
        before = [(lc.state, lc.keys, lc.values) for lc in cache.layers]
        try:
            logits = self._logits(input_ids, cache.layers, offset)
        except BaseException:
            for lc, (state, keys, values) in zip(cache.layers, before, strict=True):
                lc.state, lc.keys, lc.values = state, keys, values
            raise
        cache.seq_len += input_ids.shape[1]
        return logits

    def _logits(self, input_ids: Tensor, layer_caches: list, offset) -> Tensor:
        x = self.embed(input_ids)
        for block, layer_cache in zip(self.blocks, layer_caches, strict=True):
            x = block(x, layer_cache, offset)
        x = self.norm(x)
        if self.lm_head is None:
            return F.linear(x, self.embed.weight)
        return self.lm_head(x)

    def new_cache(self, batch: int, device: torch.device | None = None) -> HybridCache:
        """An empty cache for ``batch`` sequences (retention states are allocated now, zeroed)."""
        check_positive("batch", batch)
        weight = self.embed.weight
        device = weight.device if device is None else device
        layers = [b.new_layer_cache(batch, device, weight.dtype) for b in self.blocks]
        return HybridCache(layers, batch)

    @torch.no_grad()
    def generate_greedy(self, input_ids: Tensor, max_new_tokens: int, cache: bool = True) -> Tensor:
        """Append ``max_new_tokens`` argmax tokens to input_ids [B, T]; returns [B, T + new].

        ``cache=True`` prefills a HybridCache once and then decodes one token per call;
        ``cache=False`` reruns the whole sequence every step (the slow reference).
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(
                f"input_ids must be [B, T] with T >= 1 (a prompt to continue), got shape "
                f"{tuple(input_ids.shape)}"
            )
        ids = input_ids
        state = self.new_cache(ids.shape[0], ids.device) if cache else None
        step_input = ids
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=state) if cache else self(ids)
            next_id = logits[:, -1].argmax(dim=-1, keepdim=True)
            ids = torch.cat([ids, next_id.to(ids.dtype)], dim=1)
            step_input = next_id
        return ids


def _make_block(cfg: RTPConfig, kind: str, retention_heads: int) -> RTPBlock:
    return RTPBlock(
        cfg.dim,
        cfg.num_heads,
        kind,
        retention_heads=retention_heads if kind == "hybrid" else None,
        head_dim_v=cfg.head_dim_v,
        ffn=cfg.ffn,
        ffn_mult=cfg.ffn_mult,
        norm=cfg.norm,
        norm_eps=cfg.norm_eps,
        rotary=cfg.rotary,
        rope_base=cfg.rope_base,
        gate=cfg.gate,
        group_norm=cfg.group_norm,
        learnable_decay=cfg.learnable_decay,
        bias=cfg.bias,
    )


# NOTE: the token ids nn.Embedding takes (bool, uint8, int16 ... fail deep inside it)
INDEX_DTYPES = (torch.int64, torch.int32)


def _check_input_ids(input_ids) -> None:
    if not isinstance(input_ids, Tensor):
        raise TypeError(
            f"input_ids must be a tensor of token ids [B, T], got {type(input_ids).__name__}"
        )
    if input_ids.dim() != 2 or input_ids.dtype not in INDEX_DTYPES:
        raise ValueError(
            f"expected integer input_ids of shape [B, T] (torch.long or torch.int32), got "
            f"{tuple(input_ids.shape)} {input_ids.dtype}"
        )


def _check_cache(cache: HybridCache, input_ids: Tensor, layer_types: list[str]) -> None:
    """The cache must be this model's: one LayerCache per layer, of that layer's kind, for this
    batch. Python metadata only (no tensor values): under torch.compile these checks become
    guards on the cache object, not graph breaks."""
    if not isinstance(cache, HybridCache):
        raise TypeError(
            f"cache must be a HybridCache (build it with model.new_cache(batch)), got "
            f"{type(cache).__name__}"
        )
    num_layers = len(layer_types)
    if len(cache) != num_layers:
        raise ValueError(f"cache has {len(cache)} layers, expected {num_layers}")
    if cache.batch_size != input_ids.shape[0]:
        raise ValueError(
            f"cache was built for batch {cache.batch_size}, got input_ids with batch "
            f"{input_ids.shape[0]}"
        )
    for i, (layer, kind) in enumerate(zip(cache.layers, layer_types, strict=True)):
        if not isinstance(layer, LayerCache):
            raise TypeError(f"cache layer {i} must be a LayerCache, got {type(layer).__name__}")
        if layer.kind != kind:
            got = [getattr(lc, "kind", type(lc).__name__) for lc in cache.layers]
            raise ValueError(
                f"cache layer {i} is of kind {layer.kind!r} but the model's layer {i} is "
                f"{kind!r}: the cache was built by a model with another layer plan (cache "
                f"{got}, model {layer_types}); build it with model.new_cache(batch)"
            )


def default_config() -> RTPConfig:
    """Byte vocabulary, dim 256, 6 layers of 8 heads, type B with 4 retention + 2 attention."""
    return RTPConfig(vocab_size=256, dim=256, num_layers=6, num_heads=8, layout="B", ratio=2 / 3)


def default_model() -> RTPHybridLM:
    """The small default type-B model used by the demo (about 5.9 M parameters)."""
    return RTPHybridLM.default()
