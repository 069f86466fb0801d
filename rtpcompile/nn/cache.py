"""Decoding cache for hybrid models: fixed-size retention states, growing attention K/V.

A retention layer keeps S = sum_j gamma^(t-j) k_j^T v_j, a [B, H, K, V] tensor whose size does not
depend on how many tokens were seen (float32, or float64 for a float64 model). An attention layer
keeps every key and value, [B, H, T, D] each, growing by one position per decoded token. A type-C
layer (retention and attention heads in one layer) keeps both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

LAYER_KINDS = ("retention", "attention", "hybrid")


@dataclass
class LayerCache:
    """What one layer remembers between calls.

    ``state``: retention state [B, H_ret, K, V] (retention and hybrid layers), else None.
    ``keys`` / ``values``: attention K and V [B, H_att, T, D] (attention and hybrid layers), None
    until the first forward.
    """

    kind: str
    state: Tensor | None = None
    keys: Tensor | None = None
    values: Tensor | None = None

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"layer kind must be one of {LAYER_KINDS}, got {self.kind!r}")

    def nbytes(self) -> dict[str, int | str]:
        """Bytes held by this layer: {"kind", "state", "kv", "total"}."""
        state = _tensor_bytes(self.state)
        kv = _tensor_bytes(self.keys) + _tensor_bytes(self.values)
        return {"kind": self.kind, "state": state, "kv": kv, "total": state + kv}


def _tensor_bytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class HybridCache:
    """Per-layer caches plus the number of positions already consumed (``seq_len``).

    Build it with ``model.new_cache(batch)``; ``model(ids, cache=cache)`` prefills it and every
    later call continues the sequence from position ``cache.seq_len``. The model checks that a
    cache is its own (layer kinds, batch). There is no reset/crop/``.to()``: build a new cache, or
    keep references to the layers' tensors (calls replace them, never write into them) and
    assign them back, with ``seq_len``, to roll back.
    """

    def __init__(self, layers: list[LayerCache], batch_size: int) -> None:
        self.layers = list(layers)
        self.batch_size = batch_size
        self.seq_len = 0

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerCache:
        return self.layers[index]

    def nbytes(self) -> dict[str, object]:
        """Memory held, by layer and in total.

        Returns ``{"layers": [per-layer dict from LayerCache.nbytes()], "state": int, "kv": int,
        "total": int}``. Retention states have a fixed size; only ``kv`` grows with ``seq_len``.
        """
        per_layer = [layer.nbytes() for layer in self.layers]
        state = sum(int(d["state"]) for d in per_layer)
        kv = sum(int(d["kv"]) for d in per_layer)
        return {"layers": per_layer, "state": state, "kv": kv, "total": state + kv}

    def own_tensors(self) -> HybridCache:
        """Replace every layer's tensors by copies this cache owns; returns the cache.

        Needed between calls of a model compiled with ``mode="reduce-overhead"`` (CUDA graphs):
        a call's new states and K/V are outputs of a CUDA graph, whose memory the next replay of
        that graph overwrites, so feeding them back into the next call fails ("accessing tensor
        output of CUDAGraphs that has been overwritten by a subsequent run"), with the Inductor
        backend as with rtp. ``torch.compiler.cudagraph_mark_step_begin()`` does not help here
        (measured on an H200, 2026-11-25): the outputs must be copied out of the graph's pool.
        Costs one copy of the cache per call (the states are fixed-size; K/V grow with T).
        """
        for layer in self.layers:
            for name in ("state", "keys", "values"):
                t = getattr(layer, name)
                if t is not None:
                    setattr(layer, name, t.clone())
        return self

    def __repr__(self) -> str:
        kinds = ",".join(layer.kind[0].upper() for layer in self.layers)
        sizes = self.nbytes()
        return (
            f"HybridCache(batch={self.batch_size}, seq_len={self.seq_len}, layers=[{kinds}], "
            f"state_bytes={sizes['state']}, kv_bytes={sizes['kv']})"
        )
