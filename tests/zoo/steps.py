"""Positives with a state: one recurrent decoding step, and one chunk of the chunkwise form.

State layout is (K, V) unless the class says (V, K): S' = gamma * S + k^T v, o = scale * q S'.
Each returns ``(o, new_state)``.
"""

from __future__ import annotations

import torch

from . import ZooModule, positive, randn


class _Step(ZooModule):
    """Base: q, k, v of one token [B, H, 1, D] (or [B, H, D] with ``squeeze``) and a state."""

    squeeze = False
    state_vk = False
    default_T = 1

    def make_inputs(self, seed, T=None):
        gen = torch.Generator().manual_seed(seed)
        B, H, K, V = self.B, self.H, self.K, self.V
        tok = () if self.squeeze else (1,)
        q, k = randn(gen, B, H, *tok, K), randn(gen, B, H, *tok, K)
        v = randn(gen, B, H, *tok, V)
        state = randn(gen, B, H, V, K) if self.state_vk else randn(gen, B, H, K, V)
        return q, k, v, state

    def oracle(self, ref, q, k, v, state):
        if self.squeeze:
            q, k, v = (x.unsqueeze(2) for x in (q, k, v))
        if self.state_vk:
            state = state.transpose(-1, -2)
        o, new_state = ref.reference_recurrent(q, k, v, self.gamma, self.scale, state)
        if self.squeeze:
            o = o.squeeze(2)
        return o, new_state.transpose(-1, -2) if self.state_vk else new_state


@positive
class RecurrentStepMatmul(_Step):
    """Recurrent step: S' = gamma*S + k.transpose(-1,-2) @ v ; o = q @ S' (state (K, V))."""

    def forward(self, q, k, v, state):
        state = self.gamma[:, None, None] * state + k.transpose(-1, -2) @ v
        return (q @ state) * self.scale, state


@positive
class RecurrentStepEinsum(_Step):
    """Recurrent step with einsum for the outer product and the read-out, tokens [B, H, D]."""

    squeeze = True

    def forward(self, q, k, v, state):
        g = self.gamma.view(1, -1, 1, 1)
        state = g * state + torch.einsum("bhk,bhv->bhkv", k, v)
        return torch.einsum("bhk,bhkv->bhv", q * self.scale, state), state


@positive
class RecurrentStepBroadcast(_Step):
    """Recurrent step, broadcast: k.unsqueeze(-1) * v.unsqueeze(-2); (q.unsqueeze(-1)*S).sum(-2)."""

    squeeze = True

    def forward(self, q, k, v, state):
        state = state * self.gamma[:, None, None] + k.unsqueeze(-1) * v.unsqueeze(-2)
        o = (q.unsqueeze(-1) * state).sum(-2)
        return o * self.scale, state


@positive
class RecurrentStepVK(_Step):
    """Recurrent step with state layout (V, K): S' = gamma*S + v^T k ; o = (S' @ q^T)^T."""

    state_vk = True

    def forward(self, q, k, v, state):
        state = self.gamma[:, None, None] * state + v.transpose(-1, -2) @ k
        o = (state @ (q * self.scale).transpose(-1, -2)).transpose(-1, -2)
        return o, state


@positive
class ChunkStep(_Step):
    """One chunk per call: intra-chunk parallel term + cross term from the state + state update."""

    default_T = 7

    def make_inputs(self, seed, T=None):
        gen = torch.Generator().manual_seed(seed)
        B, H, K, V = self.B, self.H, self.K, self.V
        C = self.default_T if T is None else T
        q, k, v = randn(gen, B, H, C, K), randn(gen, B, H, C, K), randn(gen, B, H, C, V)
        return q, k, v, randn(gen, B, H, K, V)

    def oracle(self, ref, q, k, v, state):
        return ref.reference_parallel(q, k, v, self.gamma, self.scale, state)

    def forward(self, q, k, v, state):
        C = q.shape[2]
        log_g = torch.log(self.gamma)[:, None]
        idx = torch.arange(C, device=q.device)
        diff = idx[:, None] - idx[None, :]
        inner = torch.exp(log_g[..., None] * diff.clamp(min=0)) * (diff >= 0)
        q_decay = torch.exp(log_g * (idx + 1))[..., None]  # [H, C, 1]
        k_decay = torch.exp(log_g * (C - 1 - idx))[..., None]  # [H, C, 1]
        chunk_decay = torch.exp(log_g * C)[..., None]  # [H, 1, 1]
        o = (q @ k.transpose(-1, -2) * inner) @ v + (q * q_decay) @ state
        new_state = chunk_decay * state + (k * k_decay).transpose(-1, -2) @ v
        return o * self.scale, new_state
