"""Fit evaluated mask values to ``c[h, i] * gamma_h ** (i - j) * [i >= j]``."""

from __future__ import annotations

import torch

# Distances at which gamma is read off a mask: powers of two (up to 4096), capped at T - 1.
DISTANCES = tuple(2**k for k in range(13))
# A ratio M[n, 0] / M[n, n] below this is not read as gamma**n (too close to underflow).
_TINY = 2.0**-100


def distances(t, device=None) -> torch.Tensor:
    """The candidate distances for length ``t`` (an int or a SymInt: no guard on its value)."""
    return (2 ** torch.arange(len(DISTANCES), device=device)).clamp_max(t - 1)


def smallest_normal(*dtypes: torch.dtype) -> float:
    """The smallest ratio read as gamma**n for masks of these dtypes: a normal number in each
    (a float16 entry below 2**-14 keeps only a few bits), and at least 2**-100."""
    tiny = [torch.finfo(d).tiny for d in dtypes if d.is_floating_point]
    return max([_TINY, *tiny])


def gamma_at_distances(
    num: torch.Tensor, den: torch.Tensor, n: torch.Tensor, tiny: float = _TINY
) -> torch.Tensor:
    """gamma from ``num = M[.., n, 0]`` and ``den = M[.., n, n]`` at the distances ``n``.

    gamma = (num / den) ** (1 / n) at the longest distance whose ratio is a normal number: one
    rounded mask entry then costs gamma a relative eps / n, where the ratio at distance 1 costs
    eps, which compounds to n * eps at distance n (a bfloat16 mask read at distance 1 was off by
    1% at distance 5). None usable: 1 when T = 1 or the diagonal is 0 (gamma has no effect
    there), else the ratio at distance 1 (a decay below 2**-100). Differentiable, with no
    division by zero or log of zero in the branches not taken.
    """
    ok = den != 0
    ratio = num / torch.where(ok, den, torch.ones_like(den))
    usable = ok & (n > 0) & (ratio >= tiny)
    index = torch.arange(n.shape[-1], device=n.device)
    pick = torch.where(usable, index, -1).amax(-1, keepdim=True)
    none = pick < 0
    pick = pick.clamp(min=0)
    r = torch.where(none, torch.ones_like(pick, dtype=ratio.dtype), ratio.gather(-1, pick))
    d = torch.where(none, 1, n.expand_as(ratio).gather(-1, pick)).to(ratio.dtype)
    gamma = torch.exp(torch.log(r) / d)
    first = torch.where(ok[..., :1] & (n[..., :1] > 0), ratio[..., :1], 1.0)
    gamma = torch.where(none, first, gamma)
    # NOTE: a negative ratio at any distance is no decay (gamma**2 of a negative gamma is
    # positive): returned as gamma, so the op refuses it as it refuses gamma > 1
    lowest = torch.where(ok & (n > 0), ratio, 1.0).amin(-1, keepdim=True)
    return torch.where(lowest < 0, lowest, gamma)[..., 0]


NONFINITE = "the mask has non-finite entries (inf or NaN: inf * 0 is NaN where a factor overflows)"


def _row_blocks(heads: int, t: int):
    """Row ranges of [heads, rows, t] slices of about 64 Ki elements (temporaries stay in L2)."""
    rows = max(1, (1 << 16) // max(1, heads * t))
    return [(r, min(t, r + rows)) for r in range(0, t, rows)]


def fit_decay(
    m: torch.Tensor, t: int, rtol: float, atol: float = 1e-6
) -> tuple[str | None, torch.Tensor, bool]:
    """Fit [heads, t, t] to c[h,i] gamma_h^(i-j) [i>=j]: (reason, gamma, has_row_scale).

    Each element may be off by ``rtol`` of its expected value plus ``atol`` (both relative to
    the row's diagonal c[h, i]).

    NOTE: one pass over blocks of rows in the mask's own precision (float32 at least), so a long
    example length (T = 16384) needs a few MiB, not T x T float64 copies. The expected values
    are never exponentiated per element: gamma^(i-j) [i>=j] is a Toeplitz matrix, read as a
    strided view of one row of 2t-1 powers (see ``_toeplitz_rows``).
    """
    m = m.detach().cpu()
    dtype = torch.float64 if m.dtype == torch.float64 else torch.float32
    heads = m.shape[0]
    gamma = torch.ones(heads, dtype=torch.float64)
    diag = m.diagonal(dim1=-2, dim2=-1).double()
    # NOTE: every comparison with NaN is False: a NaN entry (inf * 0 where gamma ** (i - j)
    # overflows above the diagonal and a product zeroes it) passed every tolerance check
    if not torch.isfinite(diag).all():
        return NONFINITE, gamma, False
    if not (diag > 0).all():
        if (m.abs().amax() > 0) and (torch.triu(m[:, : min(t, 64)], diagonal=1) != 0).any():
            return "the mask is not causal (non-zero above the diagonal)", gamma, False
        return "the mask's diagonal is not positive (not a decay)", gamma, False
    if t >= 2:
        n = distances(t)
        if not (torch.isfinite(m[:, n, 0]).all() and torch.isfinite(m[:, n, n]).all()):
            return NONFINITE, gamma, False
        tiny = smallest_normal(m.dtype)
        gamma = gamma_at_distances(m[:, n, 0].double(), m[:, n, n].double(), n, tiny)
    # NOTE: strictly <= 1, as the op checks at run time (a proof that let 1 + 1e-6 through would
    # compile a model the op then refuses)
    # NOTE: gamma = 0 (a learned decay whose exp underflowed) is a decay the op runs
    if (gamma > 1).any() or not (gamma >= 0).all():
        if bool((torch.triu(m[:, : min(t, 64)], diagonal=1) == 0).all()):
            return f"decay outside [0, 1]: gamma={gamma.tolist()}", gamma, False
        return "the mask is not causal (non-zero above the diagonal)", gamma, False
    c = diag.to(dtype)
    table = _power_table(torch.log(gamma.clamp(min=torch.finfo(torch.float64).tiny)).to(dtype), t)
    for r0, r1 in _row_blocks(heads, t):
        # |m - c E| <= rtol c E + atol c, divided by c > 0; E = gamma^(i-j) [i >= j]
        if not torch.isfinite(m[:, r0:r1]).all():
            return NONFINITE, gamma, False
        expected = _toeplitz_rows(table, t, r0, r1)
        err = (m[:, r0:r1].to(dtype) / c[:, r0:r1, None]).sub_(expected).abs_()
        if not (err <= expected.mul_(rtol).add_(atol)).all():  # NOTE: a NaN error fails
            above = torch.triu(m[:, r0:r1], diagonal=r0 + 1)
            if (above.abs() > 1e-6 * c[:, r0:r1, None]).any():
                return "the mask is not causal (non-zero above the diagonal)", gamma, False
            return "the mask is not gamma**(i-j) below the diagonal", gamma, False
    row_scale = bool(((diag - 1).abs() > 1e-6).any())
    if dtype != torch.float64:  # NOTE: shown by explain() in the mask's precision (0.96875,
        gamma = gamma.float().double()  # not 0.9687499999 from a power read off float32)
    return None, gamma.clamp(max=1.0), row_scale


def _power_table(log_gamma: torch.Tensor, t: int) -> torch.Tensor:
    """[heads, 2t-1]: entry s is gamma^(t-1-s) for s < t, else 0 (the region above the diagonal)."""
    exponents = torch.arange(t - 1, -1, -1, dtype=log_gamma.dtype)
    powers = torch.exp(log_gamma[:, None] * exponents)
    return torch.cat([powers, powers.new_zeros(powers.shape[0], t - 1)], dim=1)


def _toeplitz_rows(table: torch.Tensor, t: int, r0: int, r1: int) -> torch.Tensor:
    """Rows r0..r1 of E[h, i, j] = gamma_h^(i-j) [i >= j], as a fresh tensor.

    With rows counted from the bottom (i' = t-1-i), E[h, i, j] = table[h, i' + j]: a view with
    strides (2t-1, 1, 1) holds every row; flipping the block back copies it once.
    """
    heads = table.shape[0]
    bottom_up = table.as_strided((heads, r1 - r0, t), (2 * t - 1, 1, 1), t - r1)
    return bottom_up.flip(1)


def per_head(mask: torch.Tensor, t: int, batch_ndim: int) -> tuple[str | None, torch.Tensor]:
    """Check the mask's shape [.., t, t] varies over at most the last batch dim; -> [heads,t,t]."""
    if t == 0:
        return "the sequence is empty (T = 0): nothing to prove or to run", mask
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (t, t):
        return f"the mask has shape {tuple(mask.shape)}, expected [..., {t}, {t}]", mask
    batch = mask.shape[:-2]
    if len(batch) > batch_ndim:
        return "the mask has more dimensions than the scores", mask
    if any(size != 1 for size in batch[:-1]):
        return "the mask varies over a batch dimension other than the heads", mask
    return None, mask.reshape(-1, t, t)
