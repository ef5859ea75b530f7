"""Chunked PyTorch implementation of BiGLA: the CPU path and the reference for the Triton kernels.

Each direction is a causal gated linear attention evaluated chunk by chunk: inside a chunk the
decays exp(G_t - G_s) are formed explicitly per key channel (every exponent is <= 0, so nothing
overflows however negative the gates are), and a [K, V] state carries the past between chunks.
The reverse direction is the same computation on the time-reversed sequence with the backward
gates, which is exactly the right-to-left recurrence of the operator's definition.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 64


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
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # Intra-chunk: decay[t, s, c] = exp(G_t - G_s) for s <= t, 0 above the diagonal.
    diff = G[..., :, None, :] - G[..., None, :, :]
    decay = torch.where(causal[:, :, None], diff, diff.new_tensor(float("-inf"))).exp()
    scores = torch.einsum("bhntk,bhnsk,bhntsk->bhnts", q, k, decay)
    out = scores @ v
    # Inter-chunk: the state entering chunk i, read by q_t * exp(G_t).
    q_in = q * G.exp()
    k_out = k * (G[..., -1:, :] - G).exp()
    chunk_decay = G[..., -1, :].exp()  # [B, H, N, K]
    state = q.new_zeros(B, H, K, V)
    inter = []
    for i in range(n):
        inter.append(q_in[:, :, i] @ state)
        state = state * chunk_decay[:, :, i, :, None] + k_out[:, :, i].transpose(-1, -2) @ v[:, :, i]
    out = out + torch.stack(inter, dim=2)
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
