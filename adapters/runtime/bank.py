"""SlotBank: preallocated, slot-stacked adapter weights that serve a mixed batch in one pass.

``set(slot, compiled)`` writes one adapter's runtime forms into its slot; ``reset(slot)`` empties it.
A site's stack is allocated the first time any adapter uses that site and grows (at load time, never
on the hot path) when a larger rank arrives. Vector and visual stacks keep the backbone's own values
at index ``num_slots``, the row that serves requests without an adapter.
"""
from __future__ import annotations

import torch

from petserve.adapters.runtime.forms import BottleneckForm, CompiledAdapter, LowRankForm
from petserve.adapters.runtime.weights import PrefixStack, sparse_stack_of, visual_stack_from
from petserve.kernels import GATE_NAMES, BottleneckStack, LowRankStack


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
        self._used: dict[int, CompiledAdapter] = {}

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

    # ---- loading -------------------------------------------------------------------------
    def set(self, slot: int, compiled: CompiledAdapter) -> None:
        """Write one adapter into ``slot`` (replacing whatever was there)."""
        self._check(slot)
        self.reset(slot)
        c = compiled.to(self.device, self.dtype)
        for site, f in c.lowrank.items():
            self._set_lowrank(site, slot, f)
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
        self._used[slot] = compiled

    def reset(self, slot: int) -> None:
        """Empty ``slot``: its rows behave as the backbone until the next ``set``."""
        self._check(slot)
        c = self._used.pop(slot, None)
        if c is None:
            return
        for site in c.lowrank:
            st = self._lowrank[site]
            st.ranks[slot], st.ranks_host[slot] = 0, 0
        for site in c.sparse:
            self._sparse_forms[site][slot] = None
            self._sparse.pop(site, None)
        for site in c.bottleneck:
            st = self._bneck[site]
            st.ranks[slot], st.ranks_host[slot] = 0, 0
        for name in c.vectors:
            self._vectors[name][slot].copy_(self._base_vectors[name])
        if c.visual is not None:
            for k, stack in self._visual.items():
                stack[slot].copy_(self._base_visual[k])
        if c.prefix is not None:
            self._prefix.lengths_host[slot] = 0

    def _check(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"slot {slot} outside 0..{self.num_slots - 1}")

    # ---- stacks --------------------------------------------------------------------------
    def _zeros(self, *shape) -> torch.Tensor:
        return torch.zeros(self.num_slots, *shape, device=self.device, dtype=self.dtype)

    def _ranks(self):
        return torch.zeros(self.num_slots, dtype=torch.int32, device=self.device), [0] * self.num_slots

    def _set_lowrank(self, site: str, slot: int, f: LowRankForm) -> None:
        r, d_in, d_out = f.A.shape[0], f.A.shape[1], f.B.shape[0]
        st = self._lowrank.get(site)
        if st is None:
            ranks, host = self._ranks()
            st = LowRankStack(self._zeros(r, d_in), self._zeros(d_out, r), self._zeros(), ranks, host)
        st.A, st.B = _grow(st.A, 1, r), _grow(st.B, 2, r)
        st.A[slot, :r], st.B[slot, :, :r], st.scale[slot] = f.A, f.B, f.scale
        st.ranks[slot], st.ranks_host[slot] = r, r
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
