"""Per-token recurrence for BiGLA: the test oracle. Slow by design; never used by models."""
from __future__ import annotations

import torch


def naive_recurrent_bigla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g_fwd: torch.Tensor,
    g_bwd: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """Literal transcription of the operator's definition (DESIGN.md), in float32.

    S_t = diag(exp(g_fwd[t])) S_{t-1} + k_tᵀ v_t (left to right),
    R_t = diag(exp(g_bwd[t])) R_{t+1} + k_tᵀ v_t (right to left),
    o_t = ½ · scale · q_t (S_t + R_t).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    qf, kf, vf, gf, gb = (x.float() for x in (q, k, v, g_fwd, g_bwd))
    out = torch.zeros(B, T, H, V, dtype=torch.float32, device=q.device)
    state = torch.zeros(B, H, K, V, dtype=torch.float32, device=q.device)
    for t in range(T):
        state = state * gf[:, t].exp()[..., None] + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        out[:, t] = out[:, t] + torch.einsum("bhk,bhkv->bhv", qf[:, t], state)
    state = torch.zeros_like(state)
    for t in reversed(range(T)):
        state = state * gb[:, t].exp()[..., None] + kf[:, t, :, :, None] * vf[:, t, :, None, :]
        out[:, t] = out[:, t] + torch.einsum("bhk,bhkv->bhv", qf[:, t], state)
    return (0.5 * scale * out).to(q.dtype)
