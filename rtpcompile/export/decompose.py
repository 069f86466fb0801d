"""Plain-aten decompositions of ``rtp::retention_fwd``, one per form, traceable by torch.export.

Each function has the op's signature and computes the op's result (o in q's dtype, the final
state in float32 / float64). The chunkwise form is parallel inside chunks of C tokens (O(T * C)
memory, no T x T tensor); across chunks it unrolls the state recurrence when T is fixed, and
applies an [N, N] chunk-decay matrix (N = ceil(T / C)) when T is symbolic, so a dynamic-shape
export keeps T dynamic. The parallel form is dynamic-safe too; the recurrent form unrolls one
step per token (meant for one-token decoding steps) and rejects a symbolic T with a ValueError.
Decays are ``exp(n * log gamma)`` with n >= 0 only, as in the runtime op; gamma = 0 runs as
``MIN_GAMMA`` (as in the op) so that log gamma stays finite (``aten_impl.clamped_log_gamma``).

Causality holds for non-finite values, as in the op: a NaN or inf at position s reaches the rows
t >= s only. Scores above the diagonal are *selected* to 0 (``torch.where``), never multiplied by
0 (0 * inf = NaN); a product of zero weights with later values (the causal scores times v, the
chunk-decay matrix times later chunks' states) reads finite values only, and the rows a
non-finite value reaches are set to NaN afterwards (:func:`_finite`, :func:`_poison`): O(T * V)
elementwise work and one reduction over positions, no scan (``cumsum`` does not import into
torch-mlir's tosa / stablehlo at a symbolic size).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import is_concrete_int, statically_known_true

from ..lowering.aten_impl import accumulation_dtype, clamped_log_gamma

Tensor = torch.Tensor
EXPORT_FORMS = ("chunkwise", "recurrent", "parallel")
DEFAULT_EXPORT_CHUNK = 64


def _decay(log_gamma: Tensor, exponents: Tensor) -> Tensor:
    """gamma_h ** exponents (exponents >= 0, float), shape [H, *exponents.shape]."""
    return torch.exp(log_gamma.reshape(-1, *([1] * exponents.dim())) * exponents)


def _causal_scores(scores: Tensor, log_gamma: Tensor) -> Tensor:
    """scores [..., H, (N,) n, n] times gamma ** (i - j) on and below the diagonal, 0 above.

    NOTE: the part above the diagonal is selected to 0, not multiplied by 0: a NaN or inf in a
    later key (q_t . k_s, s > t) times 0 is NaN and would reach earlier rows.
    """
    n = scores.shape[-1]
    pos = torch.arange(n, dtype=log_gamma.dtype, device=log_gamma.device)
    diff = pos[:, None] - pos[None, :]
    decay = _decay(log_gamma, diff.clamp(min=0))  # [H, n, n]
    if scores.dim() == 5:  # chunked [B, H, N, C, C]: one decay per head for every chunk
        decay = decay[:, None]
    return torch.where(diff >= 0, scores * decay, 0.0)


def _finite(x: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """(x with its non-finite entries zeroed, the index along ``dim`` of each slice's first
    non-finite entry (inf where there is none), keeping ``dim`` as size 1).

    NOTE: ``|x| < inf`` is False for inf and NaN: ``isfinite`` has no torch-mlir lowering to
    linalg or tosa. The first index is a min over ``dim`` (no scan, see the module's note).
    """
    ok = x.abs() < float("inf")
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    idx = torch.arange(x.shape[dim], dtype=x.dtype, device=x.device).reshape(shape)
    first = torch.where(ok, float("inf"), idx).amin(dim=dim, keepdim=True)
    return torch.where(ok, x, 0.0), first


def _poison(x: Tensor, reached: Tensor) -> Tensor:
    """NaN where ``reached`` (a non-finite value that the recurrence would carry there)."""
    return torch.where(reached, float("nan"), x)


def _prepare(q, k, v, gamma, initial_state):
    acc = accumulation_dtype(q.dtype)
    B, H, _, K = q.shape
    state = (
        q.new_zeros(B, H, K, v.shape[-1], dtype=acc)
        if initial_state is None
        else initial_state.to(acc)
    )
    return acc, q.to(acc), k.to(acc), v.to(acc), clamped_log_gamma(gamma.to(acc)), state


def _is_symbolic(n) -> bool:
    """True when ``n`` is a SymInt a dynamic-shape export keeps symbolic (e.g. a Dim on T)."""
    return not is_concrete_int(n)


def _unrolled_states(state, chunk_kv, lg, C: int, N: int) -> Tensor:
    """[B, H, N, K, V]: the state entering each chunk, one unrolled update per chunk."""
    whole = torch.exp(lg * float(C))[:, None, None]
    incoming = []
    for n in range(N):
        incoming.append(state)
        if n < N - 1:
            state = whole * state + chunk_kv[:, :, n]
    return torch.stack(incoming, dim=2)


def _matrix_states(state, chunk_kv, lg, C: int, N) -> Tensor:
    """[B, H, N, K, V]: the same states with no loop over chunks, so N may be symbolic.

    S_n = gamma^(C n) S_0 + sum_{m < n} gamma^(C (n - 1 - m)) chunk_kv_m, as an [N, N] decay
    matrix over chunks (N = ceil(T / C), not T) applied to the flattened chunk states.
    """
    B, H, _, K, V = chunk_kv.shape
    idx = torch.arange(N, dtype=lg.dtype, device=lg.device)
    lag = idx[:, None] - idx[None, :] - 1  # n - 1 - m
    mix = _decay(lg, lag.clamp(min=0) * C) * (lag >= 0).to(lg.dtype)  # [H, N, N]
    # NOTE: mix is 0 for m >= n, and 0 times a later chunk's non-finite state is NaN: the product
    # reads finite states only, and a non-finite entry of chunk m marks that entry of S_n, n > m
    kv, first = _finite(chunk_kv.reshape(B, H, N, K * V), dim=2)
    carried = _poison(mix @ kv, idx[:, None] > first).reshape(B, H, N, K, V)
    return carried + _decay(lg, idx * C)[None, :, :, None, None] * state[:, :, None]


def chunkwise(q, k, v, gamma, scale, initial_state, chunk_size: int = DEFAULT_EXPORT_CHUNK):
    """Parallel inside chunks of C tokens, a state recurrence across them.

    A fixed T unrolls the recurrence (one update per chunk); a symbolic T (a dynamic-shape
    export) uses the loop-free chunk-decay matrix of :func:`_matrix_states`.
    """
    out_dtype = q.dtype
    acc, q, k, v, lg, state = _prepare(q, k, v, gamma, initial_state)
    B, H, T, K = q.shape
    dynamic = _is_symbolic(T)
    # NOTE: min(C, T) on a symbolic T would install a guard on T; pad up to C instead.
    C = max(1, int(chunk_size)) if dynamic else max(1, min(int(chunk_size), T))
    N = (T + C - 1) // C
    last = T - (N - 1) * C  # real tokens in the last chunk
    # NOTE: a symbolic N would meet shape checks that special-case a dim of size 1 and guard
    # N != 1 (failing every T <= C at run time); one extra all-zero chunk keeps the chunk count
    # provably >= 2. Its outputs are cut off and its state is never read.
    chunks = N + 1 if dynamic else N
    q, k, v = (F.pad(x, (0, 0, 0, chunks * C - T)).reshape(B, H, chunks, C, -1) for x in (q, k, v))
    pos = torch.arange(C, dtype=acc, device=q.device)

    # [B, H, N, C, K] @ [B, H, N, K, C] -> [B, H, N, C, C]; then @ [B, H, N, C, V] with finite
    # values only: a non-finite v_s[j] marks column j of the chunk's rows t >= s (later chunks
    # get it through the states)
    v_ok, first = _finite(v, dim=3)
    intra = _poison(_causal_scores(q @ k.transpose(-1, -2), lg) @ v_ok, pos[:, None] >= first)
    # each chunk's keys decayed to the chunk's end: [B, H, N, K, V]
    chunk_kv = (k * _decay(lg, C - 1 - pos)[:, None, :, None]).transpose(-1, -2) @ v
    states = (_matrix_states if dynamic else _unrolled_states)(state, chunk_kv, lg, C, chunks)
    inter = (q * _decay(lg, pos + 1)[:, None, :, None]) @ states
    o = (intra + inter).reshape(B, H, chunks * C, -1)[:, :, :T] * scale

    # the last chunk's real keys decayed to position T - 1 (padded keys are zero)
    tail = (last - 1 - pos).clamp(min=0)
    last_kv = (k.select(2, N - 1) * _decay(lg, tail)[..., None]).transpose(-1, -2) @ v.select(
        2, N - 1
    )
    final = torch.exp(lg * last)[:, None, None] * states.select(2, N - 1) + last_kv
    return o.to(out_dtype), final


def recurrent(q, k, v, gamma, scale, initial_state):
    """S_t = gamma S_{t-1} + k_t^T v_t, o_t = scale q_t S_t, one unrolled step per token."""
    if _is_symbolic(q.shape[2]):
        raise ValueError(
            "the recurrent decomposition unrolls one step per token and needs a fixed sequence "
            f"length, got a symbolic T ({q.shape[2]}); export with a fixed T (e.g. a one-token "
            "decoding step) or use form='chunkwise' or 'parallel', which accept a dynamic T"
        )
    out_dtype = q.dtype
    acc, q, k, v, lg, state = _prepare(q, k, v, gamma, initial_state)
    g = torch.exp(lg)[:, None, None]
    outs = []
    for t in range(q.shape[2]):
        state = g * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(q[:, :, t, None, :] @ state)  # [B, H, 1, V]
    o = torch.cat(outs, dim=2) * scale
    return o.to(out_dtype), state


def parallel(q, k, v, gamma, scale, initial_state):
    """scale * ((Q K^T) * D) V plus the incoming state: a T x T score matrix."""
    out_dtype = q.dtype
    acc, q, k, v, lg, state = _prepare(q, k, v, gamma, initial_state)
    T = q.shape[2]
    pos = torch.arange(T, dtype=acc, device=q.device)
    v_ok, first = _finite(v, dim=2)  # the op's: a non-finite v_s[j] marks column j, rows >= s
    o = _causal_scores(q @ k.transpose(-1, -2), lg) @ v_ok
    o = _poison((o + (q * _decay(lg, pos + 1)[..., None]) @ state) * scale, pos[:, None] >= first)
    final = (k * _decay(lg, T - 1 - pos)[..., None]).transpose(-1, -2) @ v
    final = final + torch.exp(lg * T)[:, None, None] * state
    return o.to(out_dtype), final


def _retention_fwd_as(
    form: str, chunk_size: int, q, k, v, gamma, scale, s0, _form, _chunk, output_final_state=True,
    runtime_options="",
):  # fmt: skip
    # NOTE: the export's form wins over the one recorded in the op (usually "auto", which the
    # runtime planner resolves from real shapes); an explicit chunk size in the op is kept.
    o, final = _decomposed(form, chunk_size, q, k, v, gamma, scale, s0, _chunk)
    if not output_final_state:  # the op's own result: an empty tensor in the state's dtype
        return o, final.new_empty((0,))
    return o, final


def _decomposed(form: str, chunk_size: int, q, k, v, gamma, scale, s0, _chunk):
    if statically_known_true(q.shape[2] == 0):
        acc = accumulation_dtype(q.dtype)
        B, H, _, K = q.shape
        state = q.new_zeros(B, H, K, v.shape[-1], dtype=acc) if s0 is None else s0.to(acc)
        return q.new_zeros(B, H, 0, v.shape[-1]), state
    if form == "chunkwise":
        return chunkwise(q, k, v, gamma, scale, s0, _chunk if _chunk > 0 else chunk_size)
    if form == "recurrent":
        return recurrent(q, k, v, gamma, scale, s0)
    return parallel(q, k, v, gamma, scale, s0)


def decomposition_table(form: str, chunk_size: int = DEFAULT_EXPORT_CHUNK) -> dict:
    """{torch.ops.rtp.retention_fwd.default: <the form's plain-aten implementation>}."""
    if form not in EXPORT_FORMS:
        raise ValueError(f"form must be one of {list(EXPORT_FORMS)}, got {form!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    from ..lowering import custom_ops  # noqa: F401  (registers torch.ops.rtp.*)

    fn = functools.partial(_retention_fwd_as, form, chunk_size)
    return {torch.ops.rtp.retention_fwd.default: fn}
