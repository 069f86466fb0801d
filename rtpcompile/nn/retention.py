"""Multi-scale retention (RetNet, Sun et al. 2023) written the way the paper writes it.

Whole sequences use the parallel form ``Retention(X) = (Q K^T * D) V`` with the decay mask
``D[h, n, m] = gamma_h^(n - m)`` for ``n >= m`` and 0 above the diagonal, rebuilt in the graph on
every call; a sequence continued from a state uses the recurrent form
``S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n`` for one token, and for several the parallel
form among them plus the state's decayed part (one chunk step). Layout [B, H, T, D].
This module is plain PyTorch: the ``rtp`` compiler backend recognises these spellings and swaps
in its own kernels; nothing here knows about it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (
    check_bool,
    check_divisible,
    check_offset,
    check_positive,
    check_positive_number,
)
from .cache import LayerCache
from .rotary import rotate_qk


def retnet_decay(num_heads: int) -> Tensor:
    """gamma_h = 1 - 2^(-5 - h), the per-head decays of RetNet, as float64 [H]."""
    return 1.0 - torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float64))


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Retention states accumulate in float32 (float64 for a float64 model)."""
    return torch.promote_types(dtype, torch.float32)


def _state_precision(like: Tensor):
    """Autocast off: under ``torch.autocast`` the state's products would run in bfloat16/float16,
    and the state is float32 (float64 for float64 inputs) however the model runs."""
    return torch.autocast(like.device.type, enabled=False)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


class MultiScaleRetention(nn.Module):
    """MSR(X) = W_O (swish(X W_G) * GroupNorm(Retention_1(X), ..., Retention_H(X))).

    Args:
        dim: model width.
        num_heads: retention heads H, each with its own decay gamma_h = 1 - 2^(-5 - h).
        head_dim_k: query/key width K per head; default ``dim // num_heads``; must be even when
            ``rotary`` is on.
        head_dim_v: value width V per head; default ``2 * head_dim_k`` as in RetNet.
        rotary: rotate q and k by position (xPos-style relative position, rotate-half).
        gate: multiply by ``silu(x W_G)`` before the output projection.
        group_norm: GroupNorm with one group per head on the retention output.
        learnable_decay: make the decays trainable; they are then ``sigmoid(decay_logit)`` so they
            stay inside (0, 1). Otherwise ``log_gamma`` is a fixed buffer.
        bias: bias in the projections.
        out_proj: apply W_O; when False the module returns the gated [B, T, H * V] features
            (used by the type-C head-mixing layer, which projects them together with attention).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim_k: int | None = None,
        head_dim_v: int | None = None,
        *,
        rotary: bool = True,
        rope_base: float = 10000.0,
        gate: bool = True,
        group_norm: bool = True,
        learnable_decay: bool = False,
        bias: bool = False,
        out_proj: bool = True,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        check_positive("dim", dim)
        check_positive("num_heads", num_heads)
        if head_dim_k is None:
            check_divisible(dim, num_heads)
            head_dim_k = dim // num_heads
        head_dim_v = 2 * head_dim_k if head_dim_v is None else head_dim_v
        check_positive("head_dim_k", head_dim_k)
        check_positive("head_dim_v", head_dim_v)
        for name, flag in (
            ("rotary", rotary),
            ("gate", gate),
            ("group_norm", group_norm),
            ("learnable_decay", learnable_decay),
            ("bias", bias),
            ("out_proj", out_proj),
        ):
            check_bool(name, flag)
        check_positive_number("rope_base", rope_base)
        check_positive_number("norm_eps", norm_eps)
        if rotary and head_dim_k % 2:
            raise ValueError(f"rotary needs an even head_dim_k, got {head_dim_k}")
        self.dim, self.num_heads = dim, num_heads
        self.head_dim_k, self.head_dim_v = head_dim_k, head_dim_v
        self.rotary, self.rope_base = rotary, rope_base
        self.scale = head_dim_k**-0.5
        hk, hv = num_heads * head_dim_k, num_heads * head_dim_v
        self.q_proj = nn.Linear(dim, hk, bias=bias)
        self.k_proj = nn.Linear(dim, hk, bias=bias)
        self.v_proj = nn.Linear(dim, hv, bias=bias)
        self.g_proj = nn.Linear(dim, hv, bias=bias) if gate else None
        self.group_norm = nn.GroupNorm(num_heads, hv, eps=norm_eps) if group_norm else None
        self.out_proj = nn.Linear(hv, dim, bias=bias) if out_proj else None
        self.out_features = dim if out_proj else hv
        gamma = retnet_decay(num_heads)
        self.learnable_decay = learnable_decay
        if learnable_decay:
            self.decay_logit = nn.Parameter(torch.log(gamma / (1.0 - gamma)).float())
        else:
            self.register_buffer("log_gamma", torch.log(gamma).float())

    def _apply(self, fn, recurse: bool = True):
        # NOTE: .half()/.bfloat16()/.to(dtype) cast every floating buffer; the fixed log_gamma
        # stays float32 instead: log gamma_h is about -2**(-5 - h), float16 rounds 2**-25 and
        # below to 0 (gamma = 1, no decay, from head 20 on) and bfloat16 keeps 8 bits of it.
        before = self._buffers.get("log_gamma")
        super()._apply(fn, recurse)
        after = self._buffers.get("log_gamma")
        if before is not None and after is not None and after.dtype in _LOW_PRECISION:
            if before.dtype not in _LOW_PRECISION:
                self._buffers["log_gamma"] = before.to(device=after.device, dtype=torch.float32)
        return self

    def log_decay(self) -> Tensor:
        """log gamma per head, shape [H] (differentiable when ``learnable_decay``)."""
        # NOTE: in float32 (float64) even after .half()/.bfloat16(): 1 - gamma is as small as
        # 2**-20, and sigmoid/exp in 16 bits would round gamma to 1 (no decay at all).
        if self.learnable_decay:
            return F.logsigmoid(self.decay_logit.to(state_dtype(self.decay_logit.dtype)))
        return self.log_gamma.to(state_dtype(self.log_gamma.dtype))

    @property
    def gamma(self) -> Tensor:
        return self.log_decay().exp()

    # -- the three stages: project, retain (parallel or recurrent), output ----------------------

    def project(self, x: Tensor, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """x [B, T, dim] -> q, k [B, H, T, K] (rotated) and v [B, H, T, V]."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim_k).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.num_heads, self.head_dim_k).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_heads, self.head_dim_v).transpose(1, 2)
        if self.rotary:
            q, k = rotate_qk(q, k, offset, self.rope_base)
        return q, k, v

    def parallel(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The paper's parallel form: ((Q K^T) * scale * D) V, decay mask built right here."""
        T = q.shape[2]
        log_gamma = self.log_decay().to(state_dtype(q.dtype))
        idx = torch.arange(T, device=q.device)
        diff = idx[:, None] - idx[None, :]
        # NOTE: gamma^(n-m) in log space; the clamp keeps exp() finite above the diagonal, where
        # the where() then writes 0. Nothing computes gamma^(-n).
        decay = torch.exp(log_gamma[:, None, None] * diff.clamp(min=0))
        mask = torch.where(diff >= 0, decay, 0.0).to(q.dtype)
        scores = (q @ k.transpose(-1, -2)) * self.scale * mask
        return scores @ v

    def final_state(self, k: Tensor, v: Tensor, state: Tensor | None = None) -> Tensor:
        """S_T = sum_j gamma^(T-1-j) k_j^T v_j + gamma^T S_prev, in the state dtype."""
        T = k.shape[2]
        sdt = state_dtype(k.dtype) if state is None else state.dtype
        with _state_precision(k):
            log_gamma = self.log_decay().to(sdt)
            idx = torch.arange(T, device=k.device, dtype=sdt)
            to_end = torch.exp(log_gamma[:, None] * (T - 1 - idx)[None, :])  # [H, T]
            s = (k.to(sdt) * to_end[:, :, None]).transpose(-1, -2) @ v.to(sdt)
            if state is not None:
                s = s + torch.exp(log_gamma * T)[:, None, None] * state
        return s

    def recurrent(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """S_n = gamma S_{n-1} + k_n^T v_n ; o_n = scale * q_n S_n, looping over the T tokens."""
        sdt = state.dtype
        with _state_precision(q):
            gamma = self.log_decay().to(sdt).exp()[None, :, None, None]
            q, k, v = q.to(sdt), k.to(sdt), v.to(sdt)
            outs = []
            for n in range(q.shape[2]):
                state = gamma * state + k[:, :, n, :, None] * v[:, :, n, None, :]
                outs.append((q[:, :, n, None, :] @ state) * self.scale)  # [B, H, 1, V]
        return torch.cat(outs, dim=2), state

    def chunk_step(self, q: Tensor, k: Tensor, v: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        """T > 1 tokens continuing from ``state`` at once (a prompt after a prefix, a draft to
        verify): the parallel form among them plus the state's part, gamma^(n+1) q_n S, and the
        new state as ``final_state`` gives it. Same result as ``recurrent``, without a T-step
        loop (which Dynamo would also unroll into T steps)."""
        sdt = state.dtype
        with _state_precision(q):
            q, k, v = q.to(sdt), k.to(sdt), v.to(sdt)
            log_gamma = self.log_decay().to(sdt)
            idx = torch.arange(q.shape[2], device=q.device, dtype=sdt)
            from_state = torch.exp(log_gamma[:, None] * (idx + 1))[None, :, :, None]  # [1, H, T, 1]
            y = self.parallel(q, k, v) + ((q * from_state) @ state) * self.scale
            return y, self.final_state(k, v, state)

    def output(self, y: Tensor, x: Tensor) -> Tensor:
        """y [B, H, T, V] -> GroupNorm over heads, swish gate, output projection -> [B, T, dim]."""
        B, H, T, V = y.shape
        y = y.transpose(1, 2).reshape(B, T, H * V)
        if self.group_norm is not None:
            y = self.group_norm(y.reshape(B * T, H * V)).view(B, T, H * V)
        if self.g_proj is not None:
            y = F.silu(self.g_proj(x)) * y
        return self.out_proj(y) if self.out_proj is not None else y

    def forward(
        self,
        x: Tensor,
        state: Tensor | None = None,
        offset: int = 0,
        return_state: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Retention over x [B, T, dim].

        ``state is None``: the sequence starts here (positions ``offset`` ..); the parallel form
        runs on all T tokens at once. Returns ``y`` [B, T, dim], or ``(y, final_state)`` when
        ``return_state``.

        ``state`` given ([B, H, K, V], float32 or float64): the sequence continues from it at
        position ``offset`` (the number of tokens the state has absorbed): the recurrent step for
        one token, ``chunk_step`` for more. Returns ``(y, new_state)``.
        """
        self._check_input(x, state, offset)
        q, k, v = self.project(x, offset)
        if state is None:
            y = self.parallel(q, k, v)
            new_state = self.final_state(k, v) if return_state else None
        elif q.shape[2] == 1:
            y, new_state = self.recurrent(q, k, v, state)
            y = y.to(x.dtype)
        else:
            y, new_state = self.chunk_step(q, k, v, state)
            y = y.to(x.dtype)
        out = self.output(y, x)
        return out if new_state is None else (out, new_state)

    def forward_cached(self, x: Tensor, layer_cache: LayerCache, offset: int) -> Tensor:
        """Run with a layer cache: the parallel form on an empty cache, recurrent afterwards.

        ``offset`` 0 starts the sequence (a state already in the cache is replaced); ``offset`` > 0
        continues from the cached state, which must be there: a missing state there is never a
        fresh start (that would silently drop the ``offset`` earlier tokens).
        """
        state = None
        if offset > 0:
            state = layer_cache.state
            if state is None:
                raise ValueError(
                    f"the cache has no retention state for this layer, but offset={offset} "
                    f"earlier positions should be in it (cache kind {layer_cache.kind!r}): "
                    f"build the cache with model.new_cache(batch) and fill it from position 0"
                )
        out, layer_cache.state = self(x, state=state, offset=offset, return_state=True)
        return out

    def init_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
        """A zero state [B, H, K, V] in the state dtype for a model of ``dtype``."""
        shape = (batch, self.num_heads, self.head_dim_k, self.head_dim_v)
        return torch.zeros(shape, device=device, dtype=state_dtype(dtype))

    def _check_input(self, x: Tensor, state: Tensor | None, offset: int = 0) -> None:
        check_offset(offset)
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"expected x of shape [B, T, {self.dim}], got {tuple(x.shape)}")
        if state is None:
            return
        expected = (x.shape[0], self.num_heads, self.head_dim_k, self.head_dim_v)
        if tuple(state.shape) != expected:
            raise ValueError(f"expected state of shape {expected}, got {tuple(state.shape)}")
        if state.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"the retention state must be float32 or float64 (it accumulates over the whole "
                f"sequence), got {state.dtype}; build it with init_state()"
            )

    def extra_repr(self) -> str:
        gammas = ", ".join(f"{g:.6f}" for g in self.gamma.detach().double().tolist()[:4])
        more = ", ..." if self.num_heads > 4 else ""
        return (
            f"heads={self.num_heads}, head_dim_k={self.head_dim_k}, head_dim_v={self.head_dim_v}, "
            f"gamma=[{gammas}{more}], learnable_decay={self.learnable_decay}"
        )


# NOTE: what code computing a MultiScaleRetention's mixing on its own replaces (export through
# the rtp op, context parallelism): project / output / log_decay it calls as methods, so a
# subclass may override those, but not these
CORE_METHODS = ("forward", "parallel", "recurrent", "chunk_step", "final_state")


def overridden_core(module: MultiScaleRetention) -> list[str]:
    """The ``CORE_METHODS`` that ``module``'s class (or the instance itself) overrides."""
    names = [
        name
        for name in CORE_METHODS
        if getattr(type(module), name) is not getattr(MultiScaleRetention, name)
    ]
    if "forward" in vars(module) and "forward" not in names:
        names.append("forward")
    return names
