"""Triton kernels for BiGLA: both directions of gated linear attention, chunk by chunk.

Layout is token-major, [B, T, H, K] for q, k and the log gates, [B, T, H, V] for v, o.

One program handles a segment of up to SEGMENT tokens of one (batch, head), in two passes of FWD_CHUNK-token
steps, one direction each. Under mild gates (no chunk decays by more than CHUNK_DECAY_LIMIT in any key
channel; ViG's gates decay by about 2 per chunk) each chunk's part of o is a few matrix products: right to
left, carrying the backward state R, its queries against R and against its own keys at or right of them (a
[FWD_CHUNK, FWD_CHUNK] score matrix with decays taken against the chunk's end) go to fp32 scratch; left to
right, carrying the forward state S, its queries against S and its own keys at or left of them, plus the
scratch, make o. Each pass finds its gate's steepest chunk as it goes; where a chunk decays more steeply, the
segment is done again in 16-token sweeps (BC; right to left carrying R, left to right carrying S), each
sub-chunk meeting the state by matrix products and the pairs inside it through a diagonal block, with decays
that are sums of the gates of just the tokens in between (every exponent <= 0 except around a diagonal
block's middle row, bounded there), so nothing overflows however steep the gates. Matrix products run on
tf32 tensor cores (tf32x3 for fp32 inputs unless torch's float32 matmul precision allows tf32:
matmul_precision).

- T <= SEGMENT (ViG at 224^2: T = 196): one program per (batch, head) covers the whole sequence, one
  launch per pass;
- longer T: the states at every segment's edge come first, in two launches: each segment's own
  contribution to each state (all segments in parallel, SCAN_CHUNK-token steps), then a scan over the
  segments that combines them (T / SEGMENT steps); the segments then run in parallel from those states.
  The decay is diagonal in the key channels, so every [key block, value block] tile of a state evolves
  on its own: few sequences (a 2048^2 image has B * H = 12 at batch 4) are split into small tiles to
  keep the GPU busy, many keep whole states (fewer redundant loads).

The backward takes the forward's states at the segments' edges (chunk_bigla_fwd returns them) and scans only
their gradients the same way; every state inside a segment is recomputed. It first walks right to left
in BWD_CHUNK-token steps carrying R and dS (the gradient of the forward state), writing to fp32 scratch
the parts of the gradients that need them (the backward direction's dq, the forward direction's dk and dv);
that is exact under any gates. Under mild gates one left-to-right pass of chunk-sized matrix products for
both directions, carrying S and dR, finishes dq, dk, dv; under steep gates 16-token sweeps do. The gate
gradients come out as prefix sums of q*dq - k*dk per direction from left to right; the part from tokens
left of a segment equals sum_v(state * gradient state) at its left edge.

Each pass is two kernels, the chunk path and the sweeps, which take over the segments whose steep flag the first
raised: in one kernel the sweeps' register pressure made the chunk path spill.
"""
from __future__ import annotations

import functools
import inspect
import math
import os

import torch
import triton
import triton.language as tl

from kernels.triton_utils import INTERPRET, output_buffer

SEGMENT = 256  # tokens per program; T <= SEGMENT (ViG at 224^2: T = 196) needs no state-scan launch
SUB_CHUNK = 16  # BC: tokens per step of the sweeps (the smallest tile tl.dot accepts)
SCAN_CHUNK = 64  # BT: tokens per step when a segment's own contribution to the states is computed
# BT: tokens per step under mild gates. The forward runs fastest at 32 (64 ran slower on an H200), the
# backward at 16: 0.422 against 0.467 ms for its chunk kernel at B256 T196 H3 bf16 on an H200 (NOTES.md v7).
FWD_CHUNK = 32
BWD_CHUNK = 16
# Both passes take BT-token steps (matrix products against each chunk's start) when no chunk of the segment
# decays by more than this in any key channel, else BC-token steps: exp(-Fl) <= exp(40) keeps the
# products far from fp32 overflow. ViG's gates (logsigmoid(z) / 16) decay by about 0.05 per token; fp32
# outputs at mean decays of 20-40 per chunk matched the recurrence to 2.4e-7 (interpreter, fast path forced).
CHUNK_DECAY_LIMIT = 40.0
FWD_CHUNK_REGISTERS = 168  # register cap (maxnreg) of the forward's chunk kernel, see there
# A diagonal sub-chunk is done with tensor cores when its total log decay is at least -DIAG_MATMUL_LIMIT
# in every channel: exponents around its middle row then stay within +-DIAG_MATMUL_LIMIT, far from fp32
# overflow (88). ViG's gates (logsigmoid(z) / 16) never come close; steeper gates take the exact path.
DIAG_MATMUL_LIMIT = 40.0

# Value channels per program of the sweeps (more blocks: more programs in flight, smaller states, the
# diagonal scores recomputed per block); VIG_BIGLA_BLOCK_V=16|32|64 overrides it for tuning runs.
MAX_BLOCK_V = int(os.environ.get("VIG_BIGLA_BLOCK_V", "64"))
if MAX_BLOCK_V not in (16, 32, 64):
    raise ValueError(f"VIG_BIGLA_BLOCK_V must be 16, 32 or 64, got {MAX_BLOCK_V}")


# Keep autotuning results in Triton's cache directory where this Triton can (3.2+): later processes skip it.
# VIG_BIGLA_AUTOTUNE_CACHE=0 keeps only the compiled kernels (e.g. when compiling ahead on a busy GPU).
AUTOTUNE_CACHE = ({"cache_results": os.environ.get("VIG_BIGLA_AUTOTUNE_CACHE", "1") == "1"}
                  if "cache_results" in inspect.signature(triton.autotune).parameters else {})


def _autotune_configs(stages: tuple[int, ...], warps: tuple[int, ...] = (4, 8),
                      register_caps: tuple[int | None, ...] = (None,)) -> list[triton.Config]:
    """Configs to search: every `warps` x `stages` (software pipelining of the loops' loads) x `register_caps`
    (maxnreg; None: the compiler's choice, up to 255); each config is another compile of a large kernel, and
    one that needs more shared memory than the GPU has is skipped by the search. VIG_BIGLA_CONFIGS=
    "warps:stages[:maxnreg],..." replaces the list (tuning runs). The interpreter cannot benchmark configs
    (no GPU driver), and VIG_BIGLA_AUTOTUNE=0 skips the search where compile time matters more than speed
    (tests): then the first config only, so it must fit every head size."""
    if os.environ.get("VIG_BIGLA_CONFIGS"):
        configs = [_parse_config(item) for item in os.environ["VIG_BIGLA_CONFIGS"].split(",")]
    else:
        configs = [triton.Config({}, num_warps=w, num_stages=st, maxnreg=cap)
                   for w in warps for st in stages for cap in register_caps]
    if INTERPRET or os.environ.get("VIG_BIGLA_AUTOTUNE", "1") == "0":
        return configs[:1]
    return configs


def _parse_config(item: str) -> triton.Config:
    """One VIG_BIGLA_CONFIGS entry, "warps:stages" or "warps:stages:maxnreg"."""
    fields = item.split(":")
    if len(fields) not in (2, 3) or not all(f.strip().isdigit() for f in fields):
        raise ValueError(f"VIG_BIGLA_CONFIGS entry {item!r}: expected warps:stages or warps:stages:maxnreg "
                         "(integers), e.g. VIG_BIGLA_CONFIGS=2:1:168,4:3")
    warps, stages, *cap = (int(f) for f in fields)
    return triton.Config({}, num_warps=warps, num_stages=stages, maxnreg=cap[0] if cap else None)


def tuning_programs(programs: int) -> int:
    """What the autotuning keys know of a launch's size (the kernels' PROGRAMS argument, otherwise unused): its
    program count rounded up to a power of two. The best config depends on how many programs share the GPU (a
    lone program runs fastest with more registers per thread, a full wave with fewer), and no other key sees the
    batch: without this, a config tuned on a batch of one and cached on disk served batch 256 too, 1.4x slower
    (NOTES.md v12)."""
    return triton.next_power_of_2(programs)


@triton.jit
def _mm(a, b, PRECISION: tl.constexpr):
    """a @ b on fp32 operands, on tf32 tensor cores in PRECISION "tf32" or "tf32x3" (see matmul_precision).

    Rounding the operands to bf16 instead (decayed keys, scores, states) costs about 2e-3 relative error
    per operand, which the 5e-3 accuracy target cannot absorb; tf32 keeps 10 mantissa bits.
    """
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _running_sums(x, INCLUSIVE: tl.constexpr, REVERSE: tl.constexpr, PRECISION: tl.constexpr):
    """Running sums down x's rows: row t sums the rows s <= t (s >= t with REVERSE; s != t unless INCLUSIVE).

    In PRECISION "tf32" a product with a 0/1 triangle on the tensor cores: a tile's rows are spread
    over warps, so tl.cumsum goes through shared memory with a barrier per level, and scans held about a
    third of the backward's stall samples (NOTES.md v10). tf32 rounds each summand to 11 significant bits:
    a decay exp(-x) then carries a relative error of at most x * 2^-11, i.e. 1.8e-4 of a unit weight (x =
    1), well inside 16-bit accuracy, as long as every decay is a difference of sums taken here (a total from
    tl.sum minus a rounded running sum would err by 2^-11 of the whole running sum). In "tf32x3" (fp32
    inputs at torch's "highest" precision) tl.cumsum's exact fp32 sums."""
    if PRECISION == "tf32":
        t = tl.arange(0, x.shape[0])[:, None]
        s = tl.arange(0, x.shape[0])[None, :]
        if REVERSE:
            keep = (s >= t) if INCLUSIVE else (s > t)
        else:
            keep = (s <= t) if INCLUSIVE else (s < t)
        return tl.dot(tl.where(keep, 1.0, 0.0), x, input_precision="tf32")
    else:
        sums = tl.cumsum(x, 0, reverse=REVERSE)
        if not INCLUSIVE:
            sums -= x
        return sums


@triton.jit
def _load_raw(ptr, base, row0, T, stride, cols, col_mask, NROWS: tl.constexpr):
    """Rows row0 .. row0+NROWS-1 of a token-major tensor in its own dtype; rows past T and masked columns
    read 0. Kept raw when loaded a step ahead, so nothing waits for the load before its first use."""
    rows = row0 + tl.arange(0, NROWS)
    mask = (rows < T)[:, None] & col_mask[None, :]
    return tl.load(ptr + base + rows[:, None] * stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def _load_rows(ptr, base, row0, T, stride, cols, col_mask, NROWS: tl.constexpr):
    """_load_raw as fp32."""
    return _load_raw(ptr, base, row0, T, stride, cols, col_mask, NROWS).to(tl.float32)


@triton.jit
def _store_rows(ptr, base, row0, T, stride, cols, col_mask, value, NROWS: tl.constexpr):
    rows = row0 + tl.arange(0, NROWS)
    mask = (rows < T)[:, None] & col_mask[None, :]
    tl.store(ptr + base + rows[:, None] * stride + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


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


@triton.jit
def _program_offsets(i_k, i_v, i_bh, T, H, q_sb, k_sb, v_sb, gf_sb, gb_sb, K: tl.constexpr, V: tl.constexpr,
                     BK: tl.constexpr, BV: tl.constexpr):
    """Key/value columns (and masks) of key block i_k and value block i_v; where (batch, head) i_bh starts
    in q, k, v and the gates; and its first row in contiguous [B, T, H, *] tensors (multiply by the width)."""
    i_b, i_h = i_bh // H, i_bh % H
    i_b64 = i_b.to(tl.int64)
    o_k = i_k * BK + tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    bq = i_b64 * q_sb + i_h * K
    bk = i_b64 * k_sb + i_h * K
    bv = i_b64 * v_sb + i_h * V
    bgf = i_b64 * gf_sb + i_h * K
    bgb = i_b64 * gb_sb + i_h * K
    return o_k, o_k < K, o_v, o_v < V, bq, bk, bv, bgf, bgb, i_b64 * T * H + i_h


@triton.jit
def _step_tiles_raw(q, k, v, g, bq, bk, bv, bg, q_st, k_st, v_st, g_st, r0, T, o_k, m_k, o_v, m_v,
                    BC: tl.constexpr):
    """The q, k, v and gate tiles of the BC tokens from r0, in their own dtypes."""
    return (_load_raw(q, bq, r0, T, q_st, o_k, m_k, BC), _load_raw(k, bk, r0, T, k_st, o_k, m_k, BC),
            _load_raw(v, bv, r0, T, v_st, o_v, m_v, BC), _load_raw(g, bg, r0, T, g_st, o_k, m_k, BC))


@triton.jit
def _sub_chunk(q, k, v, gf, gb, bq, bk, bv, bgf, bgb, q_st, k_st, v_st, gf_st, gb_st, r0, T,
               o_k, m_k, o_v, m_v, BC: tl.constexpr):
    """The q, k, v, g_fwd and g_bwd tiles of the BC tokens from r0, as fp32."""
    q_i, k_i, v_i, gf_i = _step_tiles_raw(q, k, v, gf, bq, bk, bv, bgf, q_st, k_st, v_st, gf_st, r0, T,
                                          o_k, m_k, o_v, m_v, BC)
    gb_i = _load_rows(gb, bgb, r0, T, gb_st, o_k, m_k, BC)
    return q_i.to(tl.float32), k_i.to(tl.float32), v_i.to(tl.float32), gf_i.to(tl.float32), gb_i


@triton.jit
def _fwd_sub_chunk_sweeps(q, k, v, gf, gb, o, o_bwd, hf_states, hb_states, offs, m_s, q_st, k_st, v_st, gf_st,
                          gb_st, bq, bk, bv, bgf, bgb, bo, scale, T, c0, n_sub, HV, o_k, m_k, o_v, m_v,
                          BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                          LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """The forward under any gates, BC tokens per step: right to left over the segment's sub-chunks,
    carrying the backward state, the backward direction's part of o goes to o_bwd (fp32 scratch); then
    left to right, carrying the forward state, the forward part, the diagonal sub-chunk and the scratch
    make o."""
    if STATES_IN_MEMORY:
        h = tl.load(hb_states + offs, mask=m_s, other=0.0)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    # Each step's tiles are loaded one step ahead (the loads do not depend on the carried state), so their
    # latency overlaps the previous step's arithmetic; the last prefetch of a sweep re-reads a valid tile.
    q_n, k_n, v_n, gb_n = _step_tiles_raw(q, k, v, gb, bq, bk, bv, bgb, q_st, k_st, v_st, gb_st,
                                          c0 + (n_sub - 1) * BC, T, o_k, m_k, o_v, m_v, BC)
    for j in range(0, n_sub):  # right to left: R, the state of the tokens right of sub-chunk i
        r0 = c0 + (n_sub - 1 - j) * BC
        q_i, k_i, v_i, gb_i = q_n.to(tl.float32), k_n.to(tl.float32), v_n.to(tl.float32), gb_n.to(tl.float32)
        q_n, k_n, v_n, gb_n = _step_tiles_raw(q, k, v, gb, bq, bk, bv, bgb, q_st, k_st, v_st, gb_st,
                                              tl.maximum(r0 - BC, c0), T, o_k, m_k, o_v, m_v, BC)
        Bl = tl.cumsum(gb_i, 0, reverse=True)  # sum_{t <= r <= i1} g_bwd
        _store_rows(o_bwd, bo, r0, T, HV, o_v, m_v, _mm(q_i * tl.exp(Bl), h, PRECISION), BC)
        # R <- R decayed across the sub-chunk + its keys decayed to its first token: sum_{i0 <= r < t} g_bwd
        h = h * tl.exp(tl.sum(gb_i, 0))[:, None]
        h += _mm(tl.trans(k_i * tl.exp(tl.cumsum(gb_i, 0) - gb_i)), v_i, PRECISION)

    tl.debug_barrier()  # o_bwd rows written above are read back below, possibly by other threads
    if STATES_IN_MEMORY:
        h = tl.load(hf_states + offs, mask=m_s, other=0.0)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    q_n, k_n, v_n, gf_n = _step_tiles_raw(q, k, v, gf, bq, bk, bv, bgf, q_st, k_st, v_st, gf_st, c0, T,
                                          o_k, m_k, o_v, m_v, BC)
    gb_n = _load_raw(gb, bgb, c0, T, gb_st, o_k, m_k, BC)
    ob_n = _load_raw(o_bwd, bo, c0, T, HV, o_v, m_v, BC)
    for i in range(0, n_sub):  # left to right: S, the state of the tokens left of sub-chunk i
        r0 = c0 + i * BC
        q_i, k_i, v_i = q_n.to(tl.float32), k_n.to(tl.float32), v_n.to(tl.float32)
        gf_i, gb_i, ob_i = gf_n.to(tl.float32), gb_n.to(tl.float32), ob_n
        r_next = tl.minimum(r0 + BC, c0 + (n_sub - 1) * BC)
        q_n, k_n, v_n, gf_n = _step_tiles_raw(q, k, v, gf, bq, bk, bv, bgf, q_st, k_st, v_st, gf_st, r_next, T,
                                              o_k, m_k, o_v, m_v, BC)
        gb_n = _load_raw(gb, bgb, r_next, T, gb_st, o_k, m_k, BC)
        ob_n = _load_raw(o_bwd, bo, r_next, T, HV, o_v, m_v, BC)
        Fl = tl.cumsum(gf_i, 0)  # sum_{i0 <= r <= t} g_fwd
        Bl = tl.cumsum(gb_i, 0, reverse=True)
        b_o = _mm(q_i * tl.exp(Fl), h, PRECISION) + ob_i
        D = _diag_scores(q_i, k_i, gf_i, gb_i, Fl, Bl, BC, LIMIT, PRECISION)
        b_o += _mm(D, v_i, PRECISION) + 2.0 * tl.sum(q_i * k_i, 1)[:, None] * v_i
        _store_rows(o, bo, r0, T, HV, o_v, m_v, b_o * scale, BC)
        # S <- S decayed across the sub-chunk + its keys decayed to its last token: sum_{t < r <= i1} g_fwd
        tot = tl.sum(gf_i, 0)
        h = h * tl.exp(tot)[:, None] + _mm(tl.trans(k_i * tl.exp(tot[None, :] - Fl)), v_i, PRECISION)


@triton.jit
def _fwd_chunks_right_to_left(q, k, v, gb, o_bwd, hb_states, offs, m_s, q_st, k_st, v_st, gb_st, bq, bk, bv, bgb, bo,
                              T, c0, n_chunks, HV, o_k, m_k, o_v, m_v, BT: tl.constexpr, BK: tl.constexpr,
                              BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr, PRECISION: tl.constexpr):
    """The backward direction's half of the forward under mild gates, BT tokens per step, right to left carrying
    the backward state R: each chunk's queries against R and against the chunk's keys at or right of them, to
    o_bwd (fp32 scratch). Decays are taken against the chunk's end: the pair (t, s), s >= t, decays by
    exp(Bl_t) * exp(-Bl_s), Bl the inclusive suffix sums of g_bwd, so exp(-Bl) stays below exp(limit) where
    the caller's limit holds. Returns the least total log decay of a chunk under g_bwd: if that breaks the
    limit, what was written here may have overflowed and the caller has the segment redone."""
    if STATES_IN_MEMORY:
        h = tl.load(hb_states + offs, mask=m_s, other=0.0)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    o_r = tl.arange(0, BT)
    upper = o_r[:, None] <= o_r[None, :]  # the diagonal (t = s) is in both directions
    steepest = tl.zeros([BK], tl.float32)
    # Tiles are loaded a step ahead, as in the sweeps: 0.111 -> 0.095 ms for the forward at ViG-T's shape (NOTES.md
    # v13); the last prefetch of each pass re-reads a valid tile.
    q_n, k_n, v_n, g_n = _step_tiles_raw(q, k, v, gb, bq, bk, bv, bgb, q_st, k_st, v_st, gb_st,
                                         c0 + (n_chunks - 1) * BT, T, o_k, m_k, o_v, m_v, BT)
    for j in range(0, n_chunks):
        r0 = c0 + (n_chunks - 1 - j) * BT
        q_i, k_i, v_i, gb_i = q_n.to(tl.float32), k_n.to(tl.float32), v_n.to(tl.float32), g_n.to(tl.float32)
        q_n, k_n, v_n, g_n = _step_tiles_raw(q, k, v, gb, bq, bk, bv, bgb, q_st, k_st, v_st, gb_st,
                                             tl.maximum(r0 - BT, c0), T, o_k, m_k, o_v, m_v, BT)
        Bl = _running_sums(gb_i, True, True, PRECISION)  # sum_{t <= r <= i1} g_bwd
        tot = _row(Bl, o_r, 0)  # the total Bl took, so tot - Bl sums just the (equally rounded) rows between
        steepest = tl.minimum(steepest, tot)
        qb = q_i * tl.exp(Bl)
        kb = k_i * tl.exp(-Bl)
        scores = tl.where(upper, _mm(qb, tl.trans(kb), PRECISION), 0.0)
        _store_rows(o_bwd, bo, r0, T, HV, o_v, m_v, _mm(qb, h, PRECISION) + _mm(scores, v_i, PRECISION), BT)
        # R <- R decayed across the chunk + its keys decayed to its first token: sum_{i0 <= r < t} g_bwd
        h = h * tl.exp(tot)[:, None] + _mm(tl.trans(kb * tl.exp(tot)[None, :]), v_i, PRECISION)
    return tl.min(steepest, 0)


@triton.jit
def _fwd_chunks_left_to_right(q, k, v, gf, o, o_bwd, hf_states, offs, m_s, q_st, k_st, v_st, gf_st, bq, bk, bv,
                              bgf, bo, scale, T, c0, n_chunks, HV, o_k, m_k, o_v, m_v, BT: tl.constexpr,
                              BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                              PRECISION: tl.constexpr):
    """The forward direction's half, left to right carrying the forward state S, after
    _fwd_chunks_right_to_left: each chunk's queries against S and against the chunk's keys at or left of them,
    plus o_bwd, make o. Decays are taken against the chunk's start (exp(Fl_t) * exp(-Fl_s), Fl the inclusive
    prefix sums of g_fwd). Returns the least total log decay of a chunk under g_fwd, as the other pass does."""
    if STATES_IN_MEMORY:
        h = tl.load(hf_states + offs, mask=m_s, other=0.0)
    else:
        h = tl.zeros([BK, BV], tl.float32)
    o_r = tl.arange(0, BT)
    lower = o_r[:, None] >= o_r[None, :]
    steepest = tl.zeros([BK], tl.float32)
    q_n, k_n, v_n, g_n = _step_tiles_raw(q, k, v, gf, bq, bk, bv, bgf, q_st, k_st, v_st, gf_st, c0, T,
                                         o_k, m_k, o_v, m_v, BT)
    ob_n = _load_rows(o_bwd, bo, c0, T, HV, o_v, m_v, BT)
    for c in range(0, n_chunks):
        r0 = c0 + c * BT
        r_next = tl.minimum(r0 + BT, c0 + (n_chunks - 1) * BT)
        q_i, k_i, v_i, gf_i = q_n.to(tl.float32), k_n.to(tl.float32), v_n.to(tl.float32), g_n.to(tl.float32)
        o_b = ob_n
        q_n, k_n, v_n, g_n = _step_tiles_raw(q, k, v, gf, bq, bk, bv, bgf, q_st, k_st, v_st, gf_st, r_next, T,
                                             o_k, m_k, o_v, m_v, BT)
        ob_n = _load_rows(o_bwd, bo, r_next, T, HV, o_v, m_v, BT)
        Fl = _running_sums(gf_i, True, False, PRECISION)  # sum_{i0 <= r <= t} g_fwd
        tot = _row(Fl, o_r, BT - 1)  # the total Fl took, so tot - Fl sums just the (equally rounded) rows between
        steepest = tl.minimum(steepest, tot)
        qf = q_i * tl.exp(Fl)
        kf = k_i * tl.exp(-Fl)
        scores = tl.where(lower, _mm(qf, tl.trans(kf), PRECISION), 0.0)
        b_o = _mm(qf, h, PRECISION) + _mm(scores, v_i, PRECISION) + o_b
        _store_rows(o, bo, r0, T, HV, o_v, m_v, b_o * scale, BT)
        # S <- S decayed across the chunk + its keys decayed to its last token: sum_{t < r <= i1} g_fwd
        h = h * tl.exp(tot)[:, None] + _mm(tl.trans(kf * tl.exp(tot)[None, :]), v_i, PRECISION)
    return tl.min(steepest, 0)


@triton.jit
def _segment_program(q_sb, k_sb, v_sb, gf_sb, gb_sb, T, NS, H, split_stride, K: tl.constexpr, V: tl.constexpr,
                 SEG: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """What a program of the forward or backward kernels covers: its key/value columns, where its rows start
    in the inputs, in o, do and dv (bdo) and in dq, dk and the gate gradients (bdk), its segment states
    (offs), its first token and segment length, and its steep_flags entry."""
    i_v, i_s, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, row0 = _program_offsets(
        0, i_v, i_bh, T, H, q_sb, k_sb, v_sb, gf_sb, gb_sb, K, V, BK, BV)
    offs, m_s = _state_offsets(i_bh, i_s, NS, o_k, m_k, o_v, m_v, K, V)
    c0 = i_s * SEG
    flag = (i_bh * NS + i_s) * tl.num_programs(0) + i_v
    return (o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, row0 * V, row0 * K + i_v.to(tl.int64) * split_stride, offs,
            m_s, c0, tl.minimum(SEG, T - c0), flag)


# The forward and the backward are each two kernels, the chunk path and the sweeps, so that each gets its own
# register allocation: in one kernel with the sweeps, the backward's chunk path spilled five times as much
# (sm_90 compile, 8 warps: 312 against 64 bytes) and the forward's spilled at 2 warps (176 bytes against none).
# The forward's chunk kernel is latency-bound, so more warps per multiprocessor pay for a few spills: at 168
# registers three programs of 4 warps fit in the 65,536 registers of an sm_80/sm_90 multiprocessor (two at
# the 244 the compiler picks). With each step's tiles loaded a step ahead, 4 warps at the cap ran 0.096 ms
# against 0.139 at 2 warps, where the prefetched tiles spill 1.9 KB (H200, B256 T196 H3 bf16, NOTES.md v13).
# Uncapped configs stay in the search for small launches (a lone program has the multiprocessor to itself).
@triton.autotune(configs=_autotune_configs(stages=(1,), warps=(4, 2), register_caps=(FWD_CHUNK_REGISTERS, None)),
                 key=["T", "K", "V", "BT", "STATES_IN_MEMORY", "PRECISION", "PROGRAMS"], **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["PROGRAMS"])
def bigla_fwd_chunks_kernel(q, k, v, gf, gb, o, o_bwd, steep_flags, hf_states, hb_states,
                            q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st,
                            scale, T, NS, H, PROGRAMS,
                            K: tl.constexpr, V: tl.constexpr, SEG: tl.constexpr, BC: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                            LIMIT: tl.constexpr, CHUNK_LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """o for one segment of SEG tokens of one (batch, head) and one block of value columns, under mild gates.

    Two passes over the segment's BT-token chunks, each one direction as [BT, BT] matrix products: right to
    left the backward direction's half of o (to o_bwd), left to right the forward direction's, which
    completes o. Each pass finds its gate's steepest chunk; if one decays by more than CHUNK_LIMIT in any key
    channel, the program raises its steep flag (skipping the second pass if the first found it) and
    bigla_fwd_sweeps_kernel does the segment again. Inputs may be strided over batch and tokens (slices of a
    fused projection); a head's channels are contiguous. o and o_bwd are contiguous.
    """
    o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, bo, _, offs, m_s, c0, seg_len, flag = _segment_program(
        q_sb, k_sb, v_sb, gf_sb, gb_sb, T, NS, H, 0, K, V, SEG, BK, BV)
    n_chunks = tl.cdiv(seg_len, BT)
    steep = _fwd_chunks_right_to_left(q, k, v, gb, o_bwd, hb_states, offs, m_s, q_st, k_st, v_st, gb_st, bq, bk, bv,
                                      bgb, bo, T, c0, n_chunks, H * V, o_k, m_k, o_v, m_v, BT, BK, BV,
                                      STATES_IN_MEMORY, PRECISION) < -CHUNK_LIMIT
    if not steep:
        tl.debug_barrier()  # the o_bwd rows written above are read back below, possibly by other threads
        steep = _fwd_chunks_left_to_right(q, k, v, gf, o, o_bwd, hf_states, offs, m_s, q_st, k_st, v_st, gf_st, bq,
                                          bk, bv, bgf, bo, scale, T, c0, n_chunks, H * V, o_k, m_k, o_v, m_v, BT, BK,
                                          BV, STATES_IN_MEMORY, PRECISION) < -CHUNK_LIMIT
    tl.store(steep_flags + flag, steep.to(tl.int32))


@triton.autotune(configs=_autotune_configs(stages=(1,), warps=(2, 4)),
                 key=["T", "K", "V", "BT", "STATES_IN_MEMORY", "PRECISION", "PROGRAMS"], **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["PROGRAMS"])
def bigla_fwd_sweeps_kernel(q, k, v, gf, gb, o, o_bwd, steep_flags, hf_states, hb_states,
                            q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st,
                            scale, T, NS, H, PROGRAMS,
                            K: tl.constexpr, V: tl.constexpr, SEG: tl.constexpr, BC: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                            LIMIT: tl.constexpr, CHUNK_LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """o of the segments whose steep flag bigla_fwd_chunks_kernel raised, in BC-token steps whose decays
    stay exact under any gates (_fwd_sub_chunk_sweeps); the other programs return at once. Same arguments
    as bigla_fwd_chunks_kernel."""
    o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, bo, _, offs, m_s, c0, seg_len, flag = _segment_program(
        q_sb, k_sb, v_sb, gf_sb, gb_sb, T, NS, H, 0, K, V, SEG, BK, BV)
    if tl.load(steep_flags + flag) != 0:
        _fwd_sub_chunk_sweeps(q, k, v, gf, gb, o, o_bwd, hf_states, hb_states, offs, m_s, q_st, k_st, v_st, gf_st,
                              gb_st, bq, bk, bv, bgf, bgb, bo, scale, T, c0, tl.cdiv(seg_len, BC), H * V, o_k, m_k,
                              o_v, m_v, BC, BK, BV, STATES_IN_MEMORY, LIMIT, PRECISION)


@triton.jit
def _store_step_grads(dq, dk, dv, dgf, dgb, bdk, bdo, r0, T, HK, HV, o_k, m_k, o_v, m_v, q_i, k_i, dqf, dqb, dkf, dkb,
                      b_dq, b_dk, b_dv, run_f, run_b, scale, NROWS: tl.constexpr, PRECISION: tl.constexpr):
    """Writes a left-to-right step's gradients (b_dq, b_dk, b_dv: both directions) and its gate gradients,
    running sums of q*dq - k*dk per direction (dqf, dkf forward, dqb, dkb backward): dg_fwd[r] = run_f -
    sum_{t<r}, since those terms sum to zero over the sequence, and dg_bwd[r] = run_b + sum_{t<=r}.
    Returns the running sums after the step."""
    dFf = q_i * dqf - k_i * dkf
    dFb = q_i * dqb - k_i * dkb
    b_dgf = run_f[None, :] - _running_sums(dFf, False, False, PRECISION)
    b_dgb = run_b[None, :] + _running_sums(dFb, True, False, PRECISION)
    _store_rows(dq, bdk, r0, T, HK, o_k, m_k, b_dq * scale, NROWS)
    _store_rows(dk, bdk, r0, T, HK, o_k, m_k, b_dk * scale, NROWS)
    _store_rows(dv, bdo, r0, T, HV, o_v, m_v, b_dv * scale, NROWS)
    _store_rows(dgf, bdk, r0, T, HK, o_k, m_k, b_dgf * scale, NROWS)
    _store_rows(dgb, bdk, r0, T, HK, o_k, m_k, b_dgb * scale, NROWS)
    return run_f - tl.sum(dFf, 0), run_b + tl.sum(dFb, 0)


@triton.jit
def _bwd_right_to_left(q, k, v, gf, gb, do, dq_bwd, dk_fwd, dv_fwd, hb_states, dhf_states, offs, m_s, q_st, k_st,
                       v_st, gf_st, gb_st, bq, bk, bv, bgf, bgb, bdo, bdk, T, c0, n_steps, HK, HV, o_k, m_k, o_v, m_v,
                       NROWS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                       PRECISION: tl.constexpr):
    """Right to left over the segment in NROWS-token steps, carrying R (backward state) and dS (gradient of the
    forward state): the parts of the gradients that need them go to fp32 scratch, the backward direction's dq
    (keys right of each token) and the forward direction's dk and dv (queries right of each token). Every
    decay is a sum over the tokens in between (<= 0), so this is exact under any gates. Returns the least
    total log decay of a step (both gates, every key channel)."""
    if STATES_IN_MEMORY:
        R = tl.load(hb_states + offs, mask=m_s, other=0.0)
        dS = tl.load(dhf_states + offs, mask=m_s, other=0.0)
    else:
        R = tl.zeros([BK, BV], tl.float32)
        dS = tl.zeros([BK, BV], tl.float32)
    steepest = tl.zeros([BK], tl.float32)
    for j in range(0, n_steps):
        r0 = c0 + (n_steps - 1 - j) * NROWS
        q_i, k_i, v_i, gf_i, gb_i = _sub_chunk(q, k, v, gf, gb, bq, bk, bv, bgf, bgb, q_st, k_st, v_st, gf_st,
                                               gb_st, r0, T, o_k, m_k, o_v, m_v, NROWS)
        do_i = _load_rows(do, bdo, r0, T, HV, o_v, m_v, NROWS)
        Fl = _running_sums(gf_i, True, False, PRECISION)
        tot_f = _row(Fl, tl.arange(0, NROWS), NROWS - 1)  # the sum Fl took, so tot_f - Fl sums the rows between
        tot_b = tl.sum(gb_i, 0)
        steepest = tl.minimum(steepest, tl.minimum(tot_f, tot_b))
        e_kf = tl.exp(tot_f[None, :] - Fl)  # sum_{t < r <= i1} g_fwd
        e_kb = tl.exp(_running_sums(gb_i, False, False, PRECISION))  # sum_{i0 <= r < t} g_bwd
        e_qb = tl.exp(_running_sums(gb_i, True, True, PRECISION))  # sum_{t <= r <= i1} g_bwd
        _store_rows(dq_bwd, bdk, r0, T, HK, o_k, m_k, _mm(do_i, tl.trans(R), PRECISION) * e_qb, NROWS)
        _store_rows(dk_fwd, bdk, r0, T, HK, o_k, m_k, _mm(v_i, tl.trans(dS), PRECISION) * e_kf, NROWS)
        _store_rows(dv_fwd, bdo, r0, T, HV, o_v, m_v, _mm(k_i * e_kf, dS, PRECISION), NROWS)
        R = R * tl.exp(tot_b)[:, None] + _mm(tl.trans(k_i * e_kb), v_i, PRECISION)
        dS = dS * tl.exp(tot_f)[:, None] + _mm(tl.trans(q_i * tl.exp(Fl)), do_i, PRECISION)
    return tl.min(steepest, 0)


@triton.jit
def _bwd_left_edge(hf_states, hb_states, dhf_states, dhb_states, i_bh, i_s, NS, o_k, m_k, o_v, m_v, K: tl.constexpr,
                   V: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr):
    """S and dR entering segment i_s from its left, and the gate-gradient sums of the pairs straddling its
    left edge, sum_v(S * dS) and sum_v(dR * R) with R and dS including the segment: the states entering the
    segment to its left from the right. There the left-to-right running sums of the gate gradients start;
    the first segment has S = dR = 0."""
    if STATES_IN_MEMORY:
        offs, m_s = _state_offsets(i_bh, i_s, NS, o_k, m_k, o_v, m_v, K, V)
        left, m_l = _state_offsets(i_bh, tl.maximum(i_s - 1, 0), NS, o_k, m_k, o_v, m_v, K, V)
        S = tl.load(hf_states + offs, mask=m_s, other=0.0)
        dR = tl.load(dhb_states + offs, mask=m_s, other=0.0)
        run_f = tl.sum(S * tl.load(dhf_states + left, mask=m_l, other=0.0), 1)
        run_b = tl.sum(dR * tl.load(hb_states + left, mask=m_l, other=0.0), 1)
    else:
        S = tl.zeros([BK, BV], tl.float32)
        dR = tl.zeros([BK, BV], tl.float32)
        run_f = tl.zeros([BK], tl.float32)
        run_b = tl.zeros([BK], tl.float32)
    return S, dR, run_f, run_b


@triton.jit
def _bwd_sub_chunk_sweeps(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, hf_states, hb_states,
                          dhf_states, dhb_states, i_bh, i_s, NS, q_st, k_st, v_st, gf_st, gb_st, bq, bk, bv, bgf, bgb,
                          bdo, bdk, scale, T, c0, n_sub, HK, HV, o_k, m_k, o_v, m_v, K: tl.constexpr, V: tl.constexpr,
                          BC: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                          LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """The backward under any gates after _bwd_right_to_left, left to right in BC-token steps carrying S and
    dR: the rest of the gradients, with the diagonal sub-chunks, and the gate gradients."""
    S, dR, run_f, run_b = _bwd_left_edge(hf_states, hb_states, dhf_states, dhb_states, i_bh, i_s, NS, o_k, m_k, o_v,
                                         m_v, K, V, BK, BV, STATES_IN_MEMORY)
    for i in range(0, n_sub):  # left to right
        r0 = c0 + i * BC
        q_i, k_i, v_i, gf_i, gb_i = _sub_chunk(q, k, v, gf, gb, bq, bk, bv, bgf, bgb, q_st, k_st, v_st, gf_st,
                                               gb_st, r0, T, o_k, m_k, o_v, m_v, BC)
        do_i = _load_rows(do, bdo, r0, T, HV, o_v, m_v, BC)
        Fl = tl.cumsum(gf_i, 0)
        Bl = tl.cumsum(gb_i, 0, reverse=True)
        tot_f = tl.sum(gf_i, 0)
        tot_b = tl.sum(gb_i, 0)
        e_kb = tl.exp(tl.cumsum(gb_i, 0) - gb_i)
        D, dqf, dqb, dkf, dkb = _diag_grads(q_i, k_i, do_i, v_i, gf_i, gb_i, Fl, Bl, BC, BK, LIMIT, PRECISION)
        dqf += _mm(do_i, tl.trans(S), PRECISION) * tl.exp(Fl)  # keys left of i, forward direction
        dqb += _load_rows(dq_bwd, bdk, r0, T, HK, o_k, m_k, BC)
        dkf += _load_rows(dk_fwd, bdk, r0, T, HK, o_k, m_k, BC)
        dkb += _mm(v_i, tl.trans(dR), PRECISION) * e_kb  # queries left of i, backward direction
        b_dv = _load_rows(dv_fwd, bdo, r0, T, HV, o_v, m_v, BC) + _mm(k_i * e_kb, dR, PRECISION)
        b_dv += _mm(tl.trans(D), do_i, PRECISION) + 2.0 * tl.sum(q_i * k_i, 1)[:, None] * do_i
        dd = 2.0 * tl.sum(do_i * v_i, 1)[:, None]  # the diagonal pairs t = s, both directions

        run_f, run_b = _store_step_grads(dq, dk, dv, dgf, dgb, bdk, bdo, r0, T, HK, HV, o_k, m_k, o_v, m_v, q_i, k_i,
                                         dqf, dqb, dkf, dkb, dqf + dqb + dd * k_i, dkf + dkb + dd * q_i, b_dv, run_f,
                                         run_b, scale, BC, PRECISION)
        S = S * tl.exp(tot_f)[:, None] + _mm(tl.trans(k_i * tl.exp(tot_f[None, :] - Fl)), v_i, PRECISION)
        dR = dR * tl.exp(tot_b)[:, None] + _mm(tl.trans(q_i * tl.exp(Bl)), do_i, PRECISION)


@triton.jit
def _bwd_chunks(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, S, dR, run_f, run_b, q_st, k_st,
                v_st, gf_st, gb_st, bq, bk, bv, bgf, bgb, bdo, bdk, scale, T, c0, n_chunks, HK, HV, o_k, m_k, o_v, m_v,
                BT: tl.constexpr, PRECISION: tl.constexpr):
    """The backward under mild gates after _bwd_right_to_left: left to right in BT-token chunks, both
    directions at once, carrying S (forward state) and dR (gradient of the backward state) from the left
    edge (_bwd_left_edge).

    As in _fwd_chunks_left_to_right, decays inside a chunk are taken against its start (Lf: inclusive prefix sums of
    g_fwd, Lb: inclusive suffix sums of g_bwd), so the chunk's pairs are [BT, BT] matrix products, query t
    with key s <= t forward and s >= t backward (the diagonal in both). The scratch adds what the keys and
    queries right of the chunk contribute; _store_step_grads adds up the gate gradients.
    """
    o_r = tl.arange(0, BT)
    lower = o_r[:, None] >= o_r[None, :]
    upper = o_r[:, None] <= o_r[None, :]
    for c in range(0, n_chunks):
        r0 = c0 + c * BT
        q_i, k_i, v_i, gf_i, gb_i = _sub_chunk(q, k, v, gf, gb, bq, bk, bv, bgf, bgb, q_st, k_st, v_st, gf_st,
                                               gb_st, r0, T, o_k, m_k, o_v, m_v, BT)
        do_i = _load_rows(do, bdo, r0, T, HV, o_v, m_v, BT)
        Lf = _running_sums(gf_i, True, False, PRECISION)
        Lb = _running_sums(gb_i, True, True, PRECISION)
        # The totals as Lf and Lb took them, so a decay tot - L sums just the (equally rounded) rows between
        tot_f = _row(Lf, o_r, BT - 1)
        tot_b = _row(Lb, o_r, 0)
        e_qf = tl.exp(Lf)
        e_qb = tl.exp(Lb)
        e_kf = tl.exp(-Lf)
        e_kb = tl.exp(-Lb)
        qf = q_i * e_qf
        kf = k_i * e_kf
        qb = q_i * e_qb
        kb = k_i * e_kb
        kb_out = kb * tl.exp(tot_b)[None, :]  # keys decayed to the chunk's left edge, where dR enters
        dA = _mm(do_i, tl.trans(v_i), PRECISION)  # dA[t, s] = do_t . v_s
        dAf = tl.where(lower, dA, 0.0)
        dAb = tl.where(upper, dA, 0.0)
        scores = tl.where(lower, _mm(qf, tl.trans(kf), PRECISION), 0.0)
        scores += tl.where(upper, _mm(qb, tl.trans(kb), PRECISION), 0.0)
        dqf = (_mm(dAf, kf, PRECISION) + _mm(do_i, tl.trans(S), PRECISION)) * e_qf
        dkf = _mm(tl.trans(dAf), qf, PRECISION) * e_kf + _load_rows(dk_fwd, bdk, r0, T, HK, o_k, m_k, BT)
        dqb = _mm(dAb, kb, PRECISION) * e_qb + _load_rows(dq_bwd, bdk, r0, T, HK, o_k, m_k, BT)
        dkb = (_mm(tl.trans(dAb), qb, PRECISION) + _mm(v_i, tl.trans(dR), PRECISION) * tl.exp(tot_b)[None, :]) * e_kb
        b_dv = (_mm(tl.trans(scores), do_i, PRECISION) + _mm(kb_out, dR, PRECISION)
                + _load_rows(dv_fwd, bdo, r0, T, HV, o_v, m_v, BT))
        run_f, run_b = _store_step_grads(dq, dk, dv, dgf, dgb, bdk, bdo, r0, T, HK, HV, o_k, m_k, o_v, m_v, q_i, k_i,
                                         dqf, dqb, dkf, dkb, dqf + dqb, dkf + dkb, b_dv, run_f, run_b, scale, BT,
                                         PRECISION)
        S = S * tl.exp(tot_f)[:, None] + _mm(tl.trans(kf * tl.exp(tot_f)[None, :]), v_i, PRECISION)
        dR = dR * tl.exp(tot_b)[:, None] + _mm(tl.trans(qb), do_i, PRECISION)


# Pipelining the backward chunk kernel's loads over 3 stages ran it 1.15x faster on an H100 (0.471 against
# 0.545 ms at B256 T196 H3 bf16, NOTES.md v6); the first config (1 stage) is the one that fits fp32 heads of
# 128 channels in shared memory (3 stages would need 295 KB). 8 warps ran 1.8x slower than 4, and a 168-register
# cap (three programs per multiprocessor instead of two, 392 B of spills) 1.15x slower (NOTES.md v8).
@triton.autotune(configs=_autotune_configs(stages=(1, 3), warps=(4,)),
                 key=["T", "K", "V", "BT", "STATES_IN_MEMORY", "PRECISION", "PROGRAMS"], **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["PROGRAMS"])
def bigla_bwd_chunks_kernel(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, steep_flags,
                            hf_states, hb_states, dhf_states, dhb_states,
                            q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st,
                            scale, T, NS, H, split_stride, PROGRAMS,
                            K: tl.constexpr, V: tl.constexpr, SEG: tl.constexpr, BC: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                            LIMIT: tl.constexpr, CHUNK_LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """dq, dk, dv, dg_fwd, dg_bwd for one segment of one (batch, head) and one block of value columns,
    under mild gates.

    First the right-to-left pass in BT-token steps (_bwd_right_to_left: the parts of the gradients that
    need R and dS, to scratch), which also finds the steepest chunk. If no chunk decays by more than
    CHUNK_LIMIT in any key channel, one left-to-right pass of [BT, BT] matrix products for both directions
    (_bwd_chunks) finishes the gradients; else the program only raises its steep flag and
    bigla_bwd_sweeps_kernel does its segment. do, the gradients and the scratch are contiguous; with several
    value blocks dq, dk and the gate gradients are partial sums, written split_stride apart and summed by the
    caller.
    """
    o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, bdo, bdk, offs, m_s, c0, seg_len, flag = _segment_program(
        q_sb, k_sb, v_sb, gf_sb, gb_sb, T, NS, H, split_stride, K, V, SEG, BK, BV)
    n_chunks = tl.cdiv(seg_len, BT)
    HK = H * K
    HV = H * V
    steepest = _bwd_right_to_left(q, k, v, gf, gb, do, dq_bwd, dk_fwd, dv_fwd, hb_states, dhf_states, offs, m_s,
                                  q_st, k_st, v_st, gf_st, gb_st, bq, bk, bv, bgf, bgb, bdo, bdk, T, c0, n_chunks, HK,
                                  HV, o_k, m_k, o_v, m_v, BT, BK, BV, STATES_IN_MEMORY, PRECISION)
    steep = steepest < -CHUNK_LIMIT
    tl.store(steep_flags + flag, steep.to(tl.int32))
    if not steep:
        tl.debug_barrier()  # the scratch rows written above are read back below, possibly by other threads
        S, dR, run_f, run_b = _bwd_left_edge(hf_states, hb_states, dhf_states, dhb_states, tl.program_id(2),
                                             tl.program_id(1), NS, o_k, m_k, o_v, m_v, K, V, BK, BV, STATES_IN_MEMORY)
        _bwd_chunks(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, S, dR, run_f, run_b, q_st,
                    k_st, v_st, gf_st, gb_st, bq, bk, bv, bgf, bgb, bdo, bdk, scale, T, c0, n_chunks, HK, HV, o_k,
                    m_k, o_v, m_v, BT, PRECISION)


@triton.autotune(configs=_autotune_configs(stages=(1,)),
                 key=["T", "K", "V", "BT", "STATES_IN_MEMORY", "PRECISION", "PROGRAMS"], **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["PROGRAMS"])
def bigla_bwd_sweeps_kernel(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, steep_flags,
                            hf_states, hb_states, dhf_states, dhb_states,
                            q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st,
                            scale, T, NS, H, split_stride, PROGRAMS,
                            K: tl.constexpr, V: tl.constexpr, SEG: tl.constexpr, BC: tl.constexpr,
                            BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, STATES_IN_MEMORY: tl.constexpr,
                            LIMIT: tl.constexpr, CHUNK_LIMIT: tl.constexpr, PRECISION: tl.constexpr):
    """The backward of the segments whose steep flag bigla_bwd_chunks_kernel raised, after its right-to-left
    pass wrote their scratch: BC-token sweeps that stay exact under any gates (_bwd_sub_chunk_sweeps); the
    other programs return at once. Same arguments as bigla_bwd_chunks_kernel."""
    o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, bdo, bdk, _, _, c0, seg_len, flag = _segment_program(
        q_sb, k_sb, v_sb, gf_sb, gb_sb, T, NS, H, split_stride, K, V, SEG, BK, BV)
    if tl.load(steep_flags + flag) != 0:
        _bwd_sub_chunk_sweeps(q, k, v, gf, gb, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, hf_states,
                              hb_states, dhf_states, dhb_states, tl.program_id(2), tl.program_id(1), NS, q_st, k_st,
                              v_st, gf_st, gb_st, bq, bk, bv, bgf, bgb, bdo, bdk, scale, T, c0, tl.cdiv(seg_len, BC),
                              H * K, H * V, o_k, m_k, o_v, m_v, K, V, BC, BK, BV, STATES_IN_MEMORY, LIMIT, PRECISION)


@triton.jit
def _decayed_outer(x, e, y, PRECISION: tl.constexpr):
    """(x * exp(e))^T y: a step's [NROWS, K] rows x, each decayed by its log decay e, against its rows y."""
    return _mm(tl.trans(x * tl.exp(e)), y, PRECISION)


# Uncapped, the kernel takes 254-255 registers (two programs of 4 warps per multiprocessor), and like the chunk
# kernels it is latency-bound; a cap trades spills (48-144 B at 168, 208-248 B at 128 with 8 warps: sm_90a
# compiles) for more programs in flight. On an H100 the autotuner picked 4 warps at 168 for bf16 inputs and no cap
# for fp32 (NOTES.md v16).
@triton.autotune(configs=_autotune_configs(stages=(2,), register_caps=(None, 168, 128)),
                 key=["T", "K", "V", "BK", "BV", "BT", "FIRST_KIND", "PRECISION", "PROGRAMS"], **AUTOTUNE_CACHE)
@triton.jit(do_not_specialize=["PROGRAMS"])
def bigla_segment_states_kernel(q, k, v, do, gf, gb, local, log_decay,
                                q_sb, q_st, k_sb, k_st, v_sb, v_st, gf_sb, gf_st, gb_sb, gb_st, T, NS, H, PROGRAMS,
                                K: tl.constexpr, V: tl.constexpr, SEG: tl.constexpr, BT: tl.constexpr,
                                BK: tl.constexpr, BV: tl.constexpr, FIRST_KIND: tl.constexpr,
                                PRECISION: tl.constexpr):
    """One segment's own contribution to one [BK, BV] tile of two states, kinds FIRST_KIND and FIRST_KIND + 1 (its
    tokens from a zero state), into local[kind - FIRST_KIND, batch*head, segment], and the sum of the segment's
    gates per key channel into log_decay (with the first value block). Axis 0 picks the tile and the segment,
    axis 1 the batch*head. Kinds: 0 forward state (k, v, g_fwd, left to right, exclusive), 1 backward state (k,
    v, g_bwd, right to left, exclusive), the forward pass's; 2 gradient of the forward state (q, do, g_fwd,
    right to left, inclusive), 3 gradient of the backward state (q, do, g_bwd, left to right, inclusive), the
    backward's (kinds 0 and 1 come from the forward, see chunk_bigla_fwd). Kinds 2 and 3 decay by the gates of
    kinds 0 and 1, so log_decay has two rows.

    The segment's tiles are read once for both kinds, walking left to right in BT-token steps: the
    left-to-right kind is carried (decayed across each step, then the step's terms added), the right-to-left
    kind is a sum whose terms decay by the gates between the segment's start and the token; every exponent
    is <= 0. Every segment runs in parallel; do is contiguous."""
    i_tn, i_bh = tl.program_id(0), tl.program_id(1)
    NKB: tl.constexpr = (K + BK - 1) // BK
    NTILES: tl.constexpr = NKB * ((V + BV - 1) // BV)
    i_kv, i_n = i_tn % NTILES, i_tn // NTILES
    i_k, i_v = i_kv % NKB, i_kv // NKB
    o_k, m_k, o_v, m_v, bq, bk, bv, bgf, bgb, row0 = _program_offsets(
        i_k, i_v, i_bh, T, H, q_sb, k_sb, v_sb, gf_sb, gb_sb, K, V, BK, BV)
    bdo = row0 * V
    first = tl.zeros([BK, BV], tl.float32)  # kind FIRST_KIND
    second = tl.zeros([BK, BV], tl.float32)  # kind FIRST_KIND + 1
    before_f = tl.zeros([BK], tl.float32)  # sums of the segment's gates left of the step
    before_b = tl.zeros([BK], tl.float32)
    for c in range(0, SEG // BT):
        r0 = i_n * SEG + c * BT
        gf_i = _load_rows(gf, bgf, r0, T, gf_st, o_k, m_k, BT)
        gb_i = _load_rows(gb, bgb, r0, T, gb_st, o_k, m_k, BT)
        prefix_f = _running_sums(gf_i, True, False, PRECISION)  # inclusive, within the step
        tot_f = _row(prefix_f, tl.arange(0, BT), BT - 1)  # as prefix_f took it: tot_f - prefix_f sums rows between
        tot_b = tl.sum(gb_i, 0)
        if FIRST_KIND == 0:
            k_i = _load_rows(k, bk, r0, T, k_st, o_k, m_k, BT)
            v_i = _load_rows(v, bv, r0, T, v_st, o_v, m_v, BT)
            first = first * tl.exp(tot_f)[:, None] + _decayed_outer(k_i, tot_f[None, :] - prefix_f, v_i, PRECISION)
            second += _decayed_outer(k_i, before_b[None, :] + _running_sums(gb_i, False, False, PRECISION), v_i,
                                     PRECISION)
        else:
            q_i = _load_rows(q, bq, r0, T, q_st, o_k, m_k, BT)
            do_i = _load_rows(do, bdo, r0, T, H * V, o_v, m_v, BT)
            first += _decayed_outer(q_i, before_f[None, :] + prefix_f, do_i, PRECISION)
            second = second * tl.exp(tot_b)[:, None] + _decayed_outer(q_i, _running_sums(gb_i, True, True, PRECISION),
                                                                      do_i, PRECISION)
        before_f += tot_f
        before_b += tot_b
    B_H = tl.num_programs(1)
    offs, m_s = _state_offsets(i_bh, i_n, NS, o_k, m_k, o_v, m_v, K, V)
    kind_stride = B_H.to(tl.int64) * NS * K * V
    tl.store(local + offs, first, mask=m_s)
    tl.store(local + kind_stride + offs, second, mask=m_s)
    decay_offs = (i_bh.to(tl.int64) * NS + i_n) * K + o_k
    decay_stride = B_H.to(tl.int64) * NS * K
    if i_v == 0:
        tl.store(log_decay + decay_offs, before_f, mask=m_k)
        tl.store(log_decay + decay_stride + decay_offs, before_b, mask=m_k)


@triton.jit
def bigla_combine_states_kernel(local, log_decay, states, NS, K: tl.constexpr, V: tl.constexpr, BK: tl.constexpr,
                                BV: tl.constexpr, FIRST_KIND: tl.constexpr):
    """The state entering every segment, for one [BK, BV] tile of one kind (FIRST_KIND + axis 2, numbered as in
    bigla_segment_states_kernel) of one batch*head: h <- diag(exp(log_decay[kind % 2, n])) h + local[n],
    segment after segment in the kind's direction; each step's inputs are loaded one step ahead."""
    i_kv, i_bh, i_d = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NKB: tl.constexpr = (K + BK - 1) // BK
    i_k, i_v = i_kv % NKB, i_kv // NKB
    o_k = i_k * BK + tl.arange(0, BK)
    m_k = o_k < K
    o_v = i_v * BV + tl.arange(0, BV)
    m_v = o_v < V
    i_dbh = i_d * tl.num_programs(1) + i_bh  # also the row of log_decay: the kind's gate is its number mod 2
    left_to_right = (i_d + FIRST_KIND == 0) | (i_d + FIRST_KIND == 3)
    n = tl.where(left_to_right, 0, NS - 1)
    step = tl.where(left_to_right, 1, -1)
    offs, m_s = _state_offsets(i_dbh, n, NS, o_k, m_k, o_v, m_v, K, V)
    loc = tl.load(local + offs, mask=m_s, other=0.0)
    dec = tl.load(log_decay + (i_dbh.to(tl.int64) * NS + n) * K + o_k, mask=m_k, other=0.0)
    h = tl.zeros([BK, BV], tl.float32)
    for _ in range(0, NS):
        tl.store(states + offs, h, mask=m_s)
        h = h * tl.exp(dec)[:, None] + loc
        n_next = tl.minimum(tl.maximum(n + step, 0), NS - 1)  # the last prefetch re-reads a valid segment
        next_offs, m_s = _state_offsets(i_dbh, n_next, NS, o_k, m_k, o_v, m_v, K, V)
        loc = tl.load(local + next_offs, mask=m_s, other=0.0)
        dec = tl.load(log_decay + (i_dbh.to(tl.int64) * NS + n_next) * K + o_k, mask=m_k, other=0.0)
        offs = next_offs
        n = n_next


def _head_strided(x: torch.Tensor) -> torch.Tensor:
    """x itself if each head's channels are contiguous and heads are packed, else a contiguous copy."""
    if x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]:
        return x
    return x.contiguous()


def matmul_precision(dtype: torch.dtype) -> str:
    """The kernels' product precision: tf32 for 16-bit inputs. fp32 inputs follow torch's float32 matmul
    precision, as torch.matmul does: "highest" (torch's default) runs tf32x3, fp32-accurate; "high" or
    "medium" (torch.set_float32_matmul_precision, or torch.backends.cuda.matmul.allow_tf32 = True, which
    timm's training script sets) runs tf32, the precision of fla's kernels on fp32 inputs: at ViG-T's shape
    2.1x faster than tf32x3 in forward + backward, 1.4x slower than bf16 inputs (H200, NOTES.md v12)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "tf32x3"
    return "tf32"


def _kernel_args(q, k, v, g_fwd, g_bwd):
    B, T, H, K = q.shape
    V = v.shape[-1]
    BK = max(16, triton.next_power_of_2(K))
    BV = min(max(16, triton.next_power_of_2(V)), MAX_BLOCK_V)
    strides = [s for x in (q, k, v, g_fwd, g_bwd) for s in (x.stride(0), x.stride(1))]
    common = dict(K=K, V=V, SEG=SEGMENT, BK=BK, BV=BV, PRECISION=matmul_precision(q.dtype))
    return B, T, H, K, V, triton.cdiv(V, BV), triton.cdiv(T, SEGMENT), strides, common


def _states(q, k, v, do, g_fwd, g_bwd, strides, T, NS, H, common, first_kind: int) -> torch.Tensor:
    """The states entering every segment, fp32 [2, B * H, NS, K, V]: the forward and backward states
    (first_kind 0, the forward pass) or their gradients (first_kind 2, the backward pass). Two launches: every
    segment's own contribution in parallel, then a short scan over the segments that combines them (NS steps
    instead of T / SCAN_CHUNK)."""
    B, K, V = q.shape[0], common["K"], common["V"]
    local = torch.empty(2, B * H, NS, K, V, dtype=torch.float32, device=q.device)
    log_decay = torch.empty(2, B * H, NS, K, dtype=torch.float32, device=q.device)
    BK, BV = state_tile(B * H * NS, common["BK"], common["BV"], q.device)
    tiles = triton.cdiv(K, BK) * triton.cdiv(V, BV)
    grid = (tiles * NS, B * H)
    bigla_segment_states_kernel[grid](q, k, v, do, g_fwd, g_bwd, local, log_decay, *strides, T, NS, H,
                                      tuning_programs(math.prod(grid)), BT=SCAN_CHUNK, FIRST_KIND=first_kind,
                                      **{**common, "BK": BK, "BV": BV})
    states = torch.empty_like(local)
    BK, BV = state_tile(B * H * 2, common["BK"], common["BV"], q.device)
    tiles = triton.cdiv(K, BK) * triton.cdiv(V, BV)
    bigla_combine_states_kernel[(tiles, B * H, 2)](local, log_decay, states, NS, K=K, V=V, BK=BK, BV=BV,
                                                   FIRST_KIND=first_kind)
    return states


MIN_STATE_TILE = 16  # tl.dot's smallest operand side
SCANS_PER_SM = 4  # enough resident scans per multiprocessor to hide the latency of each scan's steps


def state_tile(scans: int, BK: int, BV: int, device: torch.device) -> tuple[int, int]:
    """[BK, BV] tile of the states each program carries: whole states when `scans` (the programs at whole
    states: sequences x segments for the per-segment kernel, sequences x state kinds for the combine) fill
    the GPU, else halved (the larger side first) down to 16 x 16 until they do. Off a GPU (the interpreter)
    the smallest tile, so the tests cover the split states."""
    target = SCANS_PER_SM * _multiprocessors(device) if device.type == "cuda" else None
    programs = scans
    while BK > MIN_STATE_TILE or BV > MIN_STATE_TILE:
        if target is not None and programs >= target:
            break
        if BV >= BK:
            BV //= 2
        else:
            BK //= 2
        programs *= 2
    return BK, BV


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def edge_states_shape(q: torch.Tensor, v: torch.Tensor) -> tuple[int, ...] | None:
    """Shape of the segment-edge states chunk_bigla_fwd returns for these inputs: None for T <= SEGMENT (one
    segment, nothing to keep), else [2 (forward, backward state), B * H, segments, K, V], fp32."""
    B, T, H, K = q.shape
    NS = triton.cdiv(T, SEGMENT)
    return None if NS == 1 else (2, B * H, NS, K, v.shape[-1])


def chunk_bigla_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                    scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """BiGLA forward with Triton: o = scale/2 * q (S + R), o in q's dtype, contiguous; and, for T > SEGMENT, the
    forward and backward states entering every segment (edge_states_shape), which chunk_bigla_bwd takes instead
    of scanning them again: 2 * K * V fp32 per SEGMENT tokens and head, a sixth of what q, k, v and the gates
    take in bf16 at ViG's heads (K = 32, V = 64); the states inside a segment are recomputed.

    q, k, v share one dtype (fp32, bf16 or fp16); the gates may have any float dtype (read as fp32).
    """
    q, k, v, g_fwd, g_bwd = (_head_strided(x) for x in (q, k, v, g_fwd, g_bwd))
    B, T, H, K, V, NV, NS, strides, common = _kernel_args(q, k, v, g_fwd, g_bwd)
    o = output_buffer((B, T, H, V), q.dtype, q.device)
    o_bwd = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    steep_flags = torch.empty(B * H * NS * NV, dtype=torch.int32, device=q.device)
    if NS > 1:
        edge_states = _states(q, k, v, q, g_fwd, g_bwd, strides, T, NS, H, common, first_kind=0)
        hf, hb = edge_states.unbind(0)
    else:
        edge_states = None
        hf = hb = o_bwd  # not read
    grid = (NV, NS, B * H)
    args = (q, k, v, g_fwd, g_bwd, o, o_bwd, steep_flags, hf, hb, *strides, 0.5 * scale, T, NS, H,
            tuning_programs(math.prod(grid)))
    constants = dict(BC=SUB_CHUNK, BT=FWD_CHUNK, STATES_IN_MEMORY=NS > 1, LIMIT=DIAG_MATMUL_LIMIT,
                     CHUNK_LIMIT=CHUNK_DECAY_LIMIT, **common)
    bigla_fwd_chunks_kernel[grid](*args, **constants)
    bigla_fwd_sweeps_kernel[grid](*args, **constants)
    return o.to(q.dtype), edge_states


def _check_edge_states(edge_states: torch.Tensor | None, q: torch.Tensor, v: torch.Tensor) -> None:
    expected = edge_states_shape(q, v)
    if edge_states is None:
        fits = expected is None
    else:
        fits = (tuple(edge_states.shape) == expected and edge_states.dtype == torch.float32
                and edge_states.device == q.device and edge_states.is_contiguous())
    if not fits:
        got = ("None" if edge_states is None
               else f"{edge_states.dtype} {tuple(edge_states.shape)} on {edge_states.device}")
        wanted = "None" if expected is None else f"contiguous torch.float32 {expected} on {q.device}"
        raise ValueError(f"chunk_bigla_bwd: edge_states is {got}, expected {wanted} (T = {q.shape[1]}): "
                         "pass the second output of chunk_bigla_fwd on the same inputs")


def chunk_bigla_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g_fwd: torch.Tensor, g_bwd: torch.Tensor,
                    do: torch.Tensor, scale: float, edge_states: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """Gradients (dq, dk, dv, dg_fwd, dg_bwd) of chunk_bigla_fwd, each in its input's dtype; edge_states is
    chunk_bigla_fwd's second output on the same inputs."""
    q, k, v, g_fwd, g_bwd = (_head_strided(x) for x in (q, k, v, g_fwd, g_bwd))
    _check_edge_states(edge_states, q, v)
    do = do.to(q.dtype).contiguous()
    B, T, H, K, V, NV, NS, strides, common = _kernel_args(q, k, v, g_fwd, g_bwd)
    dv = output_buffer((B, T, H, V), v.dtype, q.device)
    if NV == 1:
        dq, dk, dgf, dgb = (output_buffer((B, T, H, K), x.dtype, q.device) for x in (q, k, g_fwd, g_bwd))
    else:  # partial sums over value blocks
        dq, dk, dgf, dgb = (torch.empty(NV, B, T, H, K, dtype=torch.float32, device=q.device) for _ in range(4))
    dq_bwd, dk_fwd = (torch.empty(NV, B, T, H, K, dtype=torch.float32, device=q.device) for _ in range(2))
    dv_fwd = torch.empty(B, T, H, V, dtype=torch.float32, device=q.device)
    steep_flags = torch.empty(B * H * NS * NV, dtype=torch.int32, device=q.device)
    if NS > 1:
        hf, hb = edge_states.unbind(0)
        dhf, dhb = _states(q, k, v, do, g_fwd, g_bwd, strides, T, NS, H, common, first_kind=2).unbind(0)
    else:
        hf = hb = dhf = dhb = dv_fwd  # not read
    grid = (NV, NS, B * H)
    args = (q, k, v, g_fwd, g_bwd, do, dq, dk, dv, dgf, dgb, dq_bwd, dk_fwd, dv_fwd, steep_flags, hf, hb, dhf, dhb,
            *strides, 0.5 * scale, T, NS, H, B * T * H * K, tuning_programs(math.prod(grid)))
    constants = dict(BC=SUB_CHUNK, BT=BWD_CHUNK, STATES_IN_MEMORY=NS > 1, LIMIT=DIAG_MATMUL_LIMIT,
                     CHUNK_LIMIT=CHUNK_DECAY_LIMIT, **common)
    bigla_bwd_chunks_kernel[grid](*args, **constants)
    bigla_bwd_sweeps_kernel[grid](*args, **constants)
    if NV > 1:
        dq, dk, dgf, dgb = (x.sum(0) for x in (dq, dk, dgf, dgb))
    return tuple(x.to(ref.dtype) for x, ref in ((dq, q), (dk, k), (dv, v), (dgf, g_fwd), (dgb, g_bwd)))
