"""Reference Retention-Transformer hybrid modules in plain PyTorch (no compiler imports).

from rtpcompile.nn import RTPHybridLM, default_model
model = default_model()                    # type B: 4 retention layers, then 2 attention
cache = model.new_cache(batch=1)
logits = model(prompt_ids, cache=cache)    # prefill (parallel retention, full K/V)
logits = model(next_id[:, None], cache=cache)  # decode (recurrent retention, appended K/V)
"""

from __future__ import annotations

from .attention import CausalSelfAttention
from .block import FeedForward, HybridHeadMixer, RTPBlock
from .cache import HybridCache, LayerCache
from .model import LAYOUTS, RTPConfig, RTPHybridLM, default_config, default_model
from .retention import MultiScaleRetention, retnet_decay
from .rotary import apply_rotary, rotary_cos_sin, rotate_qk

__all__ = [
    "CausalSelfAttention",
    "FeedForward",
    "HybridCache",
    "HybridHeadMixer",
    "LAYOUTS",
    "LayerCache",
    "MultiScaleRetention",
    "RTPBlock",
    "RTPConfig",
    "RTPHybridLM",
    "apply_rotary",
    "default_config",
    "default_model",
    "retnet_decay",
    "rotary_cos_sin",
    "rotate_qk",
]
