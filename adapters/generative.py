"""Generative Adapter (Chen et al., 2024, arXiv 2411.05877): a context becomes a LoRA in one pass.

A *generator* is trained once per frozen backbone. For each target linear ``W`` (d_in -> d_out) it
holds ``g`` (d_in), ``A1``, ``A2``, ``A3`` (r x d_in) and ``B`` (d_out x r, zero-initialised). The
context (demonstrations, or plain text) runs through the frozen backbone once, teacher-forced; H is
what each target linear reads over the context's tokens (docs/METHODS.md §3.8)::

    H~ = RMSNorm_g(H)     K = H~ A2^T     V = H~ A3^T     S = sum over chunks of K^T V   (r x r)
    S <- U V^T (svd: its orthogonal polar factor)  or  S / ||S||_F (frobenius)
    dW = (alpha / r) B S^T A1,   i.e. the LoRA  A = S^T A1,  B

Applied to an input x, dW x = B sum_t v_t <k_t, A1 x>: a lookup of x among the context's keys
that returns their values. ``pairing`` chooses what a key returns on the decoder's tokens: its own
token's value (``same``, the paper's), the next token's (``next``: the state before an answer
returns that answer, so a context's question -> answer mapping can be read out), or both terms
summed (``both``). Encoder tokens always pair with themselves.

S is summed chunk by chunk (a few demonstrations at a time), so a long context costs memory in
r^2 per site, not in its length; several contexts share each backbone pass. The result is an
ordinary ``lora`` adapter (adapters/kinds/lora.py): no training job, served like any other.

Which linears: the LoRA kind's default, q and v of the encoder self-attention and of the decoder
self- and cross-attention (VL-Adapter's LoRA sites) — the encoder sees the demonstrations' images
and questions, the decoder their answers, so both the task and the answer style reach a site.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from petserve.adapters.backbone.model import RowInput, VLModel
from petserve.adapters.kinds.lora import DEFAULT_TARGETS, LoRA, LoRAConfig
from petserve.adapters.runtime.context import StepContext

GENERATOR_FORMAT = "petserve-generator"
GENERATOR_VERSION = 1


class GeneratorError(ValueError):
    """A generator file or a context that cannot be used; the message says why."""


class GeneratorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    r: int = Field(8, ge=1, le=256, description="rank of the generated LoRA")
    alpha: float = Field(16.0, gt=0, description="LoRA scale alpha / r")
    targets: tuple[str, ...] = Field(DEFAULT_TARGETS, description="LoRA target patterns")
    norm: Literal["svd", "frobenius"] = Field("frobenius", description="how S is normalised")
    pairing: Literal["same", "next", "both"] = Field(
        "same", description="on decoder-token sites, pair each token's K with its own V (same), "
                            "with the next token's V (next), or both")
    eps: float = Field(1e-6, gt=0, description="RMSNorm and Frobenius epsilon")

    def lora_config(self) -> LoRAConfig:
        """The config of every adapter this generator makes (nothing but the low-rank deltas)."""
        return LoRAConfig(r=self.r, alpha=self.alpha, targets=self.targets, dropout=0.0,
                          train_biases=False, train_visual_embedding=False)


def site_stream(site: str) -> str:
    """Which tokens a site reads: ``enc`` (encoder tokens), ``enc_out`` (the encoder's output, read
    by the decoder's cross-attention keys and values) or ``dec`` (the decoder's tokens)."""
    stream, _layer, sub, name = site.split(".")
    if stream == "enc":
        return "enc"
    return "enc_out" if sub == "cross" and name in ("k", "v") else "dec"


@dataclass
class Generator:
    """The generator's parameters for one backbone (``gen.{site}.{g|A1|A2|A3|B}``)."""

    cfg: GeneratorConfig
    params: dict[str, torch.Tensor]
    sites: dict[str, tuple[int, int]]          # site -> (d_in, d_out)
    backbone: str                              # fingerprint of the backbone it was trained on

    @classmethod
    def init(cls, cfg: GeneratorConfig, model: VLModel, seed: int = 0) -> Generator:
        gen = torch.Generator().manual_seed(seed)
        sites = {s: (lin.in_features, lin.out_features)
                 for s, lin in LoRA.sites(cfg.lora_config(), model).items()}
        params = {}
        for site, (d_in, d_out) in sites.items():
            bound = d_in ** -0.5
            params[f"gen.{site}.g"] = torch.ones(d_in)
            for name in ("A1", "A2", "A3"):
                params[f"gen.{site}.{name}"] = (torch.rand(cfg.r, d_in, generator=gen) * 2 - 1) * bound
            params[f"gen.{site}.B"] = torch.zeros(d_out, cfg.r)
        return cls(cfg, params, sites, model.fingerprint)

    def p(self, site: str, name: str) -> torch.Tensor:
        return self.params[f"gen.{site}.{name}"]

    # ---- the math ------------------------------------------------------------------------
    def accumulate(self, S: dict[str, torch.Tensor] | None, states: dict[str, torch.Tensor],
                   masks: dict[str, torch.Tensor], context_of_row: torch.Tensor,
                   num_contexts: int) -> dict[str, torch.Tensor]:
        """Add one chunk's ``K^T V`` to each context's S. ``states[site]`` (B, T, d_in) are the
        chunk's inputs at that site, ``masks[stream]`` (B, T) which tokens count, and
        ``context_of_row`` (B,) the context each row belongs to. S: site -> (C, r, r)."""
        out = {} if S is None else dict(S)
        for site, x in states.items():
            m = masks[site_stream(site)].to(x.dtype).unsqueeze(-1)
            g = self.p(site, "g")
            h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.eps) * g
            h = h * m
            k, v = h @ self.p(site, "A2").T, h @ self.p(site, "A3").T            # (B, T, r)
            if self.cfg.pairing == "same" or site_stream(site) != "dec":
                per_row = k.transpose(1, 2) @ v                                  # (B, r, r)
            else:                                  # (t, t + 1); h is zero on padding tokens
                per_row = k[:, :-1].transpose(1, 2) @ v[:, 1:]
                if self.cfg.pairing == "both":
                    per_row = per_row + k.transpose(1, 2) @ v
            total = per_row.new_zeros(num_contexts, self.cfg.r, self.cfg.r)
            total = total.index_add(0, context_of_row, per_row)
            out[site] = total if site not in out else out[site] + total
        return out

    def normalise(self, S: torch.Tensor) -> torch.Tensor:
        """(C, r, r) -> normalised per context (the artifact records which normalisation)."""
        if self.cfg.norm == "frobenius":
            return S / (S.flatten(1).norm(dim=1).view(-1, 1, 1) + self.cfg.eps)
        U, _, Vh = torch.linalg.svd(S)
        return U @ Vh

    def lora_params(self, S: dict[str, torch.Tensor], c: int) -> dict[str, torch.Tensor]:
        """The LoRA of context ``c`` from the accumulated S (keeps autograd for training)."""
        out = {}
        for site in self.sites:
            s = self.normalise(S[site][c:c + 1])[0]
            out[f"lora.{site}.A"] = s.T @ self.p(site, "A1")
            out[f"lora.{site}.B"] = self.p(site, "B")
        return out

    def requires_grad_(self, flag: bool = True) -> Generator:
        for v in self.params.values():
            v.requires_grad_(flag)
        return self

    # ---- the artifact --------------------------------------------------------------------
    def to_bytes(self, name: str = "") -> bytes:
        from safetensors.torch import save
        meta = {"format": GENERATOR_FORMAT, "version": GENERATOR_VERSION, "name": name,
                "config": self.cfg.model_dump(mode="json"), "backbone": self.backbone}
        tensors = {k: v.detach().contiguous().float() for k, v in self.params.items()}
        return save(tensors, metadata={"petserve": json.dumps(meta, separators=(",", ":"))})

    def save(self, path: Path, name: str = "") -> Path:
        from petserve.adapters.atomic_file import write_atomically
        data = self.to_bytes(name)
        return write_atomically(Path(path), lambda f: f.write(data))


def load_generator(path: Path, model: VLModel) -> Generator:
    """The generator in ``path`` for ``model``; GeneratorError naming the problem (not a generator
    file, another backbone, missing or misshapen tensors)."""
    from petserve.adapters.adapter_file import read_petserve_file
    try:
        meta, tensors = read_petserve_file(Path(path).read_bytes())
    except FileNotFoundError:
        raise GeneratorError(f"{path}: no such generator file") from None
    except ValueError as e:
        raise GeneratorError(f"{path}: not a petserve generator file ({e})") from None
    if meta.get("format") != GENERATOR_FORMAT or meta.get("version") != GENERATOR_VERSION:
        raise GeneratorError(f"{path}: not a petserve generator file (format {meta.get('format')!r} "
                             f"version {meta.get('version')!r})")
    if meta.get("backbone") != model.fingerprint:
        raise GeneratorError(f"{path}: made for backbone {meta.get('backbone')}, this backbone is "
                             f"{model.fingerprint}")
    try:
        cfg = GeneratorConfig(**meta["config"])
    except (ValidationError, TypeError) as e:
        raise GeneratorError(f"{path}: bad generator config: {e}") from None
    fresh = Generator.init(cfg, model)
    for k, v in fresh.params.items():
        if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape):
            raise GeneratorError(f"{path}: tensor {k!r} missing or of shape "
                                 f"{tuple(tensors[k].shape) if k in tensors else None}, "
                                 f"expected {tuple(v.shape)}")
    extra = sorted(set(tensors) - set(fresh.params))
    if extra:
        raise GeneratorError(f"{path}: unexpected tensor {extra[0]!r}")
    params = {k: tensors[k].to(model.device, model.dtype) for k in fresh.params}
    return Generator(cfg, params, fresh.sites, model.fingerprint)


# ---- running a context through the frozen backbone -------------------------------------------
class CapturingContext(StepContext):
    """A backbone-only step that records what the chosen linears read (``captured[site]``)."""

    def __init__(self, base: StepContext, sites):
        super().__init__(base.weights, base.meta, base.lowrank_dropout)
        self.sites, self.captured = set(sites), {}

    def linear(self, site, mod, x, stream):
        if site in self.sites:
            self.captured[site] = x.detach()
        return super().linear(site, mod, x, stream)


@torch.no_grad()
def context_states(model: VLModel, sites, rows: list[RowInput], targets: list[list[int]]):
    """(inputs at each site (B, T, d_in), token masks per stream) of a teacher-forced frozen pass
    over ``rows`` with decoder ``targets``."""
    ctx = CapturingContext(StepContext.backbone_only(len(rows), model.device), sites)
    model.teacher_forced_logits(rows, targets, ctx)
    dec = torch.zeros(len(targets), max(len(t) for t in targets), dtype=torch.bool,
                      device=model.device)
    for i, t in enumerate(targets):
        dec[i, :len(t)] = True
    masks = {"enc": ctx.meta.enc_valid, "enc_out": ctx.meta.enc_valid, "dec": dec}
    return ctx.captured, masks


def generate_loras(model: VLModel, generator: Generator, contexts: list[list[tuple[RowInput, list[int]]]],
                   chunk_rows: int = 16, detach: bool = True) -> list[dict[str, torch.Tensor]]:
    """One LoRA (its ``lora.*`` tensors) per context; a context is a list of (row, decoder target)
    items. The items of every context are flattened and run ``chunk_rows`` at a time, so several
    contexts share a backbone pass and only S (r x r per site and context) is kept between
    chunks."""
    if not contexts or any(not c for c in contexts):
        raise GeneratorError("a context needs at least one item")
    items = [(c, row, tgt) for c, ctx in enumerate(contexts) for row, tgt in ctx]
    S = None
    for start in range(0, len(items), chunk_rows):
        part = items[start:start + chunk_rows]
        states, masks = context_states(model, generator.sites, [p[1] for p in part], [p[2] for p in part])
        owner = torch.tensor([p[0] for p in part], device=model.device)
        S = generator.accumulate(S, states, masks, owner, len(contexts))
    out = [generator.lora_params(S, c) for c in range(len(contexts))]
    if detach:
        out = [{k: v.detach() for k, v in p.items()} for p in out]
    return out


def context_hash(items) -> str:
    """A digest of a context as the backbone sees it: per item its prompt ids, a key of its media
    (e.g. the feature cache's content hash; None for text) and its target ids."""
    h = hashlib.sha256()
    for ids, media_key, target in items:
        h.update(json.dumps([list(ids), media_key, list(target)]).encode())
    return h.hexdigest()


def lora_file_bytes(generator: Generator, params: dict[str, torch.Tensor], model: VLModel,
                    task: str, generator_name: str, context_sha256: str, name: str = "") -> bytes:
    """An ordinary ``lora`` adapter file of a generated LoRA; its metadata names the generator and
    the context's hash (``generated``)."""
    from petserve.adapters.adapter_file import adapter_bytes
    return adapter_bytes("lora", generator.cfg.lora_config(), params, model, task, name=name,
                         generated={"generator": generator_name, "context_sha256": context_sha256})
