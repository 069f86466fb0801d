"""A one-token decoding step of a retention-only RTPHybridLM as a plain module for export.

``DecodeStep(model, position)(input_ids [B, 1], *states) -> (logits [B, 1, vocab], *new_states)``
with one state [B, H, K, V] per layer, so the exported function takes and returns the states.
Rotary angles depend on the position, which is fixed at export time (``position >= 1``).
"""

from __future__ import annotations

from torch import Tensor, nn

from ..nn.cache import HybridCache, LayerCache


class DecodeStep(nn.Module):
    def __init__(self, model: nn.Module, position: int = 1) -> None:
        super().__init__()
        kinds = list(getattr(model, "layer_types", []))
        if not kinds or any(kind != "retention" for kind in kinds):
            raise ValueError(
                f"DecodeStep needs an RTPHybridLM whose layers are all retention, got {kinds}"
            )
        if isinstance(position, bool) or not isinstance(position, int) or position < 1:
            raise ValueError(f"position must be an int >= 1 (tokens already seen), got {position}")
        self.model, self.position = model, position

    def initial_states(self, batch: int) -> list[Tensor]:
        """Zero states, one per layer, shaped as the step expects."""
        cache = self.model.new_cache(batch)
        return [layer.state for layer in cache.layers]

    def forward(self, input_ids: Tensor, *states: Tensor):
        if len(states) != len(self.model.layer_types):
            raise ValueError(f"expected {len(self.model.layer_types)} states, got {len(states)}")
        cache = HybridCache([LayerCache("retention", state=s) for s in states], input_ids.shape[0])
        cache.seq_len = self.position
        logits = self.model(input_ids, cache=cache)
        return (logits, *[layer.state for layer in cache.layers])
