"""Reference VL-BART, built the way the two seed repositories build it (test-only, plain torch).

The seed code:
  * VL-Adapter: github ylsung/VL_adapter, ``VL-T5/src`` (``method["repo"] = "vl-adapter"``, the default)
  * VL-PET:     github HenryHZY/VL-PET, ``src``          (``method["repo"] = "vl-pet"``)

Both run on transformers 4.2.1, and both replace the HF model classes with their own
``modeling_bart.py`` (VisualEmbedding, JointEncoder, VLBartModel, VLBart) and
``my_transformers/modeling_bart.py`` (attention, layers, BartDecoder). Every module below is named
as the seeds name it, so ``build(...).state_dict()`` has the keys ``TrainerBase.save`` writes with
``torch.save(self.model.state_dict(), ...)``. Their scripts train under DDP, so the real files put
``module.`` in front of every key (``utils.load_state_dict`` strips it on load). Each class follows
the seed class of the same name, with the same order of operations. Dropout is left out (we run in
eval mode). See KEYS_BART.md for the key patterns, the options that do not show in the keys, and
where this reference departs from the seeds.

Object-order embedding: ``VisualEmbedding`` reads rows of the shared token embedding. Object k gets
row ``V - 1 - k``, where V = ``shared.num_embeddings`` is the resized vocabulary (50265 + 200). That
row is ``<vis_extra_id_k>``: the seeds add ``<extra_id_99..0>`` and then ``<vis_extra_id_99..0>``, so
``<vis_extra_id_0>`` is the last row. ``config.default_obj_order_ids`` is stored but never read. The
default image order is 0 for every token. NLVR2 passes ``img_order_ids = [0]*N + [1]*N`` and
``obj_order_ids = [0..N-1, 0..N-1]``, which is why ``logits``/``greedy`` also take ``obj_order_ids``.

The ``downsample`` option is ignored. It is the seeds' parameter-free AdaptiveMaxPool2d over the
7x7 CLIP grid (giving 36 tokens), so callers pass features that are already pooled.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build", "logits", "greedy", "KINDS", "EXTRA_KINDS", "DEFAULTS"]


def gelu_new(x):
    """transformers.activations.gelu_new (tanh approximation): every adapter / gate non-linearity."""
    return F.gelu(x, approximate="tanh")


ACT2FN = {"gelu": F.gelu, "gelu_new": gelu_new, "relu": F.relu}

# param.py defaults of the options that change the model (the seeds' argparse names).
DEFAULTS = dict(
    repo="vl-adapter",
    feat_dim=2048, pos_dim=4, use_vis_order_embedding=True, use_vis_layer_norm=True,
    individual_vis_layer_norm=True, share_vis_lang_layer_norm=False, downsample=False, n_boxes=36,
    use_adapter=False, use_compacter=False, use_hyperformer=False, use_lradapter=False,
    use_single_adapter=False, share_up_sampler=False, share_down_sampler=False, reduction_factor=16,
    add_layer_norm_before_adapter=False, add_layer_norm_after_adapter=False, add_adapter_cross_attn=True,
    hypercomplex_division=4, phm_rank=1, shared_phm_rule=True, factorized_phm=True,
    shared_phm_rule_over_tasks=False, unique_hyper_net=False, efficient_unique_hyper_net=False,
    projected_task_embedding_dim=-1,
    use_lora=False, lora_dim=4, lora_alpha=32.0, use_single_lora=False,
    encoder_prompt_len=0, decoder_prompt_len=0, mid_dim=768, use_single_prompt=False,
    use_lm_head_adapter=False,
)
# VL-PET's src/param.py "newly add" options that this reference implements.
VLPET_DEFAULTS = dict(
    no_encoder_adapter=False, no_decoder_adapter=False, use_adapter_down_dim=False, adapter_down_dim=96,
    use_encoder_adapter_down_multihead=False, encoder_adapter_multihead_num_head=1,
    use_encoder_adapter_gating_large_x_lowrank=False, adapter_gating_down_dim=96,
    use_encoder_adapter_gating_small_xy_cat=False, use_encoder_adapter_gating_middle_xy_add=False,
    use_encoder_adapter_gating_middle_ia3_add=False, use_encoder_adapter_gating_add=False,
    use_encoder_gating_scaling=False, encoder_gating_scaling_factor=1.0,
    use_decoder_enc_attn_value_parallel_adapter_down_dim=False,
    decoder_enc_attn_value_parallel_adapter_down_dim=96,
    use_decoder_enc_attn_value_parallel_adapter_scaling=False,
    decoder_enc_attn_value_parallel_adapter_scaling_factor=1.0,
)
DEFAULTS.update(VLPET_DEFAULTS)
# Options the released scripts pass that change only training or the initial values (we draw every
# tensor at random anyway), or only the data pipeline: accepted and ignored.
NO_EFFECT = {
    "unfreeze_layer_norms", "unfreeze_encoder_layer_norms", "unfreeze_language_model", "unfreeze_bias",
    "unfreeze_lm_head", "use_tasks_prompts", "use_encoder_multihead_up_zero_init",
    "use_encoder_gating_large_x_lowrank_up_zero_init", "use_decoder_enc_vpa_up_zero_init",
    "use_encoder_gating_small_up_zero_init", "use_encoder_gating_middle_up_zero_init",
    "use_encoder_gating_middle_ia3_zero_init", "use_encoder_gating_middle_ia3_one_init", "phm_init_range",
    "num_beams", "gen_max_length", "max_text_length", "tasks", "lr", "epochs", "dropout", "seed",
}


def _options(method: dict) -> SimpleNamespace:
    unknown = set(method) - set(DEFAULTS) - NO_EFFECT
    if unknown:
        raise ValueError(f"seed options this reference does not know or support: {sorted(unknown)}")
    o = SimpleNamespace(**{**DEFAULTS, **{k: v for k, v in method.items() if k in DEFAULTS}})
    if o.repo not in ("vl-adapter", "vl-pet"):
        raise ValueError(f"repo must be 'vl-adapter' or 'vl-pet', not {o.repo!r}")
    if o.repo == "vl-adapter":
        bad = [k for k, v in VLPET_DEFAULTS.items() if getattr(o, k) != v]
        if bad:
            raise ValueError(f"VL-PET-only options need repo='vl-pet': {bad}")
    for k in ("use_lradapter", "use_lm_head_adapter", "decoder_prompt_len"):
        if getattr(o, k):
            raise NotImplementedError(f"{k} is not implemented by this reference (no released setting)")
    if o.use_hyperformer + o.use_adapter + o.use_compacter > 1:
        raise ValueError("at most one of use_hyperformer / use_adapter / use_compacter (seed assert)")
    if o.use_hyperformer and not (o.unique_hyper_net or o.efficient_unique_hyper_net):
        raise ValueError("use_hyperformer needs unique_hyper_net or efficient_unique_hyper_net (seed assert)")
    return o


def _adapter_config(o, d: int, tasks: list[str]):
    """trainer_base.create_config: config.adapter_config (AdapterConfig / CompactorConfig /
    MetaAdapterConfig fields, overridden by the CLI options)."""
    if not (o.use_hyperformer or o.use_adapter or o.use_compacter
            or o.use_decoder_enc_attn_value_parallel_adapter_down_dim):
        return None
    return SimpleNamespace(
        tasks=list(tasks), d_model=d, input_dim=d, non_linearity="gelu_new",
        hypercomplex_adapters=o.use_compacter, train_task_adapters=o.use_compacter,
        use_single_adapter=o.use_single_adapter, share_up_sampler=o.share_up_sampler,
        share_down_sampler=o.share_down_sampler, reduction_factor=o.reduction_factor,
        add_layer_norm_before_adapter=o.add_layer_norm_before_adapter,
        add_layer_norm_after_adapter=o.add_layer_norm_after_adapter,
        hypercomplex_division=o.hypercomplex_division, phm_rank=o.phm_rank, shared_phm_rule=o.shared_phm_rule,
        factorized_phm=o.factorized_phm, shared_phm_rule_over_tasks=o.shared_phm_rule_over_tasks,
        use_adapter_down_dim=o.use_adapter_down_dim, adapter_down_dim=o.adapter_down_dim,
        use_parallel_adapter=False, use_scaling_factor=False, scaling_factor=1.0,
        # MetaAdapterConfig (hyperformer)
        task_embedding_dim=512, task_hidden_dim=128, unique_hyper_net_layer_norm=True,
        projected_task_embedding_dim=(64 if o.projected_task_embedding_dim == -1
                                      else o.projected_task_embedding_dim),
        unique_hyper_net=o.unique_hyper_net, efficient_unique_hyper_net=o.efficient_unique_hyper_net,
    )


# ---------------------------------------------------------------------------------------------
# lora/controller.py
class LoRALinearController(nn.Linear):
    """lora/controller.py LoRALinearController: W x + b + (x A_t^T B_t^T) * lora_alpha / lora_dim."""

    def __init__(self, d_in: int, d_out: int, cfg):
        super().__init__(d_in, d_out)
        r = cfg.lora_dim
        self.scaling = cfg.lora_alpha / r
        self.lora_As, self.lora_Bs = nn.ParameterDict(), nn.ParameterDict()
        shared = (nn.Parameter(torch.zeros(r, d_in)), nn.Parameter(torch.zeros(d_out, r)))
        for t in cfg.tasks:  # use_single_lora: one (A, B) pair under every task name
            a, b = shared if cfg.use_single_lora else (nn.Parameter(torch.zeros(r, d_in)),
                                                       nn.Parameter(torch.zeros(d_out, r)))
            self.lora_As[t], self.lora_Bs[t] = a, b
        self.lora_As._ref_std, self.lora_Bs._ref_std = d_in ** -0.5, 0.5 * math.sqrt(r) / cfg.lora_alpha

    def forward(self, x, task):
        result = F.linear(x, self.weight, self.bias)
        return result + (x @ self.lora_As[task].T @ self.lora_Bs[task].T) * self.scaling


# ---------------------------------------------------------------------------------------------
# adapters/hypercomplex/layers.py, adapters/adapter_modeling.py, adapters/adapter_controller.py
class PHMLinear(nn.Module):
    """adapters/hypercomplex/layers.py PHMLinear: y = x H + b, H = sum_i kron(phm_rule[i], W[i])."""

    def __init__(self, d_in: int, d_out: int, cfg):
        super().__init__()
        n, self.factorized_phm = cfg.hypercomplex_division, cfg.factorized_phm
        assert d_in % n == 0 and d_out % n == 0, (d_in, d_out, n)
        if not cfg.shared_phm_rule:  # else VLBart.set_phm_rule assigns the model-level rule later
            self.phm_rule = nn.Parameter(torch.zeros(n, n, n))
        if self.factorized_phm:
            self.W_left = nn.Parameter(torch.zeros(n, d_in // n, cfg.phm_rank))
            self.W_right = nn.Parameter(torch.zeros(n, cfg.phm_rank, d_out // n))
        else:
            self.W = nn.Parameter(torch.zeros(n, d_in // n, d_out // n))
        self.b = nn.Parameter(torch.zeros(d_out))
        self._ref_stds = {"phm_rule": n ** -0.5, "W": d_in ** -0.5, "W_left": cfg.phm_rank ** -0.5,
                          "W_right": d_in ** -0.5}

    def forward(self, x):
        W = torch.bmm(self.W_left, self.W_right) if self.factorized_phm else self.W
        r = self.phm_rule  # kronecker_product_einsum_batched(phm_rule, W).sum(0)
        H = torch.einsum("bac,bkp->bakcp", r, W).reshape(r.size(0), r.size(1) * W.size(1),
                                                         r.size(2) * W.size(2)).sum(0)
        y = torch.matmul(x, H)
        return y + self.b


def _down_size(cfg) -> int:
    return cfg.adapter_down_dim if cfg.use_adapter_down_dim else cfg.d_model // cfg.reduction_factor


class Adapter(nn.Module):
    """adapters/adapter_modeling.py Adapter: up(gelu_new(down(x))), no residual (the controller adds it)."""

    def __init__(self, cfg):
        super().__init__()
        self.down_sampler = nn.Linear(cfg.d_model, _down_size(cfg))
        self.up_sampler = nn.Linear(_down_size(cfg), cfg.d_model)

    def forward(self, x):
        return self.up_sampler(gelu_new(self.down_sampler(x)))


class HyperComplexAdapter(Adapter):
    """adapters/adapter_modeling.py HyperComplexAdapter (Compacter): PHMLinear down / up samplers."""

    def __init__(self, cfg):
        nn.Module.__init__(self)
        self.down_sampler = PHMLinear(cfg.input_dim, _down_size(cfg), cfg)
        self.up_sampler = PHMLinear(_down_size(cfg), cfg.input_dim, cfg)


class AdapterController(nn.Module):
    """adapters/adapter_controller.py AdapterController: one adapter per task name (the same module
    under every name when use_single_adapter), optional pre / post LayerNorm, then the residual:
    + inputs, or + y for VL-PET's parallel adapters (use_parallel_adapter)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        make = HyperComplexAdapter if cfg.hypercomplex_adapters else Adapter
        self.adapters = nn.ModuleDict()
        tasks = cfg.tasks
        if cfg.use_single_adapter:
            one = make(cfg)
            for t in tasks:
                self.adapters[t] = one
        else:
            for t in tasks:
                self.adapters[t] = make(cfg)
            first = self.adapters[tasks[0]]
            for t in tasks:
                if cfg.share_up_sampler:
                    self.adapters[t].up_sampler = first.up_sampler
                if cfg.share_down_sampler:
                    self.adapters[t].down_sampler = first.down_sampler
                if cfg.hypercomplex_adapters and cfg.shared_phm_rule_over_tasks and not cfg.shared_phm_rule:
                    self.adapters[t].up_sampler.phm_rule = first.up_sampler.phm_rule
                    self.adapters[t].down_sampler.phm_rule = first.down_sampler.phm_rule
        if cfg.add_layer_norm_before_adapter:
            self.pre_layer_norm = nn.LayerNorm(cfg.input_dim)
        if cfg.add_layer_norm_after_adapter:
            self.post_layer_norm = nn.LayerNorm(cfg.input_dim)

    def forward(self, inputs, task, y=None):
        z = self.pre_layer_norm(inputs) if self.cfg.add_layer_norm_before_adapter else inputs
        outputs = self.adapters[task](z)
        if self.cfg.use_scaling_factor:
            outputs = self.cfg.scaling_factor * outputs
        if self.cfg.add_layer_norm_after_adapter:
            outputs = self.post_layer_norm(outputs)
        return outputs + y if self.cfg.use_parallel_adapter else outputs + inputs


# ---------------------------------------------------------------------------------------------
# adapters/adapter_utils.py, adapters/adapter_hypernetwork.py (Hyperformer)
def _linear_layer(d_in, d_out, std=None):
    """adapter_utils.linear_layer; ``std`` is only the spread of our random fill."""
    lin = nn.Linear(d_in, d_out)
    if std is not None:
        lin._ref_std = std
    return lin


class TaskHyperNet(nn.Module):
    """adapter_utils.TaskHyperNet: Linear -> ReLU -> Linear on the flattened input."""

    def __init__(self, cfg, d_in):
        super().__init__()
        self.task_embeding_generator = nn.Sequential(  # (sic) the seed's spelling
            _linear_layer(d_in, cfg.task_hidden_dim), nn.ReLU(),
            _linear_layer(cfg.task_hidden_dim, cfg.projected_task_embedding_dim))

    def forward(self, x):
        return self.task_embeding_generator(x.view(-1)).view(-1)


class LayerNormHyperNet(nn.Module):
    """adapter_utils.LayerNormHyperNet: generated LayerNorm weight and bias."""

    def __init__(self, cfg):
        super().__init__()
        p = cfg.projected_task_embedding_dim  # built while train_task_embeddings is forced True
        self.weight_generator = _linear_layer(p, cfg.input_dim)
        self.bias_generator = _linear_layer(p, cfg.input_dim)

    def forward(self, x):
        return self.weight_generator(x), self.bias_generator(x)


class TaskEmbeddingController(nn.Module):
    """adapter_utils.TaskEmbeddingController: one 512-d parameter per task (train_task_embeddings False)."""

    def __init__(self, cfg):
        super().__init__()
        self.task_to_embeddings = nn.ParameterDict()  # filled in task order (a dict argument gets sorted)
        for t in cfg.tasks:
            self.task_to_embeddings[t] = nn.Parameter(torch.zeros(cfg.task_embedding_dim))
        self.task_to_embeddings._ref_std = 1.0

    def forward(self, task):
        return self.task_to_embeddings[task]


class AdapterLayersHyperNet(nn.Module):
    """adapter_hypernetwork.AdapterLayersHyperNet: weight (input_dim, output_dim) and bias (input_dim),
    used as F.linear(x, weight, bias), so input_dim is the generated layer's output size."""

    def __init__(self, cfg, input_dim, output_dim):
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        p = cfg.projected_task_embedding_dim
        self.weight_generator = nn.Sequential(_linear_layer(p, input_dim * output_dim,
                                                            (p * output_dim) ** -0.5))
        self.bias_generator = nn.Sequential(_linear_layer(p, input_dim, 0.1 * p ** -0.5))

    def forward(self, emb):
        return (self.weight_generator(emb).view(self.input_dim, self.output_dim),
                self.bias_generator(emb).view(-1))


class AdapterLayersHyperNetController(nn.Module):
    """adapter_hypernetwork.AdapterLayersHyperNetController (unique_hyper_net): per layer id, the
    weights of the self-attention / feed-forward (and, in the decoder, cross-attention) adapters."""

    n_inputs = 2  # [task embedding; layer-id embedding]

    def __init__(self, cfg, num_layers, include_cross_attention=False):
        super().__init__()
        self.cfg, self.include_cross_attention = cfg, include_cross_attention
        d, r = cfg.input_dim, cfg.input_dim // cfg.reduction_factor
        self.layer_id_embeddings = nn.Embedding(num_layers, cfg.task_embedding_dim)
        self.layer_id_embeddings._ref_std = 1.0
        self._extra_embeddings()
        self.task_hypernet = TaskHyperNet(cfg, cfg.task_embedding_dim * self.n_inputs)
        self.LayerNorm = nn.LayerNorm(cfg.projected_task_embedding_dim, eps=1e-6)
        for site in self._hypernet_sites():
            setattr(self, f"{site}up_sampler_hyper_net", AdapterLayersHyperNet(cfg, d, r))
            setattr(self, f"{site}down_sampler_hyper_net", AdapterLayersHyperNet(cfg, r, d))
        norms = (("pre", cfg.add_layer_norm_before_adapter), ("post", cfg.add_layer_norm_after_adapter))
        for when, on in norms:
            for site in self._norm_sites() if on else ():
                setattr(self, f"{site}{when}_layernorm_hypernet", LayerNormHyperNet(cfg))

    def _extra_embeddings(self):
        pass

    def _hypernet_sites(self):
        return ["feed_forward_", "self_attention_"] + ["cross_attention_"] * self.include_cross_attention

    def _norm_sites(self):  # the seed builds all three, even in the encoder
        return ["feed_forward_", "self_attention_", "cross_attention_"]

    def get_embedding(self, task_embedding, layer_id, block_type=None):
        parts = [task_embedding.view(1, -1), self.layer_id_embeddings.weight[layer_id].view(1, -1)]
        if block_type is not None:
            parts.append(self.adapters_block_type.weight[block_type].view(1, -1))
        emb = self.task_hypernet(torch.cat(parts, dim=0).view(-1))
        return self.LayerNorm(emb) if self.cfg.unique_hyper_net_layer_norm else emb

    def _site_weights(self, emb, prefix):
        out = SimpleNamespace(down=getattr(self, f"{prefix}down_sampler_hyper_net")(emb),
                              up=getattr(self, f"{prefix}up_sampler_hyper_net")(emb),
                              pre_norm=None, post_norm=None)
        for when in ("pre", "post"):
            net = getattr(self, f"{prefix}{when}_layernorm_hypernet", None)
            if net is not None:
                setattr(out, f"{when}_norm", net(emb))
        return out

    def forward(self, task_embedding, layer_id):
        emb = self.get_embedding(task_embedding, layer_id)
        cross = self._site_weights(emb, "cross_attention_") if self.include_cross_attention else None
        return SimpleNamespace(feed_forward=self._site_weights(emb, "feed_forward_"),
                               self_attention=self._site_weights(emb, "self_attention_"),
                               cross_attention=cross)


class AdapterLayersOneHyperNetController(AdapterLayersHyperNetController):
    """adapter_hypernetwork.AdapterLayersOneHyperNetController (efficient_unique_hyper_net): one
    up / down hyper-net for every site, told apart by a block-type embedding (ff 0, self 1, cross 2)."""

    n_inputs = 3  # [task embedding; layer-id embedding; block-type embedding]

    def _extra_embeddings(self):
        self.adapters_block_type = nn.Embedding(3, self.cfg.task_embedding_dim)
        self.adapters_block_type._ref_std = 1.0

    def _hypernet_sites(self):
        return [""]

    def _norm_sites(self):
        return [""]

    def forward(self, task_embedding, layer_id):
        site = lambda kind: self._site_weights(self.get_embedding(task_embedding, layer_id, kind), "")
        return SimpleNamespace(feed_forward=site(0), self_attention=site(1),
                               cross_attention=site(2) if self.include_cross_attention else None)


class MetaLayersAdapterController(nn.Module):
    """adapter_controller.MetaLayersAdapterController: the generated adapter, residual included."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg

    def forward(self, inputs, w):
        d = (self.cfg.input_dim,)
        z = F.layer_norm(inputs, d, w.pre_norm[0], w.pre_norm[1]) if self.cfg.add_layer_norm_before_adapter \
            else inputs
        out = F.linear(gelu_new(F.linear(z, w.down[0], w.down[1])), w.up[0], w.up[1])
        if self.cfg.add_layer_norm_after_adapter:
            out = F.layer_norm(out, d, w.post_norm[0], w.post_norm[1])
        return out + inputs


# ---------------------------------------------------------------------------------------------
# prompt/prompt_modeling.py, prompt/prompt_controller.py
class InputPrompts(nn.Module):
    """prompt_modeling.InputPrompts: Embedding(prompt_len) -> Linear -> Tanh -> Linear."""

    def __init__(self, prompt_len, input_dim, mid_dim):
        super().__init__()
        self.prompt_len = prompt_len
        self.prefix_embedding = nn.Sequential(nn.Embedding(prompt_len, input_dim),
                                              nn.Linear(input_dim, mid_dim), nn.Tanh(),
                                              nn.Linear(mid_dim, input_dim))

    def get_prompt(self, bsz, device):
        tokens = torch.arange(self.prompt_len, device=device).unsqueeze(0).expand(bsz, -1)
        return self.prefix_embedding(tokens)


class PromptController(nn.Module):
    """prompt_controller.PromptController: one InputPrompts per task (shared if use_single_prompt)."""

    def __init__(self, tasks, prompt_len, input_dim, mid_dim, single):
        super().__init__()
        self.prompts = nn.ModuleDict()
        one = InputPrompts(prompt_len, input_dim, mid_dim) if single else None
        for t in tasks:
            self.prompts[t] = one if single else InputPrompts(prompt_len, input_dim, mid_dim)

    def forward(self, bsz, device, task):
        return self.prompts[task].get_prompt(bsz, device)


# ---------------------------------------------------------------------------------------------
# my_transformers/modeling_bart.py: attention, layers
class BartLearnedPositionalEmbedding(nn.Embedding):
    """Positions 0.. read rows 2.. (BART's offset of 2)."""

    offset = 2

    def __init__(self, num_embeddings, dim, padding_idx):
        super().__init__(num_embeddings + self.offset, dim, padding_idx=padding_idx)

    def forward(self, seq_len: int, past: int = 0):
        return super().forward(torch.arange(past, past + seq_len, device=self.weight.device) + self.offset)


class BartAttention(nn.Module):
    """BartAttention (LoraBartAttention when ``lora_cfg`` is given: LoRA on q_proj and v_proj)."""

    def __init__(self, d, heads, lora_cfg=None):
        super().__init__()
        self.heads, self.head_dim = heads, d // heads
        self.scaling = self.head_dim ** -0.5
        lin = lambda: nn.Linear(d, d) if lora_cfg is None else LoRALinearController(d, d, lora_cfg)
        self.k_proj, self.v_proj, self.q_proj = nn.Linear(d, d), lin(), lin()
        self.out_proj = nn.Linear(d, d)

    @staticmethod
    def _lin(mod, x, task):
        return mod(x, task) if isinstance(mod, LoRALinearController) else mod(x)

    def cross_values(self, kv, task):
        return self._lin(self.v_proj, kv, task)

    def forward(self, hidden, key_value_states=None, attention_mask=None, task=None):
        B, T, d = hidden.shape
        src = hidden if key_value_states is None else key_value_states
        query = self._lin(self.q_proj, hidden, task) * self.scaling
        key = self.k_proj(src)
        if key_value_states is None:
            value = self._lin(self.v_proj, src, task)
        else:
            value = self.cross_values(src, task)
        H, hd = self.heads, self.head_dim
        shape = lambda t: t.view(B, -1, H, hd).transpose(1, 2).reshape(B * H, -1, hd)
        q, k, v = shape(query), shape(key), shape(value)
        w = torch.bmm(q, k.transpose(1, 2))
        S = k.size(1)
        if attention_mask is not None:
            w = (w.view(B, self.heads, T, S) + attention_mask).view(B * self.heads, T, S)
        out = torch.bmm(F.softmax(w, dim=-1), v)
        out = out.view(B, self.heads, T, self.head_dim).transpose(1, 2).reshape(B, T, d)
        return self.out_proj(out)


class BartAttentionWithValueAdapter(BartAttention):
    """VL-PET BartAttentionWithValueAdapter (decoder cross-attention, value parallel adapter only):
    V = v_proj(enc) + adapter(enc), i.e. AdapterController with use_parallel_adapter and y = v_proj(enc)."""

    def __init__(self, d, heads, adapter_cfg):
        super().__init__(d, heads)
        self.attn_value_parallel_adapter = AdapterController(adapter_cfg)

    def cross_values(self, kv, task):
        return self.attn_value_parallel_adapter(kv, task, y=self.v_proj(kv))


class BartEncoderLayer(nn.Module):
    """BartEncoderLayer (post-LN) with VL-Adapter's adapters / hyperformer and VL-PET's encoder
    modules: multi-head-down adapters and the granularity gates (large / small / middleX / middleY)."""

    def __init__(self, hc, o, acfg, lcfg):
        super().__init__()
        d, self.o = hc["d_model"], o
        self.act = ACT2FN[hc.get("activation_function", "gelu")]
        self.self_attn = BartAttention(d, hc["encoder_attention_heads"], lcfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hc["encoder_ffn_dim"])
        self.fc2 = nn.Linear(hc["encoder_ffn_dim"], d)
        self.final_layer_norm = nn.LayerNorm(d)
        has = (o.use_adapter or o.use_compacter) and not o.no_encoder_adapter
        self.attn_adapter = AdapterController(acfg) if has else None
        self.ff_adapter = AdapterController(acfg) if has else None
        self.adapter_hypernet = MetaLayersAdapterController(acfg) if o.use_hyperformer else None
        for s in ("attn", "ff"):  # registered in the seed's order
            if o.use_encoder_adapter_gating_small_xy_cat:
                setattr(self, f"encoder_{s}_adapter_gating_small_xy_cat", nn.Linear(2 * d, 1))
            if o.use_encoder_adapter_gating_middle_xy_add:
                setattr(self, f"encoder_{s}_adapter_gating_middle_xy_add", nn.Linear(d, 1))
        for s in ("attn", "ff"):
            if o.use_encoder_adapter_gating_middle_ia3_add:
                setattr(self, f"encoder_{s}_adapter_gating_middle_ia3_add", nn.Parameter(torch.zeros(d)))
        for s in ("attn", "ff"):
            if o.use_encoder_adapter_gating_large_x_lowrank:
                g = o.adapter_gating_down_dim
                setattr(self, f"encoder_{s}_adapter_gating_large_x_down", nn.Linear(d, g))
                setattr(self, f"encoder_{s}_adapter_gating_large_x_up", nn.Linear(g, d))
        for s in ("attn", "ff"):
            if o.use_encoder_adapter_down_multihead:
                h = o.encoder_adapter_multihead_num_head
                assert o.adapter_down_dim % h == 0, "the seed concatenates h * int(x / h) features"
                setattr(self, f"{s}_adapter_multihead_down",
                        nn.ModuleList([nn.Linear(d, o.adapter_down_dim // h) for _ in range(h)]))
                setattr(self, f"{s}_adapter_multihead_up", nn.Linear(o.adapter_down_dim, d))

    def _adapt(self, s, h, task):
        """attn_adapter / ff_adapter, else VL-PET's multi-head-down adapter h + U gelu_new([D_1 h; ..])."""
        ctrl = getattr(self, f"{s}_adapter")
        if ctrl is not None:
            return ctrl(h, task)
        if self.o.use_encoder_adapter_down_multihead:
            downs = getattr(self, f"{s}_adapter_multihead_down")
            z = gelu_new(torch.cat([m(h) for m in downs], dim=-1))
            return h + getattr(self, f"{s}_adapter_multihead_up")(z)
        return h

    def _gate(self, s, residual, h):
        """VL-PET granularity gates; ``residual`` is the sublayer's input, ``h`` the adapted output."""
        o, add = self.o, self.o.use_encoder_adapter_gating_add
        if o.use_encoder_adapter_gating_large_x_lowrank:
            g = getattr(self, f"encoder_{s}_adapter_gating_large_x_down")(residual)
            g = torch.sigmoid(getattr(self, f"encoder_{s}_adapter_gating_large_x_up")(gelu_new(g)))
        elif o.use_encoder_adapter_gating_small_xy_cat:
            g = torch.sigmoid(getattr(self, f"encoder_{s}_adapter_gating_small_xy_cat")(
                torch.cat([residual, h], dim=2)))
            g = torch.mean(g, dim=1).unsqueeze(-1)  # (B, 1, 1): mean over ALL positions, pads included
        elif o.use_encoder_adapter_gating_middle_xy_add:
            g = torch.sigmoid(getattr(self, f"encoder_{s}_adapter_gating_middle_xy_add")(residual + h))
        elif o.use_encoder_adapter_gating_middle_ia3_add:
            p = getattr(self, f"encoder_{s}_adapter_gating_middle_ia3_add")
            return h + torch.ones_like(h) + p if add else h + h * p
        else:
            return h
        return h + g if add else h * g

    def forward(self, hidden, attention_mask, block_adapters=None, task=None):
        for s in ("attn", "ff"):
            residual = hidden
            if s == "attn":
                h = self.self_attn(hidden, attention_mask=attention_mask, task=task)
            else:
                h = self.fc2(self.act(self.fc1(hidden)))
            h = self._gate(s, residual, self._adapt(s, h, task))
            if self.adapter_hypernet is not None:
                h = self.adapter_hypernet(h, block_adapters.self_attention if s == "attn"
                                          else block_adapters.feed_forward)
            if self.o.use_encoder_gating_scaling:
                h = h * self.o.encoder_gating_scaling_factor
            hidden = (self.self_attn_layer_norm if s == "attn" else self.final_layer_norm)(residual + h)
        if torch.isinf(hidden).any() or torch.isnan(hidden).any():
            clamp = torch.finfo(hidden.dtype).max - 1000
            hidden = torch.clamp(hidden, min=-clamp, max=clamp)
        return hidden


class BartDecoderLayer(nn.Module):
    """BartDecoderLayer (post-LN): self-attention, cross-attention (VL-PET: value parallel adapter in
    it), FFN, each optionally followed by an adapter / the hyperformer's generated adapter."""

    def __init__(self, hc, o, acfg, lcfg):
        super().__init__()
        d, heads, self.o = hc["d_model"], hc["decoder_attention_heads"], o
        self.act = ACT2FN[hc.get("activation_function", "gelu")]
        self.self_attn = BartAttention(d, heads, lcfg)
        self.self_attn_layer_norm = nn.LayerNorm(d)
        if lcfg is None and o.use_decoder_enc_attn_value_parallel_adapter_down_dim:
            vcfg = SimpleNamespace(**vars(acfg))  # deepcopy(config.adapter_config), then:
            vcfg.use_adapter_down_dim = True
            vcfg.adapter_down_dim = o.decoder_enc_attn_value_parallel_adapter_down_dim
            vcfg.use_parallel_adapter = True
            if o.use_decoder_enc_attn_value_parallel_adapter_scaling:
                vcfg.use_scaling_factor = True
                vcfg.scaling_factor = o.decoder_enc_attn_value_parallel_adapter_scaling_factor
            self.encoder_attn = BartAttentionWithValueAdapter(d, heads, vcfg)
        else:
            self.encoder_attn = BartAttention(d, heads, lcfg)
        self.encoder_attn_layer_norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hc["decoder_ffn_dim"])
        self.fc2 = nn.Linear(hc["decoder_ffn_dim"], d)
        self.final_layer_norm = nn.LayerNorm(d)
        has = (o.use_adapter or o.use_compacter) and not o.no_decoder_adapter
        self.self_attn_adapter = AdapterController(acfg) if has else None
        self.enc_attn_adapter = AdapterController(acfg) if has and o.add_adapter_cross_attn else None
        self.ff_adapter = AdapterController(acfg) if has else None
        self.adapter_hypernet = MetaLayersAdapterController(acfg) if o.use_hyperformer else None

    def forward(self, hidden, attention_mask, enc, enc_mask, block_adapters=None, task=None):
        residual = hidden
        h = self.self_attn(hidden, attention_mask=attention_mask, task=task)
        if self.self_attn_adapter is not None:
            h = self.self_attn_adapter(h, task)
        if self.adapter_hypernet is not None:
            h = self.adapter_hypernet(h, block_adapters.self_attention)
        hidden = self.self_attn_layer_norm(residual + h)

        residual = hidden
        h = self.encoder_attn(hidden, key_value_states=enc, attention_mask=enc_mask, task=task)
        if self.enc_attn_adapter is not None:
            h = self.enc_attn_adapter(h, task)
        if self.adapter_hypernet is not None and self.o.add_adapter_cross_attn:
            h = self.adapter_hypernet(h, block_adapters.cross_attention)
        hidden = self.encoder_attn_layer_norm(residual + h)

        residual = hidden
        h = self.fc2(self.act(self.fc1(hidden)))
        if self.ff_adapter is not None:
            h = self.ff_adapter(h, task)
        if self.adapter_hypernet is not None:
            h = self.adapter_hypernet(h, block_adapters.feed_forward)
        return self.final_layer_norm(residual + h)


def _expand_mask(mask, dtype, tgt_len):
    """_expand_mask: (B, S) 1/0 -> (B, 1, T, S) additive, finfo.min where masked."""
    B, S = mask.shape
    inverted = 1.0 - mask[:, None, None, :].expand(B, 1, tgt_len, S).to(dtype)
    return inverted.masked_fill(inverted.bool(), torch.finfo(dtype).min)


def _hyper_net(acfg, num_layers, cross):
    if acfg.efficient_unique_hyper_net:  # checked second in the seed, so it wins
        return AdapterLayersOneHyperNetController(acfg, num_layers, cross)
    return AdapterLayersHyperNetController(acfg, num_layers, cross)


# ---------------------------------------------------------------------------------------------
# modeling_bart.py: VisualEmbedding, JointEncoder; my_transformers: BartDecoder; VLBartModel, VLBart
class VisualEmbedding(nn.Module):
    """modeling_bart.VisualEmbedding: Linear(feat) [+LN] + Linear(x1,x2,y1,y2,area) [+LN]
    + img_order_embedding + obj_order_embedding (= the shared token embedding, rows V-1-k)."""

    def __init__(self, o, d, obj_order_embedding):
        super().__init__()
        self.o = o
        ind = o.use_vis_layer_norm and o.individual_vis_layer_norm
        self.feat_embedding = nn.Sequential(nn.Linear(int(o.feat_dim), d),
                                            *([nn.LayerNorm(d)] if ind else []))
        self.absolute_vis_pos_embedding = nn.Sequential(nn.Linear(int(o.pos_dim) + 1, d),
                                                        *([nn.LayerNorm(d)] if ind else []))
        if o.use_vis_order_embedding:
            self.obj_order_embedding = obj_order_embedding
            self.img_order_embedding = nn.Embedding(2, d)  # trainer_base: config.n_images = 2
        if o.use_vis_layer_norm and not o.individual_vis_layer_norm:
            self.layer_norm = nn.LayerNorm(d)

    def forward(self, feats, pos, img_order_ids=None, obj_order_ids=None):
        B, N, _ = feats.shape
        feat_embedding = self.feat_embedding(feats)
        area = ((pos[:, :, 3] - pos[:, :, 2]) * (pos[:, :, 1] - pos[:, :, 0])).unsqueeze(2)
        absolute = self.absolute_vis_pos_embedding(torch.cat([pos, area], dim=2))
        if self.o.use_vis_order_embedding:
            if img_order_ids is None:
                img_order_ids = torch.zeros(1, N, dtype=torch.long, device=feats.device)
            if obj_order_ids is None:
                obj_order_ids = torch.arange(N, dtype=torch.long, device=feats.device).unsqueeze(0)
            obj_order_ids = self.obj_order_embedding.num_embeddings - obj_order_ids - 1
            vis = feat_embedding + absolute + self.img_order_embedding(img_order_ids) \
                + self.obj_order_embedding(obj_order_ids)
        else:
            vis = feat_embedding + absolute
        if self.o.use_vis_layer_norm and not self.o.individual_vis_layer_norm:
            vis = self.layer_norm(vis)
        return vis


class JointEncoder(nn.Module):
    """modeling_bart.JointEncoder: [prompts; text tokens + positions] -> layernorm_embedding, then the
    visual tokens (own LayerNorms, no positions) are appended; mask [1s; text != pad; 1s]."""

    def __init__(self, hc, o, acfg, lcfg, shared, task_embed, tasks):
        super().__init__()
        d, self.o, self.hc = hc["d_model"], o, hc
        self.embed_scale = math.sqrt(d) if hc.get("scale_embedding", False) else 1.0
        self.embed_tokens = shared
        self.task_embed = task_embed
        if o.use_hyperformer:
            self.adapter_layers_hyper_net = _hyper_net(acfg, hc["encoder_layers"], False)
        self.embed_positions = BartLearnedPositionalEmbedding(hc["max_position_embeddings"], d,
                                                              hc["pad_token_id"])
        self.layers = nn.ModuleList(BartEncoderLayer(hc, o, acfg, lcfg) for _ in range(hc["encoder_layers"]))
        self.layernorm_embedding = nn.LayerNorm(d)
        self.visual_embedding = VisualEmbedding(o, d, shared)
        if o.encoder_prompt_len > 0:  # seed: EncoderPromptConfig.input_dim = 768 (see KEYS_BART.md)
            self.prompt_modules = PromptController(tasks, o.encoder_prompt_len, d, o.mid_dim,
                                                   o.use_single_prompt)

    def forward(self, input_ids, vis_feats, boxes, img_order_ids=None, obj_order_ids=None, task=None):
        B, L = input_ids.shape
        x = self.embed_tokens(input_ids) * self.embed_scale
        x = x + self.embed_positions(L)
        if self.o.encoder_prompt_len > 0:
            x = torch.cat([self.prompt_modules(B, x.device, task), x], dim=1)
        vis = self.visual_embedding(vis_feats, boxes, img_order_ids, obj_order_ids)
        if self.o.share_vis_lang_layer_norm:
            x = self.layernorm_embedding(torch.cat([x, vis], dim=1))
        else:
            x = torch.cat([self.layernorm_embedding(x), vis], dim=1)
        mask = encoder_mask(input_ids, self.hc["pad_token_id"], self.o.encoder_prompt_len, vis.size(1),
                            x.dtype)
        ext = _expand_mask(mask, x.dtype, x.size(1))
        task_embedding = self.task_embed(task) if self.task_embed is not None else None
        for idx, layer in enumerate(self.layers):
            blocks = self.adapter_layers_hyper_net(task_embedding, idx) if self.o.use_hyperformer else None
            x = layer(x, ext, blocks, task)
        return x, mask


def encoder_mask(input_ids, pad_id, prompt_len, n_vis, dtype):
    """The (B, S) encoder mask the seed builds (JointEncoder / VLBartModel.forward): prompts, text, vision."""
    B = input_ids.size(0)
    parts = [torch.ones(B, prompt_len, dtype=dtype, device=input_ids.device)] if prompt_len else []
    parts += [input_ids.ne(pad_id).to(dtype), torch.ones(B, n_vis, dtype=dtype, device=input_ids.device)]
    return torch.cat(parts, dim=1)


class BartDecoder(nn.Module):
    """my_transformers BartDecoder: tokens + positions -> layernorm_embedding -> layers (no final LN)."""

    def __init__(self, hc, o, acfg, lcfg, shared, task_embed):
        super().__init__()
        d, self.o = hc["d_model"], o
        self.embed_scale = math.sqrt(d) if hc.get("scale_embedding", False) else 1.0
        self.embed_tokens = shared
        self.task_embed = task_embed
        if o.use_hyperformer:
            self.adapter_layers_hyper_net = _hyper_net(acfg, hc["decoder_layers"], True)
        self.embed_positions = BartLearnedPositionalEmbedding(hc["max_position_embeddings"], d,
                                                              hc["pad_token_id"])
        self.layers = nn.ModuleList(BartDecoderLayer(hc, o, acfg, lcfg) for _ in range(hc["decoder_layers"]))
        self.layernorm_embedding = nn.LayerNorm(d)

    def forward(self, decoder_input_ids, enc, enc_mask, task=None):
        B, T = decoder_input_ids.shape
        x = self.embed_tokens(decoder_input_ids) * self.embed_scale
        causal = None
        if T > 1:  # _make_causal_mask
            cond = torch.arange(T, device=x.device)
            causal = torch.full((T, T), float("-inf"), device=x.device)
            causal = causal.masked_fill(cond < (cond + 1).view(T, 1), 0).to(x.dtype)
            causal = causal[None, None].expand(B, 1, T, T)
        cross = _expand_mask(enc_mask, x.dtype, T)
        x = self.layernorm_embedding(x + self.embed_positions(T))
        task_embedding = self.task_embed(task) if self.task_embed is not None else None
        for idx, layer in enumerate(self.layers):
            blocks = self.adapter_layers_hyper_net(task_embedding, idx) if self.o.use_hyperformer else None
            x = layer(x, causal, enc, cross, blocks, task)
        return x


class VLBartModel(nn.Module):
    """modeling_bart.VLBartModel: shared embedding (encoder, decoder, object order), optional task
    embeddings (hyperformer), JointEncoder, BartDecoder."""

    def __init__(self, hc, o, acfg, lcfg, tasks):
        super().__init__()
        self.shared = nn.Embedding(hc["vocab_size"], hc["d_model"], hc["pad_token_id"])
        self.shared_task_embed = TaskEmbeddingController(acfg) if o.use_hyperformer else None
        self.encoder = JointEncoder(hc, o, acfg, lcfg, self.shared, self.shared_task_embed, tasks)
        self.decoder = BartDecoder(hc, o, acfg, lcfg, self.shared, self.shared_task_embed)


class VLBart(nn.Module):
    """modeling_bart.VLBart: lm_head tied to model.shared, + final_logits_bias; with Compacter's
    shared_phm_rule, one model-level phm_rule that set_phm_rule hands to every PHMLinear."""

    def __init__(self, hc, o, tasks):
        super().__init__()
        acfg = _adapter_config(o, hc["d_model"], tasks)
        lcfg = SimpleNamespace(lora_dim=o.lora_dim, lora_alpha=o.lora_alpha, tasks=list(tasks),
                               use_single_lora=o.use_single_lora) if o.use_lora else None
        self.hc, self.o, self.tasks = hc, o, list(tasks)
        self.model = VLBartModel(hc, o, acfg, lcfg, tasks)
        self.register_buffer("final_logits_bias", torch.zeros(1, hc["vocab_size"]))
        self.lm_head = nn.Linear(hc["d_model"], hc["vocab_size"], bias=False)
        self.lm_head.weight = self.model.shared.weight
        if acfg is not None and acfg.train_task_adapters and acfg.shared_phm_rule:  # CompactorConfig only
            n = acfg.hypercomplex_division
            self.phm_rule = nn.Parameter(torch.zeros(n, n, n))
            self._ref_stds = {"phm_rule": n ** -0.5}
            for m in self.model.modules():
                if isinstance(m, PHMLinear):
                    m.phm_rule = self.phm_rule

    def encode(self, input_ids, vis_feats, boxes, img_order_ids=None, obj_order_ids=None, task=None):
        return self.model.encoder(input_ids, vis_feats, boxes, img_order_ids, obj_order_ids, task)

    def decode(self, decoder_input_ids, enc, enc_mask, task=None):
        h = self.model.decoder(decoder_input_ids, enc, enc_mask, task)
        return self.lm_head(h) + self.final_logits_bias


def _spread(mod: nn.Module, name: str, p: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the random fill of parameter ``name`` of ``mod``."""
    own = getattr(mod, "_ref_std", None)
    if name in getattr(mod, "_ref_stds", {}):
        return 0.0, mod._ref_stds[name]
    if isinstance(mod, nn.LayerNorm):
        return (1.0, 0.1) if name == "weight" else (0.0, 0.1)
    if isinstance(mod, nn.Embedding):
        return 0.0, own or 2.0 * p.size(1) ** -0.5
    if name == "bias" or (p.dim() == 1 and own is None):
        return 0.0, 0.1
    return 0.0, own or p.size(-1) ** -0.5


def _fill_random(model: nn.Module, seed: int) -> None:
    """Seeded values for every tensor, frozen or trainable, each shared tensor once: LayerNorm weights
    1 + 0.1 N, biases and other vectors 0.1 N, matrices N / sqrt(fan_in), embeddings 2 N / sqrt(d).
    A module can set its own spread (``_ref_std`` / ``_ref_stds``) to keep outputs O(1)."""
    g = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod._parameters.items():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    mean, std = _spread(mod, name, p)
                    p.copy_(mean + std * torch.randn(p.shape, generator=g))
        model.final_logits_bias.copy_(0.1 * torch.randn(model.final_logits_bias.shape, generator=g))


# ---------------------------------------------------------------------------------------------
# Public API (shared with vlt5.py)
def build(hf_config: dict, method: dict, tasks: list[str], seed: int = 0) -> nn.Module:
    """VLBart as the seed code builds it, every tensor filled with seeded random values, in eval mode.

    ``hf_config``: a BART config.json dict (vocab_size already includes the 200 added tokens).
    ``method``: seed CLI options under their param.py names (unspecified: param.py's defaults),
    plus ``repo`` ("vl-adapter" | "vl-pet"). ``tasks``: the multitask task names (ModuleDict keys)."""
    o = _options(method)
    model = VLBart(dict(hf_config), o, tasks)
    _fill_random(model, seed)
    return model.eval()


@torch.no_grad()
def logits(model, input_ids, vis_feats, boxes, img_order_ids, decoder_input_ids, task: str,
           obj_order_ids=None) -> torch.Tensor:
    """(B, L_dec, V) logits of VLBart.forward(input_ids, vis_inputs=(feats, boxes[, img, obj]),
    decoder_input_ids, task); the encoder mask is input_ids != pad as in the seed."""
    enc, mask = model.encode(input_ids, vis_feats, boxes, img_order_ids, obj_order_ids, task)
    return model.decode(decoder_input_ids, enc, mask, task)


def _no_repeat_ngram_banned(seq: list[int], n: int) -> list[int]:
    """NoRepeatNGramLogitsProcessor (transformers 4.2.1) over the whole decoder sequence."""
    if n <= 0 or len(seq) + 1 < n:
        return []
    prefix = tuple(seq[len(seq) + 1 - n:])
    return [ng[-1] for ng in zip(*[seq[i:] for i in range(n)]) if tuple(ng[:-1]) == prefix]


@torch.no_grad()
def greedy(model, input_ids, vis_feats, boxes, img_order_ids, task: str, max_new_tokens: int,
           obj_order_ids=None) -> list[list[int]]:
    """model.generate(num_beams=1) under transformers 4.2.1: start from decoder_start_token_id, argmax
    after the config's logits processors (no_repeat_ngram_size and min_length from ``hf_config``,
    defaults 0 as PretrainedConfig; facebook/bart-base's config.json sets no_repeat_ngram_size 3), no
    forced BOS (greedy_search never calls adjust_logits_during_generation). Stops at eos; returns the
    generated ids without the start token, eos included when produced. The seed's cap is
    max_length - 1 new tokens (config.max_length 20 for VQA/GQA). Recomputes the decoder each step
    (no KV cache; same values)."""
    hc = model.hc
    eos, pad = hc.get("eos_token_id", 2), hc.get("pad_token_id", 1)
    ngram, min_len = hc.get("no_repeat_ngram_size", 0) or 0, hc.get("min_length", 0) or 0
    enc, mask = model.encode(input_ids, vis_feats, boxes, img_order_ids, obj_order_ids, task)
    B = input_ids.size(0)
    dec = torch.full((B, 1), hc.get("decoder_start_token_id", 2), dtype=torch.long, device=input_ids.device)
    out, done = [[] for _ in range(B)], [False] * B
    for _ in range(max_new_tokens):
        scores = model.decode(dec, enc, mask, task)[:, -1].clone()
        if dec.size(1) < min_len:
            scores[:, eos] = -float("inf")
        for b in range(B):
            banned = _no_repeat_ngram_banned(dec[b].tolist(), ngram)
            if banned:
                scores[b, banned] = -float("inf")
        nxt = scores.argmax(-1)
        nxt = torch.where(torch.tensor(done, device=nxt.device), torch.full_like(nxt, pad), nxt)
        dec = torch.cat([dec, nxt[:, None]], dim=1)
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
                done[b] = int(nxt[b]) == eos
        if all(done):
            break
    return out


# ---------------------------------------------------------------------------------------------
# The released settings (scripts/image-text/*.sh of both repos), scaled to d_model 64 / feat_dim 32.
_VLPET = dict(repo="vl-pet", feat_dim=32, use_adapter=True, use_single_adapter=True, no_encoder_adapter=True,
              use_adapter_down_dim=True, use_encoder_adapter_down_multihead=True, adapter_down_dim=16,
              encoder_adapter_multihead_num_head=4, unfreeze_encoder_layer_norms=True,
              no_decoder_adapter=True, use_decoder_enc_attn_value_parallel_adapter_down_dim=True,
              decoder_enc_attn_value_parallel_adapter_down_dim=8, reduction_factor=8, use_tasks_prompts=True)
KINDS: dict[str, dict] = {
    # full_finetuning.sh (and the pre-trained VL-BART): visual embedding + BART, no adapter
    "full": dict(feat_dim=32, unfreeze_language_model=True),
    # single_lora.sh / multiple_lora.sh (lora_dim 128 -> 8)
    "lora": dict(feat_dim=32, use_lora=True, lora_dim=8, use_single_lora=True, use_tasks_prompts=True),
    "lora_multiple": dict(feat_dim=32, use_lora=True, lora_dim=8),
    # single_adapter.sh / multiple_adapters.sh (reduction 8: 64 -> 8); half-shared: no script, README's kind
    "adapter_single": dict(feat_dim=32, use_adapter=True, unfreeze_layer_norms=True, reduction_factor=8,
                           use_single_adapter=True, use_tasks_prompts=True),
    "adapter_multiple": dict(feat_dim=32, use_adapter=True, unfreeze_layer_norms=True, reduction_factor=8),
    "adapter_half_shared_up": dict(feat_dim=32, use_adapter=True, reduction_factor=8, share_up_sampler=True),
    "adapter_half_shared_down": dict(feat_dim=32, use_adapter=True, reduction_factor=8,
                                     share_down_sampler=True),
    # single_compacter.sh / multiple_compacters.sh
    "compacter_single": dict(feat_dim=32, use_compacter=True, shared_phm_rule=False, factorized_phm=False,
                             unfreeze_layer_norms=True, use_single_adapter=True, use_tasks_prompts=True,
                             hypercomplex_division=2, reduction_factor=8),
    "compacter_multiple": dict(feat_dim=32, use_compacter=True, shared_phm_rule=False, factorized_phm=False,
                               unfreeze_layer_norms=True, hypercomplex_division=2, reduction_factor=8),
    # hyperformer.sh
    "hyperformer": dict(feat_dim=32, use_hyperformer=True, unique_hyper_net=True, unfreeze_layer_norms=True,
                        projected_task_embedding_dim=8, reduction_factor=8),
    # single_prompt.sh / multiple_prompts.sh (encoder_prompt_len 40 -> 6, mid_dim 800 -> 40)
    "prompt_single": dict(feat_dim=32, encoder_prompt_len=6, mid_dim=40, use_single_prompt=True,
                          use_tasks_prompts=True),
    "prompt_multiple": dict(feat_dim=32, encoder_prompt_len=6, mid_dim=40),
    # VL-PET-{large,middleX,middleY,small}.sh (96 / 4 heads / 96 / 96 -> 16 / 4 / 8 / 8)
    "vlpet_large": dict(_VLPET, use_encoder_adapter_gating_large_x_lowrank=True, adapter_gating_down_dim=8),
    "vlpet_middlex": dict(_VLPET, use_encoder_adapter_gating_middle_xy_add=True),
    "vlpet_middley": dict(_VLPET, use_encoder_adapter_gating_middle_ia3_add=True),
    "vlpet_small": dict(_VLPET, use_encoder_adapter_gating_small_xy_cat=True),
}
# Not released, but other layouts the same code builds: param.py's Compacter defaults (shared and
# factorized PHM), Hyperformer's efficient variant, adapters with pre/post LayerNorms, VL-Adapter's
# single adapter without the cross-attention site.
EXTRA_KINDS: dict[str, dict] = {
    "compacter_param_defaults": dict(feat_dim=32, use_compacter=True, use_single_adapter=True,
                                     reduction_factor=8),
    "compacter_shared_rule_over_tasks": dict(feat_dim=32, use_compacter=True, shared_phm_rule=False,
                                             factorized_phm=True, phm_rank=2, shared_phm_rule_over_tasks=True,
                                             hypercomplex_division=2, reduction_factor=8),
    "hyperformer_efficient": dict(feat_dim=32, use_hyperformer=True, efficient_unique_hyper_net=True,
                                  projected_task_embedding_dim=8, reduction_factor=8,
                                  add_layer_norm_before_adapter=True),
    "adapter_ln_no_cross": dict(feat_dim=32, use_adapter=True, reduction_factor=8, use_single_adapter=True,
                                add_layer_norm_before_adapter=True, add_layer_norm_after_adapter=True,
                                add_adapter_cross_attn=False),
    "vlpet_large_multi_value": dict(_VLPET, use_single_adapter=False,
                                    use_encoder_adapter_gating_large_x_lowrank=True,
                                    adapter_gating_down_dim=8, use_encoder_gating_scaling=True,
                                    encoder_gating_scaling_factor=0.3),
}
