"""The seeds' state-dict layouts, kind by kind, mapped onto our adapter tensors (docs/METHODS.md §11).

Every pattern here was read from the seeds' code (VL-PET ``src/``, VL-Adapter ``VL-T5/src/``; their
module names are the same where both have a module) and is checked by the oracle tests
(tests/test_seed_import.py) against a literal re-implementation (tests/seed_reference/).

A ``ModuleDict`` of per-task modules appears once per task name in ``state_dict()`` even when one
module is shared by every task (``--use_single_adapter``): each task's adapter file is built from
that task's keys, so single, multiple and half-shared adapters all import the same way (every file
holds one task's complete adapter, ``sharing=single``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from petserve.adapters.kinds import get_kind
from petserve.adapters.seed_import import SEED_TASKS, Keys, SeedAdapter, SeedImportError
from petserve.adapters.tasks import TASK_NAMES


def _flag(v: str) -> bool:
    s = str(v).lower()
    if s not in ("true", "false", "1", "0", "yes", "no"):
        raise SeedImportError(f"expected true or false, got {v!r}")
    return s in ("true", "1", "yes")


def _tasks(v: str) -> tuple[str, ...]:
    return tuple(t for t in re.split(r"[, ]+", v) if t)


# The seed CLI's options that no key can tell, under their argparse names (param.py), with the
# value their code uses when the flag is absent (None here = that default).
OPTIONS = {
    "lora_alpha": float,                       # default 32 (LoRA scale lora_alpha / lora_dim)
    "encoder_gating_scaling_factor": float,    # VL-PET: x this after the gate; released T5: 0.3
    "tasks": _tasks,                           # default "vqa,gqa,nlvr,caption" (--tasks)
    "use_tasks_prompts": _flag,                # default true, as every released script sets it
}
DEFAULTS = {"lora_alpha": 32.0, "encoder_gating_scaling_factor": 1.0, "tasks": SEED_TASKS,
            "use_tasks_prompts": True}


@dataclass(frozen=True)
class Layout:
    """Where a family keeps things. Sublayers are ours: ``self``, ``cross``, ``ffn``."""

    family: str
    shared: str
    visual: str
    prompts: str

    def stack(self, stream: str) -> str:
        name = "encoder" if stream == "enc" else "decoder"
        return name if self.family == "t5" else f"model.{name}"

    def layer(self, stream: str, i: int) -> str:
        return f"{self.stack(stream)}.{'block' if self.family == 't5' else 'layers'}.{i}"

    def sublayer(self, stream: str, i: int, sub: str) -> str:
        """The module holding a sublayer's adapters: T5's ``layer.k``, BART's layer itself."""
        if self.family == "bart":
            return self.layer(stream, i)
        k = {"self": 0, "cross": 1, "ffn": 2 if stream == "dec" else 1}[sub]
        return f"{self.layer(stream, i)}.layer.{k}"

    def controller(self, stream: str, sub: str) -> str:
        """The AdapterController's attribute name for a sublayer."""
        if sub == "ffn":
            return "ff_adapter"
        if sub == "cross":
            return "enc_attn_adapter"
        return "self_attn_adapter" if (self.family == "bart" and stream == "dec") else "attn_adapter"

    def attention(self, stream: str, i: int, sub: str) -> str:
        if self.family == "t5":
            name = "EncDecAttention" if sub == "cross" else "SelfAttention"
        else:
            name = "encoder_attn" if sub == "cross" else "self_attn"
        return f"{self.sublayer(stream, i, sub)}.{name}"

    def visual_state(self, keys: Keys, model) -> dict[str, torch.Tensor]:
        """Our VisualEmbedding's state from ``visual_embedding.*`` (T5's norms have no bias)."""
        v, out = self.visual, {}
        if f"{v}.layer_norm.weight" in keys:
            raise SeedImportError("the visual embedding normalises the sum of its terms "
                                  "(--individual_vis_layer_norm False): not supported, petserve "
                                  "normalises each term (the seeds' default)")
        for ours, theirs in (("feat", "feat_embedding"), ("box", "absolute_vis_pos_embedding")):
            out[f"{ours}.weight"] = keys.take(f"{v}.{theirs}.0.weight")
            out[f"{ours}.bias"] = keys.take(f"{v}.{theirs}.0.bias")
            if f"{v}.{theirs}.1.weight" not in keys:
                raise SeedImportError(f"the visual embedding has no norm ({v}.{theirs}.1.weight; "
                                      "--use_vis_layer_norm False): not supported")
            out[f"{ours}_norm.weight"] = keys.take(f"{v}.{theirs}.1.weight")
            if self.family == "bart":
                out[f"{ours}_norm.bias"] = keys.take(f"{v}.{theirs}.1.bias")
        d = model.cfg.lm.d_model
        img = f"{v}.img_order_embedding.weight"
        out["img_order.weight"] = keys.take(img) if img in keys else torch.zeros(model.cfg.n_images, d)
        obj = f"{v}.obj_order_embedding.weight"          # the shared token embedding, registered twice
        if obj in keys and not torch.equal(keys.take(obj), keys.state[self.shared]):
            raise SeedImportError(f"{obj} differs from the shared token embedding it is in the seeds")
        return out


LAYOUTS = {
    "t5": Layout("t5", "shared.weight", "encoder.visual_embedding", "encoder.prompt_modules.prompts"),
    "bart": Layout("bart", "model.shared.weight", "model.encoder.visual_embedding",
                   "model.encoder.prompt_modules.prompts"),
}


def layout_of(family: str) -> Layout:
    return LAYOUTS[family]


# ---- helpers --------------------------------------------------------------------------------
def _layers(model, stream: str) -> range:
    return range(model.cfg.lm.enc_layers if stream == "enc" else model.cfg.lm.dec_layers)


def _task_names(keys: Keys, pattern: str) -> list[str]:
    """Task names found in the ``(?P<task>...)`` group of unconsumed keys matching ``pattern``."""
    return sorted({m["task"] for _, m in keys.matching(pattern)})


def _check_tasks(tasks: list[str] | tuple[str, ...]) -> list[str]:
    bad = [t for t in tasks if t not in TASK_NAMES]
    if bad:
        raise SeedImportError(f"the checkpoint's task {bad[0]!r} is not one petserve serves "
                              f"({', '.join(TASK_NAMES)})")
    return list(tasks)


def _adapter_tasks(keys: Keys, prefix: str) -> list[str]:
    return _task_names(keys, re.escape(prefix) + r"\.adapters\.(?P<task>[^.]+)\..*")


def _controller_extras(keys: Keys, prefix: str) -> None:
    for extra in ("pre_layer_norm", "post_layer_norm"):
        if f"{prefix}.{extra}.weight" in keys:
            raise SeedImportError(f"{prefix}.{extra}: adapters with --add_layer_norm_"
                                  f"{'before' if extra.startswith('pre') else 'after'}_adapter "
                                  "are not supported")


def _linear(keys: Keys, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
    return keys.take(f"{prefix}.weight"), keys.take(f"{prefix}.bias")


# ---- VL-PET ---------------------------------------------------------------------------------
def _vlpet(keys: Keys, L: Layout, model, opts: dict) -> list[SeedAdapter] | None:
    if f"{L.sublayer('enc', 0, 'self')}.attn_adapter_multihead_up.weight" not in keys:
        return None
    shared, gates, heads = {}, set(), set()
    for i in _layers(model, "enc"):
        for sub, part in (("self", "attn"), ("ffn", "ff")):
            p, site = L.sublayer("enc", i, sub), f"vlpet.enc.{i}.{sub}"
            heads.add(_multihead(keys, f"{p}.{part}_adapter_multihead", site, shared))
            gates.add(_vlpet_gate(keys, f"{p}.encoder_{part}_adapter_gating_", site, shared))
    if len(gates) != 1 or None in gates or len(heads) != 1:
        raise SeedImportError(f"the VL-PET checkpoint's encoder sublayers disagree on their gates "
                              f"({sorted(map(str, gates))}) or heads ({sorted(heads)})")
    gate = gates.pop()
    vpa = [L.attention("dec", i, "cross") + ".attn_value_parallel_adapter" for i in _layers(model, "dec")]
    tasks = _check_tasks(_adapter_tasks(keys, vpa[0]) or opts["tasks"])
    per_task = {t: {} for t in tasks}
    has_vpa = any(k.startswith(vpa[0] + ".") for k in keys.state)
    for i, prefix in enumerate(vpa if has_vpa else []):
        _controller_extras(keys, prefix)
        for t in tasks:
            for part in ("down", "up"):
                w, b = _linear(keys, f"{prefix}.adapters.{t}.{part}_sampler")
                per_task[t][f"vlpet.dec.{i}.cross.v.{part}.weight"] = w
                per_task[t][f"vlpet.dec.{i}.cross.v.{part}.bias"] = b
    first = per_task[tasks[0]]
    cfg = get_kind("vlpet").Config(
        gate=gate, r=shared["vlpet.enc.0.self.down.weight"].shape[0], heads=heads.pop(),
        gate_rank=shared["vlpet.enc.0.self.gate_down.weight"].shape[0] if gate == "large" else None,
        gate_scale=opts["encoder_gating_scaling_factor"], zero_init_up=False, decoder_value_adapter=has_vpa,
        decoder_r=first["vlpet.dec.0.cross.v.down.weight"].shape[0] if has_vpa else 96,
        gate_input="residual")
    return [SeedAdapter(t, "vlpet", cfg, {**shared, **per_task[t]}) for t in tasks]


def _multihead(keys: Keys, prefix: str, site: str, params: dict) -> int:
    """VL-PET's N_h down heads ``{prefix}_down.{h}`` concatenated into our (r, d) down projection,
    and ``{prefix}_up``; returns N_h."""
    heads = sorted(int(m[1]) for _, m in keys.matching(re.escape(f"{prefix}_down.") + r"(\d+)\.weight"))
    if heads != list(range(len(heads))) or not heads:
        raise SeedImportError(f"{prefix}_down: heads {heads} are not 0..N-1")
    downs = [_linear(keys, f"{prefix}_down.{h}") for h in heads]
    params[f"{site}.down.weight"] = torch.cat([w for w, _ in downs])
    params[f"{site}.down.bias"] = torch.cat([b for _, b in downs])
    params[f"{site}.up.weight"], params[f"{site}.up.bias"] = _linear(keys, f"{prefix}_up")
    return len(heads)


def _vlpet_gate(keys: Keys, prefix: str, site: str, params: dict) -> str | None:
    """The sublayer's gate into ``params``; our name for it (None: no gate)."""
    if f"{prefix}large_x_down.weight" in keys:
        for ours, theirs in (("gate_down", "large_x_down"), ("gate_up", "large_x_up")):
            params[f"{site}.{ours}.weight"], params[f"{site}.{ours}.bias"] = _linear(keys, prefix + theirs)
        return "large"
    if f"{prefix}small_xy_cat.weight" in keys:
        params[f"{site}.gate.weight"], params[f"{site}.gate.bias"] = _linear(keys, f"{prefix}small_xy_cat")
        return "small"
    if f"{prefix}middle_xy_add.weight" in keys:
        params[f"{site}.gate.weight"], params[f"{site}.gate.bias"] = _linear(keys, f"{prefix}middle_xy_add")
        return "middleX"
    if f"{prefix}middle_ia3_add" in keys:
        params[f"{site}.gate.vec"] = keys.take(f"{prefix}middle_ia3_add")
        return "middleY"
    return None


# ---- LoRA (VL-BART only in the seeds) -------------------------------------------------------
LORA_LINEARS = {"q": "q_proj", "v": "v_proj"}     # ours -> BART's (LoRALinearController)


def _lora(keys: Keys, L: Layout, model, opts: dict) -> list[SeedAdapter] | None:
    if L.family != "bart":          # the seeds' VL-T5 builds no LoRA: its keys are unknown keys
        return None
    names = LORA_LINEARS
    probe = f"{L.attention('enc', 0, 'self')}.{names['q']}.lora_As."
    if not any(k.startswith(probe) for k in keys.state):
        return None
    tasks = _check_tasks(_task_names(keys, re.escape(probe) + r"(?P<task>[^.]+)"))
    targets, per_task = [], {t: {} for t in tasks}
    for stream, subs in (("enc", ("self",)), ("dec", ("self", "cross"))):
        for sub in subs:
            for ours, theirs in names.items():
                prefix = f"{L.attention(stream, 0, sub)}.{theirs}.lora_As."
                if not any(k.startswith(prefix) for k in keys.state):
                    continue
                targets.append(f"{stream}.{sub}.{ours}")
                for i in _layers(model, stream):
                    lin = f"{L.attention(stream, i, sub)}.{theirs}"
                    for t in tasks:
                        per_task[t][f"lora.{stream}.{i}.{sub}.{ours}.A"] = keys.take(f"{lin}.lora_As.{t}")
                        per_task[t][f"lora.{stream}.{i}.{sub}.{ours}.B"] = keys.take(f"{lin}.lora_Bs.{t}")
    r = per_task[tasks[0]][f"lora.enc.0.self.{'q'}.A"].shape[0]
    cfg = get_kind("lora").Config(r=r, alpha=opts["lora_alpha"], targets=tuple(targets))
    return [SeedAdapter(t, "lora", cfg, per_task[t]) for t in tasks]


# ---- bottleneck adapters and Compacter ------------------------------------------------------
SITES = (("enc", "self"), ("enc", "ffn"), ("dec", "self"), ("dec", "cross"), ("dec", "ffn"))


def _adapters(keys: Keys, L: Layout, model, opts: dict) -> list[SeedAdapter] | None:
    first = f"{L.sublayer('enc', 0, 'self')}.{L.controller('enc', 'self')}"
    tasks = _adapter_tasks(keys, first)
    if not tasks:
        return None
    tasks = _check_tasks(tasks)
    phm = f"{first}.adapters.{tasks[0]}.down_sampler.b" in keys
    kind = "compacter" if phm else "adapter"
    shared_rule = "phm_rule" in keys.state
    factorized = phm and f"{first}.adapters.{tasks[0]}.down_sampler.W_left" in keys
    present = [(s, sub) for s, sub in SITES
               if any(k.startswith(f"{L.sublayer(s, 0, sub)}.{L.controller(s, sub)}.adapters.")
                      for k in keys.state)]
    if present == [("enc", "ffn"), ("dec", "ffn")]:
        placement = "pfeiffer"
    elif present == list(SITES):
        placement = "houlsby"
    else:
        raise SeedImportError(f"adapters on {', '.join(f'{s}.{sub}' for s, sub in present)}: petserve "
                              "places them Houlsby-style (every sublayer) or Pfeiffer-style (FFN only)")
    per_task = {t: {} for t in tasks}
    width = n = rank = None
    for stream, sub in present:
        for i in _layers(model, stream):
            prefix = f"{L.sublayer(stream, i, sub)}.{L.controller(stream, sub)}"
            _controller_extras(keys, prefix)
            for t in tasks:
                for part in ("down", "up"):
                    src, dst = f"{prefix}.adapters.{t}.{part}_sampler", f"{kind}.{stream}.{i}.{sub}.{part}"
                    if phm:
                        got = _phm(keys, src, dst, shared_rule, factorized, per_task[t])
                        n, rank = got
                    else:
                        per_task[t][f"{dst}.weight"], per_task[t][f"{dst}.bias"] = _linear(keys, src)
            if width is None:
                down = per_task[tasks[0]][f"{kind}.{stream}.{i}.{sub}.down.bias"]
                width = down.shape[0]
    options = dict(dim=width, placement=placement, mode="sequential", sharing="single")
    if phm:
        options.update(n=n, shared_phm_rule=shared_rule, factorized_phm=factorized, phm_rank=rank or 1)
    cfg = get_kind(kind).Config(**options)
    if shared_rule:
        rule = keys.take("phm_rule")
        for t in tasks:
            per_task[t]["compacter.phm_rule"] = rule
    return [SeedAdapter(t, kind, cfg, per_task[t]) for t in tasks]


def _phm(keys: Keys, src: str, dst: str, shared_rule: bool, factorized: bool, out: dict):
    """One PHMLinear (phm_rule (n, n, n), W (n, in/n, out/n) or W_left/W_right, b) -> ours."""
    if shared_rule:
        own = f"{src}.phm_rule"           # the model's rule, registered in every PHMLinear too
        if own in keys and not torch.equal(keys.take(own), keys.state["phm_rule"]):
            raise SeedImportError(f"{src}.phm_rule differs from the model's shared phm_rule")
    else:
        out[f"{dst}.A"] = keys.take(f"{src}.phm_rule")
    if factorized:
        out[f"{dst}.s"], out[f"{dst}.t"] = keys.take(f"{src}.W_left"), keys.take(f"{src}.W_right")
        n, rank = out[f"{dst}.s"].shape[0], out[f"{dst}.s"].shape[2]
    else:
        out[f"{dst}.B"] = keys.take(f"{src}.W")
        n, rank = out[f"{dst}.B"].shape[0], None
    out[f"{dst}.bias"] = keys.take(f"{src}.b")
    return n, rank


# ---- Hyperformer ----------------------------------------------------------------------------
HYPER_SITES = {"enc": {"self": "self_attention", "ffn": "feed_forward"},
               "dec": {"self": "self_attention", "cross": "cross_attention", "ffn": "feed_forward"}}


def _hyperformer(keys: Keys, L: Layout, model, opts: dict) -> list[SeedAdapter] | None:
    nets = {s: f"{L.stack(s)}.adapter_layers_hyper_net" for s in ("enc", "dec")}
    if f"{nets['enc']}.layer_id_embeddings.weight" not in keys:
        return None
    if f"{nets['enc']}.adapters_block_type.weight" in keys:
        raise SeedImportError("Hyperformer with --efficient_unique_hyper_net (one generator for every "
                              "sublayer) is not supported; petserve imports --unique_hyper_net")
    params = {}
    for s, net in nets.items():
        if f"{net}.LayerNorm.weight" not in keys:
            raise SeedImportError(f"{net} has no LayerNorm (unique_hyper_net_layer_norm False): "
                                  "not supported")
        params[f"hyperformer.{s}.layer"] = keys.take(f"{net}.layer_id_embeddings.weight")
        for ours, theirs in (("fc1", "0"), ("fc2", "2")):
            w, b = _linear(keys, f"{net}.task_hypernet.task_embeding_generator.{theirs}")
            params[f"hyperformer.{s}.{ours}.weight"], params[f"hyperformer.{s}.{ours}.bias"] = w, b
        w, b = _linear(keys, f"{net}.LayerNorm")
        params[f"hyperformer.{s}.norm.weight"], params[f"hyperformer.{s}.norm.bias"] = w, b
        for sub, site in HYPER_SITES[s].items():
            for part in ("down", "up"):
                gen = f"{net}.{site}_{part}_sampler_hyper_net"
                for ours, theirs in (("weight_gen", "weight_generator"), ("bias_gen", "bias_generator")):
                    w, b = _linear(keys, f"{gen}.{theirs}.0")
                    params[f"hyperformer.{s}.{sub}.{part}.{ours}.weight"] = w
                    params[f"hyperformer.{s}.{sub}.{part}.{ours}.bias"] = b
        for k, _ in keys.matching(re.escape(net) + r"\..*_layernorm_hypernet\..*"):
            raise SeedImportError(f"{k}: hypernetwork-generated adapter layer norms are not supported")
    embeds = {m["task"]: k for k, m in keys.matching(r"(?:.*\.)?task_to_embeddings\.(?P<task>[^.]+)")}
    if not embeds:
        raise SeedImportError("the Hyperformer checkpoint has no task embeddings (task_to_embeddings.*)")
    tasks = _check_tasks(sorted(embeds))
    task_dim, proj = params["hyperformer.enc.layer"].shape[1], params["hyperformer.enc.norm.weight"].shape[0]
    hidden = params["hyperformer.enc.fc1.weight"].shape[0]
    width = params["hyperformer.enc.self.down.bias_gen.weight"].shape[0]
    out = []
    for t in tasks:
        cfg = get_kind("hyperformer").Config(tasks=(t,), task_dim=task_dim, hidden_dim=hidden,
                                             proj_dim=proj, dim=width)
        own = {**params, f"hyperformer.task.{t}": keys.take(embeds[t])}
        out.append(SeedAdapter(t, "hyperformer", cfg, own))
    for k, m in keys.matching(r"(?:.*\.)?task_to_embeddings\.(?P<task>[^.]+)"):
        if not torch.equal(keys.take(k), keys.state[embeds[m["task"]]]):
            raise SeedImportError(f"{k} differs from {embeds[m['task']]}: the seeds share task embeddings")
    return out


# ---- prompt tuning --------------------------------------------------------------------------
def _prompt(keys: Keys, L: Layout, model, opts: dict) -> list[SeedAdapter] | None:
    tasks = _task_names(keys, re.escape(L.prompts) + r"\.(?P<task>[^.]+)\..*")
    if not tasks:
        return None
    out = []
    for t in _check_tasks(tasks):
        p = f"{L.prompts}.{t}.prefix_embedding"
        embed = keys.take(f"{p}.0.weight")
        (w1, b1), (w2, b2) = _linear(keys, f"{p}.1"), _linear(keys, f"{p}.3")
        cfg = get_kind("prompt").Config(length=embed.shape[0], mid_dim=w1.shape[0])
        out.append(SeedAdapter(t, "prompt", cfg, {"prompt.embed": embed, "prompt.fc1.weight": w1,
                                                  "prompt.fc1.bias": b1, "prompt.fc2.weight": w2,
                                                  "prompt.fc2.bias": b2}))
    return out


MAPPERS = {"vlpet": _vlpet, "hyperformer": _hyperformer, "adapter": _adapters, "lora": _lora,
           "prompt": _prompt}
REPO_KINDS = {"vl-adapter": ("hyperformer", "adapter", "lora", "prompt"),
              "vl-pet": ("vlpet", "hyperformer", "adapter", "lora", "prompt")}


def import_adapters(keys: Keys, L: Layout, model, repo: str, options: dict) -> list[SeedAdapter]:
    """Every task's adapter of the one kind the checkpoint holds ([] for a pre-training one).
    Backbone vectors and the visual embedding are filled in by :func:`fill_shared` once the
    backbone is loaded."""
    opts = {k: DEFAULTS[k] if v is None else v for k, v in options.items()}
    found: list[tuple[str, list[SeedAdapter]]] = []
    for name in REPO_KINDS[repo]:
        got = MAPPERS[name](keys, L, model, opts)
        if got:
            found.append((name, got))
    if len(found) > 1:
        raise SeedImportError(f"the checkpoint holds both {found[0][0]} and {found[1][0]} modules; "
                              "petserve imports one adapter kind per checkpoint")
    return found[0][1] if found else []


def fill_shared(adapters: list[SeedAdapter], model) -> None:
    """Each adapter's trained backbone vectors (``vec.*``) and visual embedding (``visual.*``): the
    checkpoint's values, which the backbone now holds too."""
    vectors = model.lm.vector_params()
    visual = model.visual_embed.state_dict()
    for a in adapters:
        kind = get_kind(a.kind)
        for name in kind.param_shapes(a.config, model):
            if name.startswith("vec."):
                a.params[name] = vectors[name[4:]].detach().clone()
            elif name.startswith("visual."):
                a.params[name] = visual[name[7:]].detach().clone()
