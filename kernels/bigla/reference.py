"""Chunked PyTorch implementation of BiGLA: the CPU path and the reference for the Triton kernels.

Each direction is a causal gated linear attention evaluated on chunks of C tokens, with no Python loop:
inside a chunk the decays exp(G_t - G_s) are formed explicitly per key channel, and across chunks the
states are combined with explicit chunk-to-chunk decays exp(Gc_n - Gc_{m+1}). Every exponent is <= 0,
so nothing overflows however negative the gates are. The reverse direction is the same computation on
the time-reversed sequence with the backward gates, which is exactly the right-to-left recurrence of
the operator's definition.

Cost per (batch, head): O(T·C·K) for the intra-chunk decays and O((T/C)²·K·V) for the chunk-to-chunk
state sums, so C = 16 suits sequences up to a few thousand tokens (ViG at 224²: 196 to 3136).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16


def _causal_gla_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, chunk: int) -> torch.Tensor:
    """sum_{s<=t} (q_t * exp(G_t - G_s)) . k_s  v_s for float32 [B, T, H, *] inputs (no scale)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    pad = (-T) % chunk
    if pad:
        # Padding at the end of a causal scan cannot reach earlier outputs; zero gates keep it finite.
        q, k, v, g = (F.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v, g))
    n = (T + pad) // chunk
    # [B, H, N, C, *]
    q, k, v, g = (x.reshape(B, n, chunk, H, x.shape[-1]).permute(0, 3, 1, 2, 4) for x in (q, k, v, g))
    G = g.cumsum(-2)  # inclusive in-chunk cumulative log decay
    neg_inf = G.new_tensor(float("-inf"))

    # Intra-chunk: key s as seen from query t, k_s * exp(G_t - G_s) for s < t, k_t itself on the diagonal
    # and 0 above it, then one batched mat-vec per query (cheaper on CPU than an einsum over [t, s, K]).
    # The diagonal is the constant exp(0) rather than exp(G_t - G_t): its gradient is zero either way, but
    # autograd would form it as x - x with x of order one, and that rounding error swamps the true
    # (exp(g)-sized) gate gradients when the gates are very negative.
    earlier_in_chunk = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    diagonal_or_later = torch.full((chunk, chunk), float("-inf"), device=q.device).triu(1)
    diff = G[..., :, None, :] - G[..., None, :, :]
    decayed_keys = torch.where(earlier_in_chunk[:, :, None], diff, diagonal_or_later[:, :, None]).exp()
    decayed_keys = decayed_keys * k[..., None, :, :]
    scores = (decayed_keys @ q[..., None]).squeeze(-1)  # [B, H, N, C, C]
    out = scores @ v

    # Inter-chunk: chunk m's keys reach chunk n > m through exp(Gc_n - Gc_{m+1}), Gc_n being the
    # log decay from the sequence start to the start of chunk n.
    chunk_log_decay = G[..., -1, :]  # [B, H, N, K]
    end = chunk_log_decay.cumsum(-2)  # Gc_{m+1}
    start = end - chunk_log_decay  # Gc_n
    earlier = torch.ones(n, n, dtype=torch.bool, device=q.device).tril(-1)  # m < n
    between = torch.where(earlier[:, :, None], start[..., :, None, :] - end[..., None, :, :], neg_inf).exp()
    chunk_kv = (k * (chunk_log_decay[..., None, :] - G).exp()).transpose(-1, -2) @ v  # [B, H, N, K, V]
    states = torch.einsum("bhnmk,bhmkv->bhnkv", between, chunk_kv)  # state entering each chunk
    out = out + (q * G.exp()) @ states
    return out.permute(0, 2, 3, 1, 4).reshape(B, n * chunk, H, V)[:, :T]


def chunked_bigla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    scale: float | None = None,
    chunk: int = DEFAULT_CHUNK,
) -> torch.Tensor:
    """BiGLA (see kernels.bigla) in PyTorch ops only; differentiable by autograd; computes in float32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk = min(chunk, max(16, 1 << (q.shape[1] - 1).bit_length()))
    qf, kf, vf, gf, gb = (x.float() for x in (q, k, v, g_fwd, g_bwd))
    fwd = _causal_gla_chunked(qf, kf, vf, gf, chunk)
    flip = lambda x: x.flip(1)  # noqa: E731
    bwd = flip(_causal_gla_chunked(flip(qf), flip(kf), flip(vf), flip(gb), chunk))
    return ((0.5 * scale) * (fwd + bwd)).to(q.dtype)
