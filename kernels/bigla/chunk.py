"""Triton kernels for BiGLA: both directions of gated linear attention in one chunked pass.

Layout is token-major, [B, T, H, K] for q, k and the log gates, [B, T, H, V] for v, o.
The sequence is cut into chunks of BT tokens, each chunk into sub-chunks of BC tokens.

For a chunk, the output needs
- the forward state entering it from the left, S = sum_{u < c0} exp(F_{c0-1} - F_u) k_u v_u^T, and the
  backward state entering it from the right, R = sum_{u > c1} exp(B_{c1+1} - B_u) k_u v_u^T;
- the token pairs inside the chunk: off-diagonal sub-chunk pairs as matrix products whose exponents are
  taken relative to the sub-chunk edge between them (so every exponent is <= 0 and nothing can overflow,
  however negative the gates are); diagonal sub-chunks either as a matrix product around a reference row
  in the middle of the sub-chunk (when its total decay is small enough that exp() of the half-decay
  stays finite) or element by element (always safe).
Both directions read the same q/k/v tiles.

Where the states come from:
- short sequences (at most MAX_RECOMPUTED_CHUNKS chunks: ViG at 224^2 has T = 196) recompute them inside
  each chunk's program by scanning its neighbours: one launch, no state tensor in memory;
- long sequences run a state-scan kernel first (one program per (batch, head, direction)), which writes
  the state entering every chunk, and the chunk programs read it.

The backward pass recomputes the states the same way (nothing but the inputs is saved) and produces dq,
dk, dv and both gate gradients in one chunk-parallel kernel. The gate gradients are suffix sums of
q*dq - k*dk per direction; the part coming from tokens right of a chunk equals sum_v(dState * State) at
its right edge, so each chunk finishes its gate gradients alone.
"""
from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from kernels.triton_utils import INTERPRET, output_buffer

CHUNK = 64  # BT: tokens per chunk
SUB_CHUNK = 16  # BC: tokens per sub-chunk (the smallest tile tl.dot accepts)
MAX_RECOMPUTED_CHUNKS = 4  # T <= 256: states recomputed in the chunk programs, no state-scan launch
# A diagonal sub-chunk is done with tensor cores when its total log decay is at least -DIAG_MATMUL_LIMIT
# in every channel: exponents around its middle row then stay within +-DIAG_MATMUL_LIMIT, far from fp32
# overflow (88). ViG's gates (logsigmoid(z) / 16) never come close; steeper gates take the exact path.
DIAG_MATMUL_LIMIT = 40.0


# Keep autotuning results in Triton's cache directory where this Triton can (3.2+): later processes skip it.
AUTOTUNE_CACHE = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def _autotune_configs(stages: tuple[int, ...]) -> list[triton.Config]:
    # The interpreter cannot benchmark configs (no GPU driver); VIG_BIGLA_AUTOTUNE=0 skips the search
    # where compile time matters more than speed (tests).
    if INTERPRET or os.environ.get("VIG_BIGLA_AUTOTUNE", "1") == "0":
        return [triton.Config({}, num_warps=4, num_stages=stages[0])]
    return [triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in stages]


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b on fp32 operands: tf32 tensor cores for 16-bit inputs, tf32x3 (fp32-accurate) for fp32 inputs.

    Rounding the operands to bf16 instead (decayed keys, scores, states) costs about 2e-3 relative error
    per operand, which the 5e-3 accuracy target cannot absorb; tf32 keeps 10 mantissa bits.
    """
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _load_rows(ptr, base, row0, T, stride, cols, col_mask, NROWS: tl.constexpr):
    """Rows row0 .. row0+NROWS-1 of a token-major tensor as fp32; rows past T and masked columns read 0."""
    rows = row0 + tl.arange(0, NROWS)
    mask = (rows < T)[:, None] & col_mask[None, :]
    return tl.load(ptr + base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, base, row0, T, stride, cols, col_mask, value, NROWS: tl.constexpr):
    rows = row0 + tl.arange(0, NROWS)
    mask = (rows < T)[:, None] & col_mask[None, :]
    tl.store(ptr + base + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scan_step(h, x_ptr, x_base, x_stride, g_ptr, g_base, g_stride, y_ptr, y_base, y_stride, chunk, T,
               o_k, m_k, o_v, m_v, BT: tl.constexpr, REVERSE: tl.constexpr, INCLUSIVE: tl.constexpr,
               PRECISION: tl.constexpr):
    """Carry a [K, V] state across one chunk: h <- diag(exp(sum of the chunk's gates)) h + (x * decay)^T y.

    Left to right (REVERSE False) the decay of token t runs to the chunk's last token, right to left to its
    first; INCLUSIVE says whether token t's own gate is part of it. The four states of BiGLA are:
    forward state (k, v, g_fwd, left to right, exclusive), backward state (k, v, g_bwd, right to left,
    exclusive), gradient of the forward state (q, do, g_fwd, right to left, inclusive) and gradient of the
    backward state (q, do, g_bwd, left to right, inclusive).
    """
    x = _load_rows(x_ptr, x_base, chunk * BT, T, x_stride, o_k, m_k, BT)
    g = _load_rows(g_ptr, g_base, chunk * BT, T, g_stride, o_k, m_k, BT)
    y = _load_rows(y_ptr, y_base, chunk * BT, T, y_stride, o_v, m_v, BT)
    if REVERSE:
        e = tl.cumsum(g, 0)
    else:
        e = tl.cumsum(g, 0, reverse=True)
    if not INCLUSIVE:
        e = e - g
    h = h * tl.exp(tl.sum(g, 0))[:, None]
    return h + _mm(tl.trans(x * tl.exp(e)), y, PRECISION)


@triton.jit
def _keys_to_edges(k_c, gf_c, gb_c, before, after):
    """Keys of a chunk decayed to the edges of one of its sub-chunks: rows before it forward to its first
    token, exp(sum_{s < r < i0} g_fwd), rows after it backward to its last, exp(sum_{i1 < r < s} g_bwd).

    The decays are sums over just the tokens in between (not differences of chunk-wide cumulative sums,
    whose rounding grows with everything before), so they keep fp32 accuracy under any gates. Exponents
    are <= 0 where selected; the minimum keeps the rows not selected finite.
    """
    e_f = tl.cumsum(tl.where(before, gf_c, 0.0), 0, reverse=True) - gf_c
    e_b = tl.cumsum(tl.where(after, gb_c, 0.0), 0) - gb_c
    kf = tl.where(before, k_c * tl.exp(tl.minimum(e_f, 0.0)), 0.0)
    kb = tl.where(after, k_c * tl.exp(tl.minimum(e_b, 0.0)), 0.0)
    return kf, kb


@triton.jit
def _diag_matmul_ok(gf_i, gb_i, LIMIT: tl.constexpr):
    return (tl.min(tl.sum(gf_i, 0), 0) >= -LIMIT) & (tl.min(tl.sum(gb_i, 0), 0) >= -LIMIT)


@triton.jit
def _row(x, o_r, r):
    """Row r of a [BC, N] register tile (r may be a run-time value)."""
    return tl.sum(tl.where((o_r == r)[:, None], x, 0.0), 0)


@triton.jit
def _decay_to_column(gf_i, gb_i, o_r, s):
    """[BC, K] decays between every row t of a sub-chunk and its row s: exp(sum_{s < r <= t} g_fwd) for
    t >= s, exp(sum_{t <= r < s} g_bwd) for t <= s; sums over just the tokens in between, all <= 0."""
    e_f = tl.cumsum(tl.where((o_r > s)[:, None], gf_i, 0.0), 0)
    e_b = tl.cumsum(tl.where((o_r < s)[:, None], gb_i, 0.0), 0, reverse=True)
    return tl.exp(tl.where((o_r >= s)[:, None], e_f, e_b))


@triton.jit
def _diag_scores(q_i, k_i, gf_i, gb_i, Fl, Bl, BC: tl.constexpr, LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """Scores of the token pairs t != s of a diagonal sub-chunk: forward below, backward above the diagonal.

    Fl is the sub-chunk's inclusive prefix sum of g_fwd, Bl its inclusive suffix sum of g_bwd, so the
    forward decay of the pair (t, s) is exp(Fl_t - Fl_s) and the backward one exp(Bl_t - Bl_s). The
    diagonal itself (weight 2: both directions include token t) is left to the caller, exactly.
    """
    o_r = tl.arange(0, BC)
    lower = o_r[:, None] > o_r[None, :]
    upper = o_r[:, None] < o_r[None, :]
    if _diag_matmul_ok(gf_i, gb_i, LIMIT):
        Fm = _row(Fl, o_r, BC // 2)
        Bm = _row(Bl, o_r, BC // 2)
        D = tl.where(lower, _mm(q_i * tl.exp(Fl - Fm[None, :]), tl.trans(k_i * tl.exp(Fm[None, :] - Fl)), PRECISION),
                     0.0)
        D += tl.where(upper, _mm(q_i * tl.exp(Bl - Bm[None, :]), tl.trans(k_i * tl.exp(Bm[None, :] - Bl)), PRECISION),
                      0.0)
    else:
        D = tl.zeros([BC, BC], tl.float32)
        for s in range(BC):
            decay = _decay_to_column(gf_i, gb_i, o_r, s)
            col = tl.sum(q_i * _row(k_i, o_r, s)[None, :] * decay, 1)
            D = tl.where((o_r == s)[None, :] & (o_r != s)[:, None], col[:, None], D)
    return D


@triton.jit
def _diag_grads(q_i, k_i, do_i, v_i, gf_i, gb_i, Fl, Bl, BC: tl.constexpr, BK: tl.constexpr, LIMIT: tl.constexpr,
                PRECISION: tl.constexpr):
    """Backward of the pairs t != s of a diagonal sub-chunk: their scores (for dv) and their parts of dq and
    dk, kept per direction because the gate gradients need them apart (unscaled). The diagonal's own terms
    cancel in the gate gradients; the caller adds them to dq, dk, dv exactly."""
    o_r = tl.arange(0, BC)
    lower = o_r[:, None] > o_r[None, :]
    upper = o_r[:, None] < o_r[None, :]
    dD = _mm(do_i, tl.trans(v_i), PRECISION)  # dD[t, s] = do_t . v_s
    if _diag_matmul_ok(gf_i, gb_i, LIMIT):
        Fm = _row(Fl, o_r, BC // 2)
        Bm = _row(Bl, o_r, BC // 2)
        eq_f = tl.exp(Fl - Fm[None, :])
        ek_f = tl.exp(Fm[None, :] - Fl)
        eq_b = tl.exp(Bl - Bm[None, :])
        ek_b = tl.exp(Bm[None, :] - Bl)
        qf = q_i * eq_f
        kf = k_i * ek_f
        qb = q_i * eq_b
        kb = k_i * ek_b
        D = tl.where(lower, _mm(qf, tl.trans(kf), PRECISION), 0.0)
        D += tl.where(upper, _mm(qb, tl.trans(kb), PRECISION), 0.0)
        dDf = tl.where(lower, dD, 0.0)
        dDb = tl.where(upper, dD, 0.0)
        dqf = _mm(dDf, kf, PRECISION) * eq_f
        dkf = _mm(tl.trans(dDf), qf, PRECISION) * ek_f
        dqb = _mm(dDb, kb, PRECISION) * eq_b
        dkb = _mm(tl.trans(dDb), qb, PRECISION) * ek_b
    else:
        D = tl.zeros([BC, BC], tl.float32)
        dqf = tl.zeros([BC, BK], tl.float32)
        dqb = tl.zeros([BC, BK], tl.float32)
        dkf = tl.zeros([BC, BK], tl.float32)
        dkb = tl.zeros([BC, BK], tl.float32)
        for s in range(BC):
            low = (o_r > s)[:, None]
            up = (o_r < s)[:, None]
            k_s = _row(k_i, o_r, s)
            decay = _decay_to_column(gf_i, gb_i, o_r, s)
            p = q_i * decay * k_s[None, :]
            D = tl.where((o_r == s)[None, :], tl.sum(tl.where(low | up, p, 0.0), 1)[:, None], D)
            w = tl.sum(tl.where((o_r == s)[None, :], dD, 0.0), 1)[:, None] * decay
            dqf += tl.where(low, w, 0.0) * k_s[None, :]
            dqb += tl.where(up, w, 0.0) * k_s[None, :]
            dkf = tl.where((o_r == s)[:, None], tl.sum(tl.where(low, w * q_i, 0.0), 0)[None, :], dkf)
            dkb = tl.where((o_r == s)[:, None], tl.sum(tl.where(up, w * q_i, 0.0), 0)[None, :], dkb)
    return D, dqf, dqb, dkf, dkb


@triton.jit
def _state_offsets(i_bh, chunk, NT, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr):
    offs = ((i_bh.to(tl.int64) * NT + chunk) * K + o_k[:, None]) * V + o_v[None, :]
    return offs, m_k[:, None] & m_v[None, :]


@triton.autotune(configs=_autotune_configs(stages=(1,)), key=["T", "K", "V", "STATES_IN_MEMORY"], **AUTOTUNE_CACHE)
@triton.jit
def bigla_fwd_kernel(q, k, v, gf, gb, o, hf_states, hb_states,
                     q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st,
                     scale, T, NT, H,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr, LIMIT: tl.constexpr,
                     PRECISION: tl.constexpr):
    """o for one chunk of one (batch, head) and one block of value columns.

    Inputs may be strided over batch and tokens (e.g. slices of a fused projection); a head's channels
    are contiguous. o is contiguous.
    """
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_b64 = i_b.to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    bq = i_b64 * q_sb + i_h * K
    bk = i_b64 * k_sb + i_h * K
    bv = i_b64 * v_sb + i_h * V
    bgf = i_b64 * gf_sb + i_h * K
    bgb = i_b64 * gb_sb + i_h * K
    bo = (i_b64 * T * H + i_h) * V

    if STATES_IN_MEMORY:
        offs, m_s = _state_offsets(i_bh, i_n, NT, o_k, m_k, o_v, m_v, K, V)
        hf = tl.load(hf_states + offs, mask=m_s, other=0.0)
        hb = tl.load(hb_states + offs, mask=m_s, other=0.0)
    else:
        hf = tl.zeros([BK, BV], tl.float32)
        hb = tl.zeros([BK, BV], tl.float32)
        for m in range(0, i_n):
            hf = _scan_step(hf, k, bk, k_st, gf, bgf, gf_st, v, bv, v_st, m, T, o_k, m_k, o_v, m_v,
                            BT, False, False, PRECISION)
        for j in range(0, NT - 1 - i_n):
            hb = _scan_step(hb, k, bk, k_st, gb, bgb, gb_st, v, bv, v_st, NT - 1 - j, T, o_k, m_k, o_v, m_v,
                            BT, True, False, PRECISION)

    c0 = i_n * BT
    o_c = tl.arange(0, BT)
    gf_c = _load_rows(gf, bgf, c0, T, gf_st, o_k, m_k, BT)
    gb_c = _load_rows(gb, bgb, c0, T, gb_st, o_k, m_k, BT)
    k_c = _load_rows(k, bk, c0, T, k_st, o_k, m_k, BT)
    v_c = _load_rows(v, bv, c0, T, v_st, o_v, m_v, BT)
    for i in range(0, BT // BC):
        r0 = c0 + i * BC
        q_i = _load_rows(q, bq, r0, T, q_st, o_k, m_k, BC)
        k_i = _load_rows(k, bk, r0, T, k_st, o_k, m_k, BC)
        v_i = _load_rows(v, bv, r0, T, v_st, o_v, m_v, BC)
        gf_i = _load_rows(gf, bgf, r0, T, gf_st, o_k, m_k, BC)
        gb_i = _load_rows(gb, bgb, r0, T, gb_st, o_k, m_k, BC)
        Fl = tl.cumsum(gf_i, 0)
        Bl = tl.cumsum(gb_i, 0, reverse=True)
        before = (o_c < i * BC)[:, None]
        after = (o_c >= (i + 1) * BC)[:, None]
        F_before = tl.sum(tl.where(before, gf_c, 0.0), 0)
        B_after = tl.sum(tl.where(after, gb_c, 0.0), 0)
        # Other chunks, through the states.
        b_o = _mm(q_i * tl.exp(Fl + F_before[None, :]), hf, PRECISION)
        b_o += _mm(q_i * tl.exp(Bl + B_after[None, :]), hb, PRECISION)
        # Other sub-chunks of this chunk: keys decayed to the near edge of sub-chunk i.
        kf, kb = _keys_to_edges(k_c, gf_c, gb_c, before, after)
        A = _mm(q_i * tl.exp(Fl), tl.trans(kf), PRECISION)
        A += _mm(q_i * tl.exp(Bl), tl.trans(kb), PRECISION)
        b_o += _mm(A, v_c, PRECISION)
        D = _diag_scores(q_i, k_i, gf_i, gb_i, Fl, Bl, BC, LIMIT, PRECISION)
        b_o += _mm(D, v_i, PRECISION) + 2.0 * tl.sum(q_i * k_i, 1)[:, None] * v_i
        _store_rows(o, bo, r0, T, H * V, o_v, m_v, b_o * scale, BC)


@triton.autotune(configs=_autotune_configs(stages=(2, 3)), key=["T", "K", "V", "WITH_GRAD"], **AUTOTUNE_CACHE)
@triton.jit
def bigla_states_kernel(q, k, v, do, gf, gb, hf_states, hb_states, dhf_states, dhb_states,
                        q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st, T, NT, H,
                        K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                        WITH_GRAD: tl.constexpr, PRECISION: tl.constexpr):
    """The state entering every chunk, one scan per program: axis 2 picks the forward state, the backward
    state and (WITH_GRAD) the gradients of the two. do is contiguous."""
    i_v, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_b64 = i_b.to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    bq = i_b64 * q_sb + i_h * K
    bk = i_b64 * k_sb + i_h * K
    bv = i_b64 * v_sb + i_h * V
    bgf = i_b64 * gf_sb + i_h * K
    bgb = i_b64 * gb_sb + i_h * K
    bdo = (i_b64 * T * H + i_h) * V
    h = tl.zeros([BK, BV], tl.float32)
    if i_d == 0:  # S entering chunk n from the left
        offs, m_s = _state_offsets(i_bh, 0, NT, o_k, m_k, o_v, m_v, K, V)
        tl.store(hf_states + offs, h, mask=m_s)
        for n in range(1, NT):
            h = _scan_step(h, k, bk, k_st, gf, bgf, gf_st, v, bv, v_st, n - 1, T, o_k, m_k, o_v, m_v,
                           BT, False, False, PRECISION)
            offs, m_s = _state_offsets(i_bh, n, NT, o_k, m_k, o_v, m_v, K, V)
            tl.store(hf_states + offs, h, mask=m_s)
    elif i_d == 1:  # R entering chunk n from the right
        offs, m_s = _state_offsets(i_bh, NT - 1, NT, o_k, m_k, o_v, m_v, K, V)
        tl.store(hb_states + offs, h, mask=m_s)
        for j in range(1, NT):
            h = _scan_step(h, k, bk, k_st, gb, bgb, gb_st, v, bv, v_st, NT - j, T, o_k, m_k, o_v, m_v,
                           BT, True, False, PRECISION)
            offs, m_s = _state_offsets(i_bh, NT - 1 - j, NT, o_k, m_k, o_v, m_v, K, V)
            tl.store(hb_states + offs, h, mask=m_s)
    elif WITH_GRAD:
        if i_d == 2:  # gradient of S at chunk n's last token, from the outputs right of it
            offs, m_s = _state_offsets(i_bh, NT - 1, NT, o_k, m_k, o_v, m_v, K, V)
            tl.store(dhf_states + offs, h, mask=m_s)
            for j in range(1, NT):
                h = _scan_step(h, q, bq, q_st, gf, bgf, gf_st, do, bdo, H * V, NT - j, T, o_k, m_k, o_v, m_v,
                               BT, True, True, PRECISION)
                offs, m_s = _state_offsets(i_bh, NT - 1 - j, NT, o_k, m_k, o_v, m_v, K, V)
                tl.store(dhf_states + offs, h, mask=m_s)
        else:  # gradient of R at chunk n's first token, from the outputs left of it
            offs, m_s = _state_offsets(i_bh, 0, NT, o_k, m_k, o_v, m_v, K, V)
            tl.store(dhb_states + offs, h, mask=m_s)
            for n in range(1, NT):
                h = _scan_step(h, q, bq, q_st, gb, bgb, gb_st, do, bdo, H * V, n - 1, T, o_k, m_k, o_v, m_v,
                               BT, False, True, PRECISION)
                offs, m_s = _state_offsets(i_bh, n, NT, o_k, m_k, o_v, m_v, K, V)
                tl.store(dhb_states + offs, h, mask=m_s)


@triton.autotune(configs=_autotune_configs(stages=(1,)), key=["T", "K", "V", "STATES_IN_MEMORY"], **AUTOTUNE_CACHE)
@triton.jit
def bigla_bwd_kernel(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, hf_states, hb_states, dhf_states, dhb_states,
                     q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st,
                     scale, T, NT, H, split_stride,
                     K: tl.constexpr, V: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                     BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr, LIMIT: tl.constexpr,
                     PRECISION: tl.constexpr):
    """dq, dk, dv, dg_fwd, dg_bwd for one chunk of one (batch, head) and one block of value columns.

    do and all gradients are contiguous. With several value blocks, dq, dk and the gate gradients are
    partial sums over the value columns, written split_stride apart and summed by the caller.
    """
    i_v, i_n, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_b, i_h = i_bh // H, i_bh % H
    i_b64 = i_b.to(tl.int64)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    bq = i_b64 * q_sb + i_h * K
    bk = i_b64 * k_sb + i_h * K
    bv = i_b64 * v_sb + i_h * V
    bgf = i_b64 * gf_sb + i_h * K
    bgb = i_b64 * gb_sb + i_h * K
    bdo = (i_b64 * T * H + i_h) * V
    bdk = (i_b64 * T * H + i_h) * K + i_v.to(tl.int64) * split_stride
    HK = H * K
    HV = H * V

    # hf: S entering from the left; hb: R entering from the right; dhf: gradient of S at the chunk's last
    # token (from outputs right of it); dhb: gradient of R at the chunk's first token (from outputs left).
    if STATES_IN_MEMORY:
        offs, m_s = _state_offsets(i_bh, i_n, NT, o_k, m_k, o_v, m_v, K, V)
        hf = tl.load(hf_states + offs, mask=m_s, other=0.0)
        hb = tl.load(hb_states + offs, mask=m_s, other=0.0)
        dhf = tl.load(dhf_states + offs, mask=m_s, other=0.0)
        dhb = tl.load(dhb_states + offs, mask=m_s, other=0.0)
    else:
        hf = tl.zeros([BK, BV], tl.float32)
        hb = tl.zeros([BK, BV], tl.float32)
        dhf = tl.zeros([BK, BV], tl.float32)
        dhb = tl.zeros([BK, BV], tl.float32)
        for m in range(0, i_n):
            hf = _scan_step(hf, k, bk, k_st, gf, bgf, gf_st, v, bv, v_st, m, T, o_k, m_k, o_v, m_v,
                            BT, False, False, PRECISION)
            dhb = _scan_step(dhb, q, bq, q_st, gb, bgb, gb_st, do, bdo, HV, m, T, o_k, m_k, o_v, m_v,
                             BT, False, True, PRECISION)
        for j in range(0, NT - 1 - i_n):
            hb = _scan_step(hb, k, bk, k_st, gb, bgb, gb_st, v, bv, v_st, NT - 1 - j, T, o_k, m_k, o_v, m_v,
                            BT, True, False, PRECISION)
            dhf = _scan_step(dhf, q, bq, q_st, gf, bgf, gf_st, do, bdo, HV, NT - 1 - j, T, o_k, m_k, o_v, m_v,
                             BT, True, True, PRECISION)

    c0 = i_n * BT
    o_c = tl.arange(0, BT)
    gf_c = _load_rows(gf, bgf, c0, T, gf_st, o_k, m_k, BT)
    gb_c = _load_rows(gb, bgb, c0, T, gb_st, o_k, m_k, BT)
    tot_f = tl.sum(gf_c, 0)
    tot_b = tl.sum(gb_c, 0)
    q_c = _load_rows(q, bq, c0, T, q_st, o_k, m_k, BT)
    k_c = _load_rows(k, bk, c0, T, k_st, o_k, m_k, BT)
    v_c = _load_rows(v, bv, c0, T, v_st, o_v, m_v, BT)
    do_c = _load_rows(do, bdo, c0, T, HV, o_v, m_v, BT)

    # Gate-gradient pairs that straddle the chunk's right edge: sum over v of (gradient state * state) there.
    S_end = hf * tl.exp(tot_f)[:, None]
    S_end += _mm(tl.trans(k_c * tl.exp(tl.cumsum(gf_c, 0, reverse=True) - gf_c)), v_c, PRECISION)
    dR_end = dhb * tl.exp(tot_b)[:, None]
    dR_end += _mm(tl.trans(q_c * tl.exp(tl.cumsum(gb_c, 0, reverse=True))), do_c, PRECISION)
    run_f = tl.sum(dhf * S_end, 1)  # sum over tokens right of the current sub-chunk of (q dq_f - k dk_f)
    cross_b = tl.sum(dR_end * hb, 1)
    run_b = tl.zeros([BK], tl.float32)  # the same for (q dq_b - k dk_b), within this chunk

    # Sub-chunks right to left, so the gate gradients' suffix sums can be carried.
    for ii in range(0, BT // BC):
        i = BT // BC - 1 - ii
        r0 = c0 + i * BC
        q_i = _load_rows(q, bq, r0, T, q_st, o_k, m_k, BC)
        k_i = _load_rows(k, bk, r0, T, k_st, o_k, m_k, BC)
        v_i = _load_rows(v, bv, r0, T, v_st, o_v, m_v, BC)
        do_i = _load_rows(do, bdo, r0, T, HV, o_v, m_v, BC)
        gf_i = _load_rows(gf, bgf, r0, T, gf_st, o_k, m_k, BC)
        gb_i = _load_rows(gb, bgb, r0, T, gb_st, o_k, m_k, BC)
        Fl = tl.cumsum(gf_i, 0)  # sum_{i0 <= r <= t} g_fwd
        Bl = tl.cumsum(gb_i, 0, reverse=True)  # sum_{t <= r <= i1} g_bwd
        Fl_after = tl.cumsum(gf_i, 0, reverse=True) - gf_i  # sum_{t < r <= i1} g_fwd
        Bl_before = tl.cumsum(gb_i, 0) - gb_i  # sum_{i0 <= r < t} g_bwd
        before = (o_c < i * BC)[:, None]
        after = (o_c >= (i + 1) * BC)[:, None]
        F_before = tl.sum(tl.where(before, gf_c, 0.0), 0)
        F_after = tl.sum(tl.where(after, gf_c, 0.0), 0)
        B_before = tl.sum(tl.where(before, gb_c, 0.0), 0)
        B_after = tl.sum(tl.where(after, gb_c, 0.0), 0)

        # Other chunks, through the states.
        ek_f = tl.exp(Fl_after + F_after[None, :])
        ek_b = tl.exp(Bl_before + B_before[None, :])
        dqf = _mm(do_i, tl.trans(hf), PRECISION) * tl.exp(Fl + F_before[None, :])
        dqb = _mm(do_i, tl.trans(hb), PRECISION) * tl.exp(Bl + B_after[None, :])
        dkf = _mm(v_i, tl.trans(dhf), PRECISION) * ek_f
        dkb = _mm(v_i, tl.trans(dhb), PRECISION) * ek_b
        b_dv = _mm(k_i * ek_f, dhf, PRECISION)
        b_dv += _mm(k_i * ek_b, dhb, PRECISION)

        # Sub-chunk i as queries against the chunk's other keys (decayed to sub-chunk i's near edge).
        dA = _mm(do_i, tl.trans(v_c), PRECISION)  # [BC, BT]
        kf, kb = _keys_to_edges(k_c, gf_c, gb_c, before, after)
        dqf += _mm(dA, kf, PRECISION) * tl.exp(Fl)
        dqb += _mm(dA, kb, PRECISION) * tl.exp(Bl)

        # Sub-chunk i as keys/values against the chunk's other queries, decayed to its near edge:
        # exp(sum_{i1 < r <= t} g_fwd) after it, exp(sum_{t <= r < i0} g_bwd) before it.
        qf = tl.where(after, q_c * tl.exp(tl.cumsum(tl.where(after, gf_c, 0.0), 0)), 0.0)
        qb = tl.where(before, q_c * tl.exp(tl.cumsum(tl.where(before, gb_c, 0.0), 0, reverse=True)), 0.0)
        el_f = tl.exp(Fl_after)
        el_b = tl.exp(Bl_before)
        A = _mm(qf, tl.trans(k_i * el_f), PRECISION)  # [BT, BC]
        A += _mm(qb, tl.trans(k_i * el_b), PRECISION)
        dAc = _mm(do_c, tl.trans(v_i), PRECISION)  # [BT, BC]
        b_dv += _mm(tl.trans(A), do_c, PRECISION)
        dkf += _mm(tl.trans(dAc), qf, PRECISION) * el_f
        dkb += _mm(tl.trans(dAc), qb, PRECISION) * el_b

        # The diagonal sub-chunk, its diagonal itself excepted.
        D, dqf_d, dqb_d, dkf_d, dkb_d = _diag_grads(q_i, k_i, do_i, v_i, gf_i, gb_i, Fl, Bl, BC, BK, LIMIT,
                                                    PRECISION)
        b_dv += _mm(tl.trans(D), do_i, PRECISION)
        dqf += dqf_d
        dqb += dqb_d
        dkf += dkf_d
        dkb += dkb_d

        # Gate gradients: dg_fwd[r] = sum_{t >= r} (q dq_f - k dk_f)_t, and dg_bwd[r] = -sum_{t > r}
        # (q dq_b - k dk_b)_t since the latter sums to zero over the whole sequence.
        dFf = q_i * dqf - k_i * dkf
        dBb = q_i * dqb - k_i * dkb
        b_dgf = tl.cumsum(dFf, 0, reverse=True) + run_f[None, :]
        b_dgb = cross_b[None, :] - (tl.cumsum(dBb, 0, reverse=True) - dBb + run_b[None, :])
        run_f += tl.sum(dFf, 0)
        run_b += tl.sum(dBb, 0)

        # The diagonal pairs t = s (both directions).
        dd = 2.0 * tl.sum(do_i * v_i, 1)[:, None]
        b_dv += 2.0 * tl.sum(q_i * k_i, 1)[:, None] * do_i
        _store_rows(dq, bdk, r0, T, HK, o_k, m_k, (dqf + dqb + dd * k_i) * scale, BC)
        _store_rows(dk, bdk, r0, T, HK, o_k, m_k, (dkf + dkb + dd * q_i) * scale, BC)
        _store_rows(dv, bdo, r0, T, HV, o_v, m_v, b_dv * scale, BC)
        _store_rows(dgf, bdk, r0, T, HK, o_k, m_k, b_dgf * scale, BC)
        _store_rows(dgb, bdk, r0, T, HK, o_k, m_k, b_dgb * scale, BC)


def _head_strided(x: torch.Tensor) -> torch.Tensor:
    """x itself if each head's channels are contiguous and heads are packed, else a contiguous copy."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.contiguous()


def _kernel_args(q, k, v, g_fwd, g_bwd):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), 64)
    strides = [s for x in (q, k, v, g_fwd, g_bwd) for s in (x.stride(0), x.stride(1))]
    common = dict(K=K, V=V, BT=CHUNK, BK=BK, BV=BV, PRECISION="tf32x3" if q.dtype == torch.float32 else "tf32")
    return B, T, H, K, V, triton.cdiv(V, BV), triton.cdiv(T, CHUNK), strides, common


def chunk_bigla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """BiGLA forward with Triton: o = scale/2 * q (S + R), o in q's dtype, contiguous.

    q, k, v share one dtype (fp32, bf16 or fp16); the gates may have any float dtype (read as fp32).
    """
    q, k, v, g_fwd, g_bwd = (_head_strided(x) for x in (q, k, v, g_fwd, g_bwd))
    B, T, H, K, V, NV, NT, strides, common = _kernel_args(q, k, v, g_fwd, g_bwd)
    o = output_buffer((B, T, H, V), q.dtype, q.device)
    states_in_memory = NT > MAX_RECOMPUTED_CHUNKS
    if states_in_memory:
        hf, hb = (torch.empty(B * H, NT, K, V, dtype=torch.float32, device=q.device) for _ in range(2))
        bigla_states_kernel[(NV, B * H, 2)](q, k, v, o, g_fwd, g_bwd, hf, hb, hf, hb, *strides, T, NT, H,
                                            WITH_GRAD=False, **common)
    else:
        hf = hb = o  # not read
    bigla_fwd_kernel[(NV, NT, B * H)](q, k, v, g_fwd, g_bwd, o, hf, hb, *strides, 0.5 * scale, T, NT, H,
                                      BC=SUB_CHUNK, STATES_IN_MEMORY=states_in_memory, LIMIT=DIAG_MATMUL_LIMIT,
                                      **common)
    return o.to(q.dtype)


def chunk_bigla_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                    do: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dg_fwd, dg_bwd) of chunk_bigla_fwd, each in its input's dtype."""
    q, k, v, g_fwd, g_bwd = (_head_strided(x) for x in (q, k, v, g_fwd, g_bwd))
    do = do.to(q.dtype).contiguous()
    B, T, H, K, V, NV, NT, strides, common = _kernel_args(q, k, v, g_fwd, g_bwd)
    dv = output_buffer((B, T, H, V), v.dtype, q.device)
    if NV == 1:
        dq, dk, dgf, dgb = (output_buffer((B, T, H, K), x.dtype, q.device) for x in (q, k, g_fwd, g_bwd))
    else:  # partial sums over value blocks
        dq, dk, dgf, dgb = (torch.empty(NV, B, T, H, K, dtype=torch.float32, device=q.device) for _ in range(4))
    states_in_memory = NT > MAX_RECOMPUTED_CHUNKS
    if states_in_memory:
        hf, hb, dhf, dhb = (torch.empty(B * H, NT, K, V, dtype=torch.float32, device=q.device) for _ in range(4))
        bigla_states_kernel[(NV, B * H, 4)](q, k, v, do, g_fwd, g_bwd, hf, hb, dhf, dhb, *strides, T, NT, H,
                                            WITH_GRAD=True, **common)
    else:
        hf = hb = dhf = dhb = dv  # not read
    bigla_bwd_kernel[(NV, NT, B * H)](q, k, v, g_fwd, g_bwd, do, dq, dk, dv, dgf, dgb, hf, hb, dhf, dhb, *strides,
                                      0.5 * scale, T, NT, H, B * T * H * K, BC=SUB_CHUNK,
                                      STATES_IN_MEMORY=states_in_memory, LIMIT=DIAG_MATMUL_LIMIT, **common)
    if NV > 1:
        dq, dk, dgf, dgb = (x.sum(0) for x in (dq, dk, dgf, dgb))
    return tuple(x.to(ref.dtype) for x, ref in ((dq, q), (dk, k), (dv, v), (dgf, g_fwd), (dgb, g_bwd)))
