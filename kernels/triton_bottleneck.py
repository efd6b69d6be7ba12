"""Triton grouped bottleneck residual with the VL-PET gates, for :func:`bottleneck_residual`.

Launches per call (grids are ``(column tiles, segment tiles)`` unless noted):

1. ``_down_kernel``, grid ``(rank tiles of R + rank tiles of Rg, segment tiles)``:
   ``Z[p, :r] = act(src @ D[s, :r].T + bd[s, :r])`` into an fp32 ``(N, R)`` intermediate in
   sorted-token order; the trailing rank tiles compute the large gate's
   ``ZG[p, :rg] = act(x @ gate_D[s, :rg].T + gate_bd[s, :rg])`` in the same launch.
2. ``_up_kernel``: ``hp = h + Z @ U[s, :, :r].T + bu[s]``, then the per-channel gates (none,
   middleY, large) and ``out_scale``: final. Tokens of slot -1 / rank 0 copy ``h``. For the
   per-token gates (middleX, small) it stores the ungated ``hp`` and atomically adds each column
   tile's share of the gate logit into ``logit[p]``: the logit needs the whole row of ``hp``.
3. only if a slot uses the small gate: ``_small_reduce_kernel``, grid ``(segment tiles,)``, adds
   ``sigmoid(logit + gate_b)`` of each valid token into its (segment, row) group's sum.
4. only if a slot uses middleX or small: ``_row_gate_kernel`` scales ``out`` in place by
   ``G * out_scale``.

Plus a memset of ``logit`` (and of the group sums) when a row gate is present: 2 launches for
none / middleY / large, 4 for middleX, 6 for small. Every token is written by launch 2, so
``out`` needs no clone of ``h``.

Ranks: the down rank tiles past ``r_s`` (``rg_s``) exit at once, the up K-loops stop at ``r_s``.
Why not one kernel: the up projection needs all of ``Z[p, :r]`` (a grid-wide dependency on the
down projection's rank tiles), and the row gates need the whole row of ``hp`` across the column
tiles; both would otherwise force one program per token tile over the whole width.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from petserve.kernels.segments import SegmentMeta
from petserve.kernels.stacks import GATE_LARGE, GATE_MIDDLE_X, GATE_MIDDLE_Y, GATE_SMALL, BottleneckStack
from petserve.kernels.triton_common import (
    BLOCK_R,
    col_block,
    dot_precision,
    gathered_matmul_t,
    gelu_tanh,
    pick_block_m,
    rank_loop_matmul_t,
    row_groups,
    segment_tile,
    tile_table,
)

# Gate kinds as compile-time constants inside the kernels.
_SMALL = tl.constexpr(GATE_SMALL)
_MIDDLE_X = tl.constexpr(GATE_MIDDLE_X)
_MIDDLE_Y = tl.constexpr(GATE_MIDDLE_Y)
_LARGE = tl.constexpr(GATE_LARGE)


@triton.jit
def _slot_info(info_ptr, slot):
    """(rank, from_input, gate kind, gate rank): row ``slot`` of the (S, 4) int32 table built by
    :func:`_slot_table`; slot -1 reads as rank 0."""
    row = info_ptr + tl.maximum(slot, 0) * 4
    rank = tl.where(slot >= 0, tl.load(row), 0)
    return rank, tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def _down_act_store(src_ptr, stride_sm, stride_sk, w_ptr, stride_wr, stride_wk, b_ptr, tok, pos,
                    m_mask, r0, rank, dim, z_ptr, stride_zm, BLOCK_M: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Z[pos, j] = act(src[tok] @ w[j].T + b[j]) for j in r0..r0+BLOCK_R, j < rank."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    r_mask = offs_r < rank
    acc = gathered_matmul_t(src_ptr, tok, m_mask, stride_sm, stride_sk, w_ptr, stride_wr,
                            stride_wk, offs_r, r_mask, dim, BLOCK_M, BLOCK_R, BLOCK_K,
                            DOT_PRECISION)
    bias = tl.load(b_ptr + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    z = gelu_tanh(acc + bias[None, :])
    tl.store(z_ptr + pos[:, None] * stride_zm + offs_r[None, :], z,
             mask=m_mask[:, None] & r_mask[None, :])


@triton.jit
def _down_kernel(x_ptr, h_ptr, d_ptr, bd_ptr, gd_ptr, gbd_ptr, info_ptr, order_ptr, tile_slot_ptr,
                 tile_start_ptr, tile_end_ptr, z_ptr, zg_ptr, dim, main_tiles, stride_m,
                 stride_ds, stride_dr, stride_dk, stride_bds, stride_gds, stride_gdr, stride_gdk,
                 stride_gbds, stride_zm, stride_zgm, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr,
                 BLOCK_K: tl.constexpr, HAS_LARGE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Rank tile j < main_tiles: Z (adapter down projection); j >= main_tiles: ZG (large gate).
    x and h share the row stride ``stride_m`` and have contiguous rows (checked on the host)."""
    pid_r = tl.program_id(0)
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    rank, from_input, gate, gate_rank = _slot_info(info_ptr, slot)
    s64 = tl.maximum(slot, 0).to(tl.int64)
    r0 = pid_r * BLOCK_R
    if (pid_r < main_tiles) & (r0 < rank):
        src_ptr = h_ptr  # sequential adapter
        if from_input != 0:
            src_ptr = x_ptr  # parallel adapter
        _down_act_store(src_ptr, stride_m, 1, d_ptr + s64 * stride_ds, stride_dr, stride_dk,
                        bd_ptr + s64 * stride_bds, tok, pos, m_mask, r0, rank, dim, z_ptr,
                        stride_zm, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION)
    if HAS_LARGE:
        g0 = (pid_r - main_tiles) * BLOCK_R
        if (pid_r >= main_tiles) & (rank > 0) & (gate == _LARGE) & (g0 < gate_rank):
            _down_act_store(x_ptr, stride_m, 1, gd_ptr + s64 * stride_gds, stride_gdr, stride_gdk,
                            gbd_ptr + s64 * stride_gbds, tok, pos, m_mask, g0, gate_rank, dim,
                            zg_ptr, stride_zgm, BLOCK_M, BLOCK_R, BLOCK_K, DOT_PRECISION)


@triton.jit
def _add_logit_share(x_ptrs, mask, hp, gw_row, n_mask, is_small, dim, logit_ptr, pos, m_mask):
    """logit[pos] += this column tile's share of the row gate's dot product; atomic, as the
    row's other column tiles add theirs. small: w[:d].x + w[d:].hp; middleX: w[:d].(x + hp)."""
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    wx = tl.load(gw_row, mask=n_mask, other=0.0).to(tl.float32)
    wh = tl.load(gw_row + tl.where(is_small, dim, 0), mask=n_mask, other=0.0).to(tl.float32)
    tl.atomic_add(logit_ptr + pos, tl.sum(wx[None, :] * x + wh[None, :] * hp, axis=1), mask=m_mask)


@triton.jit
def _up_kernel(h_ptr, x_ptr, out_ptr, z_ptr, zg_ptr, u_ptr, bu_ptr, gu_ptr, gbu_ptr, gvec_ptr,
               gw_ptr, scale_ptr, info_ptr, logit_ptr, order_ptr, tile_slot_ptr, tile_start_ptr,
               tile_end_ptr, dim, stride_m, stride_zm, stride_zgm,
               stride_us, stride_un, stride_ur, stride_bus, stride_gus, stride_gun, stride_gur,
               stride_gbus, stride_gvs, stride_gws, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_R: tl.constexpr, HAS_MIDDLE_Y: tl.constexpr, HAS_LARGE: tl.constexpr,
               HAS_ROW_GATE: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """out = out_scale * G * hp for per-channel gates; ungated hp + logit partials otherwise.
    h, x and out share the row stride ``stride_m``; feature dims are contiguous everywhere."""
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    rank, from_input, gate, gate_rank = _slot_info(info_ptr, slot)
    s64 = tl.maximum(slot, 0).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < dim
    mask = m_mask[:, None] & n_mask[None, :]
    h = tl.load(h_ptr + tok[:, None] * stride_m + offs_n[None, :], mask=mask, other=0.0)
    out_ptrs = out_ptr + tok[:, None] * stride_m + offs_n[None, :]
    if rank == 0:  # slot -1 or no adapter at this site: out = h
        tl.store(out_ptrs, h, mask=mask)
        return
    acc = rank_loop_matmul_t(z_ptr, pos, m_mask, stride_zm, u_ptr + s64 * stride_us, stride_un,
                             stride_ur, offs_n, n_mask, rank, BLOCK_M, BLOCK_N, BLOCK_R,
                             DOT_PRECISION)
    bu = tl.load(bu_ptr + s64 * stride_bus + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    hp = h.to(tl.float32) + acc + bu[None, :]
    res = hp * tl.load(scale_ptr + slot).to(tl.float32)
    if HAS_MIDDLE_Y:
        if gate == _MIDDLE_Y:  # G = 1 + g, per channel
            g = tl.load(gvec_ptr + s64 * stride_gvs + offs_n, mask=n_mask, other=0.0)
            res *= (1.0 + g.to(tl.float32))[None, :]
    if HAS_LARGE:
        if gate == _LARGE:  # G = sigmoid(U_g ZG + b_u), per token and channel
            logit = rank_loop_matmul_t(zg_ptr, pos, m_mask, stride_zgm, gu_ptr + s64 * stride_gus,
                                       stride_gun, stride_gur, offs_n, n_mask, gate_rank, BLOCK_M,
                                       BLOCK_N, BLOCK_R, DOT_PRECISION)
            gb = tl.load(gbu_ptr + s64 * stride_gbus + offs_n, mask=n_mask, other=0.0)
            res *= tl.sigmoid(logit + gb.to(tl.float32)[None, :])
    if HAS_ROW_GATE:
        if (gate == _SMALL) | (gate == _MIDDLE_X):  # G needs the whole row of hp
            res = hp  # gated and scaled later by _row_gate_kernel
            _add_logit_share(x_ptr + tok[:, None] * stride_m + offs_n[None, :], mask, hp,
                             gw_ptr + s64 * stride_gws + offs_n, n_mask, gate == _SMALL, dim,
                             logit_ptr, pos, m_mask)
    tl.store(out_ptrs, res.to(h.dtype), mask=mask)


@triton.jit
def _small_reduce_kernel(logit_ptr, gate_b_ptr, group_ptr, weight_ptr, group_sum_ptr, info_ptr,
                         order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                         BLOCK_M: tl.constexpr):
    """group_sum[group[t]] += weight[t] * sigmoid(logit[p] + gate_b[s]) for small-gate tokens."""
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(0), BLOCK_M)
    rank, from_input, gate, gate_rank = _slot_info(info_ptr, slot)
    if (rank == 0) | (gate != _SMALL):
        return
    logit = tl.load(logit_ptr + pos, mask=m_mask, other=0.0)
    g = tl.sigmoid(logit + tl.load(gate_b_ptr + slot).to(tl.float32))
    wt = tl.load(weight_ptr + tok, mask=m_mask, other=0.0)
    grp = tl.load(group_ptr + tok, mask=m_mask, other=0)
    tl.atomic_add(group_sum_ptr + grp, g * wt, mask=m_mask)


@triton.jit
def _row_gate_kernel(out_ptr, logit_ptr, gate_b_ptr, group_ptr, group_sum_ptr, group_cnt_ptr,
                     scale_ptr, info_ptr, order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                     dim, stride_m, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     HAS_SMALL: tl.constexpr):
    """out[t, n-tile] *= out_scale[s] * G[t] for the middleX and small slots (in place)."""
    slot, pos, m_mask, tok = segment_tile(order_ptr, tile_slot_ptr, tile_start_ptr, tile_end_ptr,
                                          tl.program_id(1), BLOCK_M)
    rank, from_input, gate, gate_rank = _slot_info(info_ptr, slot)
    if (rank == 0) | ((gate != _SMALL) & (gate != _MIDDLE_X)):
        return
    logit = tl.load(logit_ptr + pos, mask=m_mask, other=0.0)
    g = tl.sigmoid(logit + tl.load(gate_b_ptr + slot).to(tl.float32))  # middleX
    if HAS_SMALL:
        if gate == _SMALL:  # small: the mean of g over the token's (segment, row) group
            grp = tl.load(group_ptr + tok, mask=m_mask, other=0)
            total = tl.load(group_sum_ptr + grp, mask=m_mask, other=0.0)
            g = total / tl.maximum(tl.load(group_cnt_ptr + grp, mask=m_mask, other=1.0), 1.0)
    g = g * tl.load(scale_ptr + slot).to(tl.float32)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (offs_n < dim)[None, :]
    ptrs = out_ptr + tok[:, None] * stride_m + offs_n[None, :]
    o = tl.load(ptrs, mask=mask, other=0.0)
    tl.store(ptrs, (o.to(tl.float32) * g[:, None]).to(o.dtype), mask=mask)


def _slot_table(w: BottleneckStack) -> torch.Tensor:
    """(S, 4) int32 device table ``[rank, from_input, gate kind, gate rank]`` per slot.

    Built from the stack's host lists and cached on the stack object under the lists' values, so
    it is rebuilt (one small host-to-device copy) only when an adapter is swapped into a slot.
    """
    num_slots = w.D.shape[0]
    gate_ranks = w.gate_ranks_host
    if gate_ranks is None:
        gate_ranks = [w.gate_D.shape[1] if w.gate_D is not None else 0] * num_slots
    key = (tuple(w.ranks_host), tuple(map(int, w.from_input_host)), tuple(w.gate_host),
           tuple(gate_ranks))
    cached = getattr(w, "_triton_slot_table", None)
    if cached is None or cached[0] != key:
        table = torch.tensor(list(zip(*key)), dtype=torch.int32, device=w.D.device)
        cached = (key, table.reshape(num_slots, 4))
        try:
            w._triton_slot_table = cached
        except AttributeError:  # a slotted stack: no cache, rebuild per call
            pass
    return cached[1]


def _check(h: torch.Tensor, x: torch.Tensor, w: BottleneckStack, seg: SegmentMeta) -> None:
    n, d = h.shape
    if x.shape != h.shape or w.D.shape[2] != d or w.U.shape[1] != d or w.bu.shape[1] != d:
        raise ValueError(f"shape mismatch: h {tuple(h.shape)}, x {tuple(x.shape)}, "
                         f"D {tuple(w.D.shape)}, U {tuple(w.U.shape)}")
    if w.U.shape[2] != w.D.shape[1] or seg.num_tokens != n:
        raise ValueError(f"U rank axis {w.U.shape[2]} != D's {w.D.shape[1]}, or seg has "
                         f"{seg.num_tokens} tokens for {n}")
    if not (h.dtype == x.dtype == w.D.dtype == w.U.dtype):
        raise TypeError(f"dtype mismatch: h {h.dtype}, x {x.dtype}, D {w.D.dtype}, U {w.U.dtype}")


def _vec(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """A per-slot parameter with contiguous rows (the kernels index its last dim unstrided), or a
    dummy pointer for a gate tensor no present slot reads."""
    return like if t is None else t.contiguous()


def _launch_down(h, x, w, info, tiles, kinds, cfg):
    """Launch 1: Z (N, R) and, if a large gate is present, ZG (N, Rg), both fp32."""
    n, d = h.shape
    present = cfg["present"]
    z = torch.empty(n, w.D.shape[1], dtype=torch.float32, device=h.device)
    main_tiles = triton.cdiv(max(w.ranks_host[s] for s in present), BLOCK_R)
    bd = _vec(w.bd, w.bd)
    zg, gd, gbd, gate_tiles = z, w.D, bd, 0  # dummies unless a large gate is present
    if GATE_LARGE in kinds:
        gd, gbd = w.gate_D, _vec(w.gate_bd, w.bd)
        zg = torch.empty(n, gd.shape[1], dtype=torch.float32, device=h.device)
        large = [s for s in present if w.gate_host[s] == GATE_LARGE]
        top = max(w.gate_ranks_host[s] for s in large) if w.gate_ranks_host else gd.shape[1]
        gate_tiles = triton.cdiv(top, BLOCK_R)
    _down_kernel[(main_tiles + gate_tiles, tiles[0].numel())](
        x, h, w.D, bd, gd, gbd, info, cfg["order"], *tiles, z, zg, d, main_tiles, h.stride(0),
        *w.D.stride(), bd.stride(0), *gd.stride(), gbd.stride(0), z.stride(0), zg.stride(0),
        BLOCK_M=cfg["block_m"], BLOCK_R=BLOCK_R, BLOCK_K=col_block(d),
        HAS_LARGE=GATE_LARGE in kinds, DOT_PRECISION=cfg["prec"])
    return z, zg


def _launch_up(h, x, out, z, zg, logit, w, info, tiles, kinds, cfg):
    """Launch 2: hp, per-channel gates and out_scale into ``out``; logit partials for row gates."""
    d = h.shape[1]
    has_large, has_row = GATE_LARGE in kinds, bool(kinds & {GATE_SMALL, GATE_MIDDLE_X})
    gu = w.gate_U if has_large else w.U
    gbu, gvec = _vec(w.gate_bu, w.bu), _vec(w.gate_vec, w.bu)
    gw, bu = _vec(w.gate_w, w.bu), _vec(w.bu, w.bu)
    block_n = col_block(d)
    _up_kernel[(triton.cdiv(d, block_n), tiles[0].numel())](
        h, x, out, z, zg, w.U, bu, gu, gbu, gvec, gw, cfg["out_scale"], info, logit, cfg["order"],
        *tiles, d, h.stride(0), z.stride(0), zg.stride(0), *w.U.stride(), bu.stride(0),
        *gu.stride(), gbu.stride(0), gvec.stride(0), gw.stride(0),
        BLOCK_M=cfg["block_m"], BLOCK_N=block_n, BLOCK_R=BLOCK_R,
        HAS_MIDDLE_Y=GATE_MIDDLE_Y in kinds, HAS_LARGE=has_large, HAS_ROW_GATE=has_row,
        DOT_PRECISION=cfg["prec"])


def _launch_row_gate(out, logit, w, seg, info, tiles, kinds, cfg):
    """Launches 3-4: the small gate's per-(segment, row) sums, then out *= G * out_scale."""
    d = out.shape[1]
    gate_b = w.gate_b.contiguous()
    group = weight = group_sum = group_cnt = logit  # dummies when no slot uses the small gate
    has_small = GATE_SMALL in kinds
    if has_small:
        group, weight, group_cnt, num_groups = row_groups(seg)
        group_sum = torch.zeros(num_groups, dtype=torch.float32, device=out.device)
        _small_reduce_kernel[(tiles[0].numel(),)](
            logit, gate_b, group, weight, group_sum, info, cfg["order"], *tiles,
            BLOCK_M=cfg["block_m"])
    block_n = col_block(d)
    _row_gate_kernel[(triton.cdiv(d, block_n), tiles[0].numel())](
        out, logit, gate_b, group, group_sum, group_cnt, cfg["out_scale"], info, cfg["order"],
        *tiles, d, out.stride(0), BLOCK_M=cfg["block_m"], BLOCK_N=block_n, HAS_SMALL=has_small)


def bottleneck_residual_triton(h: torch.Tensor, x: torch.Tensor, w: BottleneckStack,
                               seg: SegmentMeta, block_m: int | None = None) -> torch.Tensor:
    """Triton :func:`kernels.bottleneck.bottleneck_residual`; returns a new (N, d) tensor.

    Semantics: exactly the reference's (see ``bottleneck_residual``), computed as::

        Z[p, :r]   = act(src[t] @ D[s, :r].T + bd[s, :r])          # launch 1, t = order[p]
        ZG[p, :rg] = act(x[t] @ gate_D[s, :rg].T + gate_bd[s, :rg])  # launch 1, large gate only
        hp         = h[t] + Z[p, :r] @ U[s, :, :r].T + bu[s]        # launch 2
        out[t]     = out_scale[s] * G * hp                          # launch 2 (none/middleY/large)
        logit[p]   = gate_w[s] . ...  ;  out[t] = hp                # launch 2 (middleX/small)
        sums[grp]  += valid * sigmoid(logit + gate_b[s])            # launch 3 (small only)
        out[t]    *= out_scale[s] * G                               # launch 4 (middleX/small)

    Tokens of slot -1 or rank 0 get ``out[t] = h[t]``. ``block_m`` overrides the token tile height.
    """
    _check(h, x, w, seg)
    h, x = h.contiguous(), x.contiguous()
    present = [s for s in seg.slots if w.ranks_host[s] > 0]
    if not present:
        return h.clone()
    kinds = {w.gate_host[s] for s in present}
    cfg = {"present": present, "block_m": block_m or pick_block_m(seg), "order": seg.order,
           "prec": dot_precision(h.dtype), "out_scale": w.out_scale.contiguous()}
    tiles = tile_table(seg, cfg["block_m"], with_unassigned=True)
    info = _slot_table(w)
    z, zg = _launch_down(h, x, w, info, tiles, kinds, cfg)
    row_gated = bool(kinds & {GATE_SMALL, GATE_MIDDLE_X})
    logit = torch.zeros(h.shape[0], dtype=torch.float32, device=h.device) if row_gated else z
    out = torch.empty_like(h)
    _launch_up(h, x, out, z, zg, logit, w, info, tiles, kinds, cfg)
    if row_gated:
        _launch_row_gate(out, logit, w, seg, info, tiles, kinds, cfg)
    return out
