"""SlotBank: preallocated, slot-stacked adapter weights that serve a mixed batch in one pass.

``set(slot, compiled)`` writes one adapter's runtime forms into its slot; ``reset(slot)`` empties it.
A site's stack is allocated the first time any adapter uses that site and grows (at load time, never
on the hot path) when a larger rank arrives. Vector and visual stacks keep the backbone's own values
at index ``num_slots``, the row that serves requests without an adapter.

Inside ``with bank.batched():`` the low-rank part of every ``set`` and ``reset`` is held back and
written when the block ends, one group of ops per site for all the slots written (a scheduler
iteration that loads 20 adapters pays each site's few ops once, not 20 times); the other forms are
written at once. Reads (the RuntimeWeights methods) see the block's writes after it ends.
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager

import torch

from petserve.adapters.runtime.forms import (
    BottleneckForm,
    CompiledAdapter,
    ConformerForm,
    HeadForm,
    LowRankForm,
)
from petserve.adapters.runtime.weights import (
    HeadStack,
    PrefixStack,
    sparse_stack_of,
    visual_stack_from,
)
from petserve.kernels import (
    GATE_NAMES,
    BottleneckStack,
    ConformerStack,
    LinearStack,
    LowRankStack,
    bottleneck_slot_written,
    lowrank_slots_written,
)


def _grow(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to at least ``size`` (next power of two)."""
    if t.shape[dim] >= size:
        return t
    shape = list(t.shape)
    shape[dim] = 1 << (size - 1).bit_length()
    out = t.new_zeros(shape)
    out.narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


class SlotBank:
    def __init__(self, model, num_slots: int):
        if num_slots < 1:
            raise ValueError("a slot bank needs at least one slot")
        self.num_slots = num_slots
        self.device, self.dtype = model.device, model.dtype
        self._base_vectors = {n: p.detach() for n, p in model.lm.vector_params().items()}
        self._base_visual = {k: v.detach() for k, v in model.visual_embed.state_dict().items()}
        self._lowrank: dict[str, LowRankStack] = {}
        # sparse deltas: each slot's form per site; the site's stack is rebuilt after a change
        self._sparse_forms: dict[str, list] = {}
        self._sparse: dict[str, object] = {}
        self._bneck: dict[str, BottleneckStack] = {}
        self._vectors: dict[str, torch.Tensor] = {}
        self._visual: dict[str, torch.Tensor] | None = None
        self._prefix: PrefixStack | None = None
        self._conformer: dict[str, ConformerStack] = {}
        self._head: HeadStack | None = None
        self._used: dict[int, CompiledAdapter] = {}
        # low-rank writes held back until the outermost batched() block ends
        self._batching = 0
        self._pending_lowrank: dict[int, dict[str, LowRankForm]] = {}    # slot -> site -> form
        self._pending_clear: dict[str, set[int]] = defaultdict(set)     # site -> slots to empty

    # ---- RuntimeWeights ------------------------------------------------------------------
    def lowrank(self, site):
        return self._lowrank.get(site)

    def bottleneck(self, site):
        return self._bneck.get(site)

    def sparse(self, site):
        if site not in self._sparse:
            forms = self._sparse_forms.get(site)
            self._sparse[site] = None if forms is None or not any(f is not None for f in forms) \
                else sparse_stack_of(forms)
        return self._sparse[site]

    def vector(self, name):
        return self._vectors.get(name)

    def visual(self):
        return None if self._visual is None else visual_stack_from(self._visual)

    def prefix(self):
        return self._prefix

    def conformer(self, site):
        return self._conformer.get(site)

    def head(self):
        return self._head

    # ---- loading -------------------------------------------------------------------------
    @contextmanager
    def batched(self):
        """Hold back low-rank writes until the block ends (see the module docstring)."""
        self._batching += 1
        try:
            yield
        finally:
            self._batching -= 1
            if not self._batching:
                self._write_lowrank()

    def set(self, slot: int, compiled: CompiledAdapter) -> None:
        """Write one adapter into ``slot`` (replacing whatever was there)."""
        self._check(slot)
        with self.batched():           # the slot's old low-rank rows are overwritten, not cleared
            self.reset(slot)
            self._write(slot, compiled)

    def _write(self, slot: int, compiled: CompiledAdapter) -> None:
        c = compiled.to(self.device, self.dtype)
        if c.lowrank:
            self._pending_lowrank[slot] = c.lowrank
        for site, f in c.sparse.items():
            self._sparse_forms.setdefault(site, [None] * self.num_slots)[slot] = f
            self._sparse.pop(site, None)
        for site, f in c.bottleneck.items():
            self._set_bottleneck(site, slot, f)
        for name, v in c.vectors.items():
            self._vector_stack(name)[slot].copy_(v)
        if c.visual is not None:
            for k, v in c.visual.items():
                self._visual_stacks()[k][slot].copy_(v)
        if c.prefix is not None:
            self._set_prefix(slot, c.prefix)
        for site, f in c.conformer.items():
            self._set_conformer(site, slot, f)
        if c.head is not None:
            self._set_head(slot, c.head)
        self._used[slot] = compiled

    def reset(self, slot: int) -> None:
        """Empty ``slot``: its rows behave as the backbone until the next ``set``."""
        self._check(slot)
        c = self._used.pop(slot, None)
        if c is None:
            return
        self._pending_lowrank.pop(slot, None)
        for site in c.lowrank:
            self._pending_clear[site].add(slot)
        for site in c.sparse:
            self._sparse_forms[site][slot] = None
            self._sparse.pop(site, None)
        for site in c.bottleneck:
            st = self._bneck[site]
            st.ranks[slot], st.ranks_host[slot] = 0, 0
            bottleneck_slot_written(st, slot)
        for name in c.vectors:
            self._vectors[name][slot].copy_(self._base_vectors[name])
        if c.visual is not None:
            for k, stack in self._visual.items():
                stack[slot].copy_(self._base_visual[k])
        if c.prefix is not None:
            self._prefix.lengths_host[slot] = 0
        for site in c.conformer:
            self._conformer[site].ranks_host[slot] = 0
        if c.head is not None:
            self._head.classes_host[slot] = 0
        if not self._batching:
            self._write_lowrank()

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside 0..{self.num_slots - 1}")

    # ---- stacks --------------------------------------------------------------------------
    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(self.num_slots, *shape, device=self.device, dtype=self.dtype)

    def _ranks(self):
        return torch.zeros(self.num_slots, dtype=torch.int32, device=self.device), [0] * self.num_slots

    def _write_lowrank(self) -> None:
        """The held-back low-rank writes: per site, the slots emptied, then the slots written,
        each group of equal rank in one indexed copy per tensor."""
        by_site: dict[str, dict[int, LowRankForm]] = defaultdict(dict)
        for slot, forms in self._pending_lowrank.items():
            for site, f in forms.items():
                by_site[site][slot] = f
        for site, slots in self._pending_clear.items():
            emptied = sorted(slots - by_site[site].keys()) if site in by_site else sorted(slots)
            st = self._lowrank.get(site)       # None: set and emptied again before any write
            if emptied and st is not None:
                st.ranks.index_fill_(0, self._index(emptied), 0)
                for s in emptied:
                    st.ranks_host[s] = 0
                lowrank_slots_written(st, emptied)
        for site, forms in by_site.items():
            self._set_lowrank(site, forms)
        self._pending_lowrank.clear()
        self._pending_clear.clear()

    def _index(self, slots) -> torch.Tensor:
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    def _set_lowrank(self, site: str, forms: dict[int, LowRankForm]) -> None:
        top = max(f.A.shape[0] for f in forms.values())
        st = self._lowrank.get(site)
        if st is None:
            f = next(iter(forms.values()))
            ranks, host = self._ranks()
            st = LowRankStack(self._zeros(top, f.A.shape[1]), self._zeros(f.B.shape[0], top),
                              self._zeros(), ranks, host)
        st.A, st.B = _grow(st.A, 1, top), _grow(st.B, 2, top)
        if len(forms) == 1:            # one slot: plain views, a third of the indexed form's ops
            (slot, f), = forms.items()
            r = f.A.shape[0]
            st.A[slot, :r], st.B[slot, :, :r], st.scale[slot] = f.A, f.B, f.scale
            st.ranks[slot], st.ranks_host[slot] = r, r
        else:
            by_rank: dict[int, list[int]] = defaultdict(list)
            for slot, f in forms.items():
                by_rank[f.A.shape[0]].append(slot)
                st.ranks_host[slot] = f.A.shape[0]
            for r, slots in by_rank.items():
                idx = self._index(slots)
                st.A.narrow(1, 0, r).index_copy_(0, idx, torch.stack([forms[s].A for s in slots]))
                st.B.narrow(2, 0, r).index_copy_(0, idx, torch.stack([forms[s].B for s in slots]))
                st.scale.index_copy_(0, idx, torch.tensor([forms[s].scale for s in slots],
                                                          dtype=st.scale.dtype, device=self.device))
                st.ranks.index_fill_(0, idx, r)
        lowrank_slots_written(st, sorted(forms))
        self._lowrank[site] = st

    def _set_bottleneck(self, site: str, slot: int, f: BottleneckForm) -> None:
        r, d_src, d = f.D.shape[0], f.D.shape[1], f.U.shape[0]
        st = self._bneck.get(site)
        if st is None:
            ranks, host = self._ranks()
            st = BottleneckStack(self._zeros(r, d_src), self._zeros(r), self._zeros(d, r), self._zeros(d),
                                 ranks, host, [False] * self.num_slots, [0] * self.num_slots,
                                 self._zeros(), gate_ranks_host=[0] * self.num_slots,
                                 residual_host=[False] * self.num_slots)
        st.D, st.bd, st.U = _grow(st.D, 1, r), _grow(st.bd, 1, r), _grow(st.U, 2, r)
        st.D[slot, :r], st.bd[slot, :r], st.U[slot, :, :r], st.bu[slot] = f.D, f.bd, f.U, f.bu
        st.ranks[slot], st.ranks_host[slot] = r, r
        st.from_input_host[slot], st.gate_host[slot] = f.from_input, GATE_NAMES[f.gate]
        st.out_scale[slot], st.residual_host[slot] = f.out_scale, f.gate_reads_residual
        self._set_gate(st, slot, f, d)
        bottleneck_slot_written(st, slot)
        self._bneck[site] = st

    def _set_gate(self, st: BottleneckStack, slot: int, f: BottleneckForm, d: int) -> None:
        if f.gate in ("small", "middleX"):
            if st.gate_w is None:
                st.gate_w, st.gate_b = self._zeros(2 * d), self._zeros()
            st.gate_w[slot].zero_()
            st.gate_w[slot, :f.gate_w.shape[0]] = f.gate_w
            st.gate_b[slot] = f.gate_b
        elif f.gate == "middleY":
            if st.gate_vec is None:
                st.gate_vec = self._zeros(d)
            st.gate_vec[slot] = f.gate_vec
        elif f.gate == "large":
            rg = f.gate_D.shape[0]
            if st.gate_D is None:
                st.gate_D, st.gate_bd = self._zeros(rg, d), self._zeros(rg)
                st.gate_U, st.gate_bu = self._zeros(d, rg), self._zeros(d)
            st.gate_D, st.gate_bd = _grow(st.gate_D, 1, rg), _grow(st.gate_bd, 1, rg)
            st.gate_U = _grow(st.gate_U, 2, rg)
            st.gate_D[slot, :rg], st.gate_bd[slot, :rg] = f.gate_D, f.gate_bd
            st.gate_U[slot, :, :rg], st.gate_bu[slot] = f.gate_U, f.gate_bu
            st.gate_ranks_host[slot] = rg

    def _vector_stack(self, name: str) -> torch.Tensor:
        if name not in self._vectors:
            if name not in self._base_vectors:
                raise KeyError(f"the backbone has no vector {name!r}")
            base = self._base_vectors[name]
            self._vectors[name] = base.unsqueeze(0).repeat(self.num_slots + 1, 1).clone()
        return self._vectors[name]

    def _visual_stacks(self) -> dict[str, torch.Tensor]:
        if self._visual is None:
            self._visual = {k: self._base_visual[k].unsqueeze(0).repeat(
                self.num_slots + 1, *[1] * self._base_visual[k].dim()).clone() for k in self._base_visual}
        return self._visual

    def _set_prefix(self, slot: int, p: torch.Tensor) -> None:
        n, d = p.shape
        if self._prefix is None:
            self._prefix = PrefixStack(self._zeros(n, d), [0] * self.num_slots)
        self._prefix.vectors = _grow(self._prefix.vectors, 1, n)
        self._prefix.vectors[slot, :n] = p
        self._prefix.lengths_host[slot] = n

    def _set_conformer(self, site: str, slot: int, f: ConformerForm) -> None:
        """Slot ``slot`` of the site's stack holds ``f`` zero-padded to the stack's rank R and
        kernel K (the padding adds exactly nothing, see kernels.conformer_residual)."""
        r, k = f.dw.shape
        st = self._conformer.get(site)
        if st is None:
            S = self.num_slots
            st = ConformerStack(self._zeros(2 * r, f.W1.shape[1]), self._zeros(2 * r), self._zeros(r, k),
                                self._zeros(r), self._zeros(r), self._zeros(r), self._zeros(r),
                                self._zeros(r), self._zeros(f.W2.shape[0], r), self._zeros(f.W2.shape[0]),
                                [0] * S, [0] * S, [False] * S, [1e-5] * S)
        st = _widen_conformer(st, max(r, st.dw.shape[1]), max(k, st.dw.shape[2]))
        R, K = st.dw.shape[1], st.dw.shape[2]
        for t in (st.W1, st.b1, st.dw, st.bdw, st.bn_weight, st.bn_bias, st.bn_mean, st.bn_var, st.W2):
            t[slot].zero_()
        st.W1[slot, :r], st.W1[slot, R:R + r] = f.W1[:r], f.W1[r:]
        st.b1[slot, :r], st.b1[slot, R:R + r] = f.b1[:r], f.b1[r:]
        lo = (K - k) // 2
        st.dw[slot, :r, lo:lo + k], st.bdw[slot, :r] = f.dw, f.bdw
        st.bn_weight[slot, :r], st.bn_bias[slot, :r] = f.bn_weight, f.bn_bias
        st.bn_mean[slot, :r], st.bn_var[slot, :r] = f.bn_mean, f.bn_var
        st.W2[slot, :, :r], st.b2[slot] = f.W2, f.b2
        st.ranks_host[slot], st.kernel_host[slot] = r, k
        st.from_input_host[slot], st.bn_eps[slot] = f.from_input, f.bn_eps
        self._conformer[site] = st

    def _set_head(self, slot: int, f: HeadForm) -> None:
        C, d = f.W.shape
        if self._head is None:
            self._head = HeadStack(LinearStack(self._zeros(C, d), self._zeros(C)), [0] * self.num_slots)
        lin = self._head.linear
        lin.W, lin.b = _grow(lin.W, 1, C), _grow(lin.b, 1, C)
        lin.W[slot].zero_()
        lin.b[slot].zero_()
        lin.W[slot, :C], lin.b[slot, :C] = f.W, f.b
        self._head.classes_host[slot] = C


def _widen_conformer(st: ConformerStack, R2: int, K2: int) -> ConformerStack:
    """``st`` with room for rank R2 and kernel K2 (both halves of W1 / b1 widened, kernels
    re-centred); ``st`` itself when it is wide enough."""
    R, K = st.dw.shape[1], st.dw.shape[2]
    if R2 == R and K2 == K:
        return st

    def widen(t, dim):
        out = t.new_zeros(*t.shape[:dim], R2, *t.shape[dim + 1:])
        out.narrow(dim, 0, R).copy_(t)
        return out

    def halves(t):
        out = t.new_zeros(t.shape[0], 2 * R2, *t.shape[2:])
        out[:, :R], out[:, R2:R2 + R] = t[:, :R], t[:, R:]
        return out
    dw = st.dw.new_zeros(st.dw.shape[0], R2, K2)
    dw[:, :R, (K2 - K) // 2:(K2 - K) // 2 + K] = st.dw
    return ConformerStack(halves(st.W1), halves(st.b1), dw, widen(st.bdw, 1), widen(st.bn_weight, 1),
                          widen(st.bn_bias, 1), widen(st.bn_mean, 1), widen(st.bn_var, 1),
                          widen(st.W2, 2), st.b2, st.ranks_host, st.kernel_host, st.from_input_host,
                          st.bn_eps)
