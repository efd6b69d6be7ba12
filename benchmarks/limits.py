"""The throughput ratio a workload's adapters allow at best (docs/PERFORMANCE.md, "The limit").

The backbone alone serves a request in ``T_b`` (measured: 1 / its requests per second on the same
workload, in the same run). The adapters must add at least the time of their FLOPs at this
machine's peak FLOP rate, or of the bytes they read at its memory bandwidth, whichever is longer
(compute and memory traffic overlapping at best):

    T_a = max(F_a / peak_flops, B_a / bandwidth)        limit = T_b / (T_b + T_a)

``F_a``: the adapters' math on every token of the request (2 FLOPs per parameter on the token's
path; a prompt adds its tokens to the encoder, priced at the encoder's FLOPs). ``B_a``: the
request's share of what its steps read: each step reads every distinct adapter among its rows once
(the decoder sites on every decode step, all of it on the prefill). Vectors that replace a norm
cost bytes, no FLOPs. Rates come from ``measure_rates`` (a large matmul, a sum over a buffer well
beyond the caches) in the dtype and threads of the run. Anything more is overhead: index copies,
per-layer metadata, Python, allocation. Approximations, stated as such: attention's FLOPs are left
out (short sequences), Compacter's FLOPs are counted as its parameters' (its Kronecker factors
expand to a bottleneck of the same width); both make the limit, if anything, too high.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from safetensors.torch import load as load_safetensors


@dataclass(frozen=True)
class AdapterCost:
    """Per-token parameters on the encoder and decoder paths, and bytes (all tensors)."""

    enc_params: int = 0          # applied to every encoder token (FLOPs: 2 per parameter)
    dec_params: int = 0          # applied to every decoded token
    enc_bytes: int = 0           # read by a prefill step
    dec_bytes: int = 0           # read by every decode step
    prompt_tokens: int = 0       # encoder tokens a prompt adds


def adapter_cost(blob: bytes) -> AdapterCost:
    """What one adapter file costs per token and per step (see the module docstring)."""
    enc = dec = enc_b = dec_b = prompt = 0
    for name, t in load_safetensors(blob).items():
        size = t.numel() * t.element_size()
        kind, site = (name.split(".") + [""])[:2]
        if kind == "prompt":
            enc_b += size
            if name == "prompt.embed":
                prompt = t.shape[0]
            continue
        flops_params = 0 if kind == "vec" else t.numel()
        if site == "dec":
            dec, dec_b = dec + flops_params, dec_b + size
        else:
            enc, enc_b = enc + flops_params, enc_b + size
    return AdapterCost(enc, dec, enc_b, dec_b, prompt)


@dataclass(frozen=True)
class Rates:
    flops_per_s: float
    bytes_per_s: float


def measure_rates(dtype=torch.float32, device: str = "cpu") -> Rates:
    """Peak FLOP rate (a 1024^3 matmul) and memory bandwidth (a sum over 256 MiB), best of 5."""
    a = torch.randn(1024, 1024, dtype=dtype, device=device)
    big = torch.ones(64 * 2**20, dtype=torch.float32, device=device)

    def best(fn) -> float:
        fn()
        out = []
        for _ in range(5):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
        return min(out)

    flops = 2 * 1024**3 / best(lambda: a @ a)
    bandwidth = big.numel() * 4 / best(lambda: big.sum())
    return Rates(flops, bandwidth)


def encoder_params(model) -> int:
    """Encoder linear parameters: what one more encoder token (a prompt's) costs, per FLOP / 2."""
    return sum(p.numel() for n, p in model.named_parameters()
               if ".enc_layers." in n and p.dim() == 2)


def distinct_per_step(adapters: list[str | None], rows: int) -> float:
    """Mean number of distinct adapters among ``rows`` consecutive requests (a step's rows)."""
    groups = [adapters[i:i + rows] for i in range(0, len(adapters), rows)]
    return float(np.mean([len({a for a in g if a is not None}) for g in groups]))


def limit_ratio(backbone_s: float, costs: dict[str, AdapterCost], requests, enc_tokens: float,
                rows: int, rates: Rates, enc_params: int) -> dict:
    """The limit of one workload: ``backbone_s`` the backbone's seconds per request on it,
    ``costs`` by adapter id, ``requests`` (RequestSpec) in arrival order, ``enc_tokens`` their
    mean encoder length, ``rows`` per step. Returns the limit and the adapters' time per request
    (its FLOP and byte terms)."""
    used = [costs[r.adapter] for r in requests if r.adapter is not None]
    if not used:
        return {"limit": 1.0, "adapter_s": 0.0, "flops_s": 0.0, "bytes_s": 0.0}
    new = float(np.mean([r.max_new_tokens for r in requests]))
    mean = lambda key: float(np.mean([getattr(c, key) for c in used]))  # noqa: E731
    flops = 2 * (mean("enc_params") * enc_tokens + mean("dec_params") * new
                 + enc_params * mean("prompt_tokens"))
    distinct = distinct_per_step([r.adapter for r in requests], rows)
    nbytes = distinct * (mean("enc_bytes") + mean("dec_bytes") * new) / rows
    flops_s, bytes_s = flops / rates.flops_per_s, nbytes / rates.bytes_per_s
    adapter_s = max(flops_s, bytes_s)
    return {"limit": backbone_s / (backbone_s + adapter_s), "adapter_s": adapter_s,
            "flops_s": flops_s, "bytes_s": bytes_s, "distinct_per_step": distinct}
