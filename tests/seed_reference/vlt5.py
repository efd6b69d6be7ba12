"""Test-only reference model: VL-T5 as the public code of VL-Adapter and VL-PET builds and runs it.

A plain-torch re-implementation written for tests. It keeps the seed's module and parameter names, so
``state_dict()`` has exactly the keys that the seed's trainer_base.py ``save()``
(``torch.save(self.model.state_dict(), ...)``) writes, and it keeps the seed's order of operations.
Sources followed (paths are inside each repository's ``src`` folder; VL_adapter keeps it in ``VL-T5/src``):

* ``modeling_t5.py``: VisualEmbedding, JointEncoder, VLT5
* ``my_transformers/modeling_t5.py``: T5 layers with the adapter and VL-PET hooks
* ``adapters/``, ``prompt/``, ``trainer_base.py`` (create_config), ``param.py`` (option defaults)

The seed ran on transformers 4.2.1. The attention masks use that version's constants. Nothing in petserve
imports this file. KEYS_T5.md beside it lists the keys and every departure from the seed.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

PAD_ID, EOS_ID, DECODER_START_ID = 0, 1, 0  # t5-base config.json: pad 0, eos 1, decoder start = pad
MASK_VALUE = -10000.0  # transformers 4.2.1 ModuleUtilsMixin.get_extended_attention_mask
ENC_MASK_VALUE = -1e9  # transformers 4.2.1 ModuleUtilsMixin.invert_attention_mask (float32)

# param.py defaults of the options that shape the T5 module tree (multitask.py: feat_dim=2048 for RN101).
PARAM_DEFAULTS = {
    "feat_dim": 2048, "pos_dim": 4, "use_vis_order_embedding": True, "use_vis_layer_norm": True,
    "individual_vis_layer_norm": True, "additional_visual_embedding_layers": 0, "downsample": False,
    "n_boxes": 36, "no_vis": False, "oneddownsample": False, "sparse_sample": False,
    "encoder_prompt_len": 0, "decoder_prompt_len": 0, "use_single_prompt": False, "mid_dim": 768,
    "use_adapter": False, "use_hyperformer": False, "use_compacter": False, "use_lradapter": False,
    "use_single_adapter": False, "unique_hyper_net": False, "efficient_unique_hyper_net": False,
    "projected_task_embedding_dim": -1, "share_down_sampler": False, "share_up_sampler": False,
    "hypercomplex_division": 4, "phm_rank": 1, "shared_phm_rule": True, "factorized_phm": True,
    "add_adapter_cross_attn": True, "low_rank_rank": 1, "phm_init_range": 0.01,
    "shared_phm_rule_over_tasks": False, "add_layer_norm_before_adapter": False,
    "add_layer_norm_after_adapter": False, "reduction_factor": 16, "use_lm_head_adapter": False,
    "use_lora": False, "lora_dim": 4, "lora_alpha": 32.0, "use_single_lora": False,
}
VLPET_DEFAULTS = {  # options that exist only in VL-PET src/param.py
    "no_encoder_adapter": False, "no_decoder_adapter": False, "use_adapter_down_dim": False,
    "adapter_down_dim": 96, "use_encoder_adapter_down_multihead": False,
    "encoder_adapter_multihead_num_head": 1, "use_encoder_adapter_gating_large_x_lowrank": False,
    "adapter_gating_down_dim": 96, "use_encoder_adapter_gating_small_xy_cat": False,
    "use_encoder_adapter_gating_middle_xy_add": False, "use_encoder_adapter_gating_middle_ia3_add": False,
    "use_encoder_gating_scaling": False, "encoder_gating_scaling_factor": 1.0,
    "use_encoder_adapter_scaling": False, "encoder_adapter_scaling_factor": 1.0,
    "use_encoder_x2_scaling": False, "encoder_x2_scaling_factor": 1.0,
    "use_decoder_enc_attn_value_parallel_adapter_down_dim": False,
    "decoder_enc_attn_value_parallel_adapter_down_dim": 96,
    "use_decoder_self_attn_value_parallel_adapter_down_dim": False,
    "decoder_self_attn_value_parallel_adapter_down_dim": 96,
}
PARAM_DEFAULTS.update(VLPET_DEFAULTS)
VLPET_ONLY = set(VLPET_DEFAULTS)
# Options the T5 code accepts but cannot run (see KEYS_T5.md "Not supported").
UNSUPPORTED = ("use_lradapter", "use_lm_head_adapter", "decoder_prompt_len", "no_vis", "oneddownsample",
               "sparse_sample")
# Adapter-config class attributes with no CLI flag (adapters/config.py MetaAdapterConfig), overridable here.
CONFIG_CLASS_DEFAULTS = {"task_embedding_dim": 512, "task_hidden_dim": 128}
# Options that only touch requires_grad, initial values or the data: accepted and ignored.
NON_STRUCTURAL = {
    "repo", "unfreeze_layer_norms", "unfreeze_encoder_layer_norms", "unfreeze_decoder_layer_norms",
    "unfreeze_language_model", "unfreeze_lm_head", "unfreeze_bias", "use_tasks_prompts", "freeze_vis_emb",
    "use_encoder_multihead_up_zero_init", "use_encoder_gating_large_x_lowrank_up_zero_init",
    "use_decoder_enc_vpa_up_zero_init", "use_encoder_gating_small_up_zero_init",
    "use_encoder_gating_middle_up_zero_init", "use_encoder_gating_middle_ia3_zero_init",
    "use_encoder_gating_middle_ia3_one_init", "track_z", "dropout", "tasks",
}


def gelu_new(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # transformers ACT2FN["gelu_new"]


def _make_config(hf_config: dict, method: dict, tasks: list[str]) -> SimpleNamespace:
    """Follows trainer_base.py create_config: args copied onto the T5 config, then adapter_config built."""
    unknown = set(method) - set(PARAM_DEFAULTS) - NON_STRUCTURAL - set(CONFIG_CLASS_DEFAULTS)
    if unknown:
        raise KeyError(f"options unknown here (not T5-structural in the seed): {sorted(unknown)}")
    repo = method.get("repo", "vl-pet")
    if repo not in ("vl-adapter", "vl-pet"):
        raise ValueError(f"repo must be 'vl-adapter' or 'vl-pet', not {repo!r}")
    o = {**PARAM_DEFAULTS, **{k: v for k, v in method.items() if k in PARAM_DEFAULTS}}
    changed = {k for k in PARAM_DEFAULTS if o[k] != PARAM_DEFAULTS[k]}
    if repo == "vl-adapter" and changed & VLPET_ONLY:
        raise ValueError(f"VL_adapter has no such options: {sorted(changed & VLPET_ONLY)}")
    if changed & set(UNSUPPORTED):
        raise NotImplementedError(f"not supported (see KEYS_T5.md): {sorted(changed & set(UNSUPPORTED))}")
    if not hf_config.get("tie_word_embeddings", True):
        raise ValueError("VLT5.forward asserts config.tie_word_embeddings (t5-base has it)")
    if o["use_hyperformer"] + o["use_adapter"] + o["use_compacter"] > 1:
        raise ValueError("You can only at most one kind of adapters.")  # trainer_base.py assertion
    c = SimpleNamespace(**hf_config, **o)
    c.num_decoder_layers = hf_config.get("num_decoder_layers", hf_config["num_layers"])
    c.feed_forward_proj = hf_config.get("feed_forward_proj", "relu")
    c.layer_norm_epsilon = hf_config.get("layer_norm_epsilon", 1e-6)
    c.repo, c.tasks, c.n_images = repo, list(tasks), 2
    c.feat_dim, c.pos_dim = int(o["feat_dim"]), int(o["pos_dim"])
    vpa = o["use_decoder_enc_attn_value_parallel_adapter_down_dim"] or \
        o["use_decoder_self_attn_value_parallel_adapter_down_dim"]
    c.adapter_config = None
    if o["use_hyperformer"] or o["use_adapter"] or o["use_compacter"] or vpa:
        a = SimpleNamespace(  # adapters/config.py class attributes (Adapter-, Compactor-, MetaAdapterConfig)
            non_linearity="gelu_new", hypercomplex_adapters=bool(o["use_compacter"]), learn_phm=True,
            hypercomplex_nonlinearity="glorot-uniform", shared_W_phm=False, factorized_phm_rule=False,
            phm_c_init="normal", kronecker_prod=False, low_rank_adapters=False, hidden_dim=128,
            train_task_adapters=bool(o["use_compacter"]), train_task_embeddings=False,
            projected_task_embedding_dim=64, unique_hyper_net_layer_norm=True, task_to_embeddings=None,
            **{k: method.get(k, v) for k, v in CONFIG_CLASS_DEFAULTS.items()})
        for k in ("unique_hyper_net", "efficient_unique_hyper_net", "use_single_adapter",
                  "hypercomplex_division", "phm_rank", "shared_phm_rule", "factorized_phm", "phm_init_range",
                  "share_down_sampler", "share_up_sampler", "reduction_factor", "shared_phm_rule_over_tasks",
                  "add_layer_norm_before_adapter", "add_layer_norm_after_adapter",
                  "use_adapter_down_dim", "adapter_down_dim"):
            setattr(a, k, o[k])
        a.tasks, a.input_dim, a.d_model = list(tasks), c.d_model, c.d_model
        if o["projected_task_embedding_dim"] != -1:
            a.projected_task_embedding_dim = o["projected_task_embedding_dim"]
        a.use_parallel_adapter, a.use_scaling_factor, a.scaling_factor = False, False, 1.0
        c.adapter_config = a
    # VL-PET my_transformers/modeling_t5.py T5LayerSelfAttention / T5LayerCrossAttention: the value-parallel
    # adapters use a deep copy of adapter_config with their own down dim and use_parallel_adapter=True.
    c.enc_vpa_config = c.self_vpa_config = None
    for flag, dim, attr in (("use_decoder_enc_attn_value_parallel_adapter_down_dim",
                             "decoder_enc_attn_value_parallel_adapter_down_dim", "enc_vpa_config"),
                            ("use_decoder_self_attn_value_parallel_adapter_down_dim",
                             "decoder_self_attn_value_parallel_adapter_down_dim", "self_vpa_config")):
        if o[flag]:
            v = SimpleNamespace(**vars(c.adapter_config))
            v.use_adapter_down_dim, v.adapter_down_dim, v.use_parallel_adapter = True, o[dim], True
            setattr(c, attr, v)
    if o["encoder_prompt_len"] > 0:  # prompt/config.py EncoderPromptConfig (input_dim: see KEYS_T5.md)
        c.encoder_prompt_config = SimpleNamespace(
            prompt_len=o["encoder_prompt_len"], tasks=list(tasks), use_single_prompt=o["use_single_prompt"],
            mid_dim=o["mid_dim"], input_dim=c.d_model, use_input_prompt=True)
    else:
        c.encoder_prompt_config = None
    return c


# ----------------------------------------------------------------------------------------------------------
# T5 building blocks: my_transformers/modeling_t5.py
# ----------------------------------------------------------------------------------------------------------
class T5LayerNorm(nn.Module):
    # follows my_transformers/modeling_t5.py T5LayerNorm: RMS norm, no mean, no bias, variance in float32
    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x):
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class T5DenseReluDense(nn.Module):
    # follows my_transformers/modeling_t5.py T5DenseReluDense (and T5DenseGatedGeluDense for 'gated-gelu')
    def __init__(self, c):
        super().__init__()
        self.gated = c.feed_forward_proj == "gated-gelu"
        if self.gated:
            self.wi_0 = nn.Linear(c.d_model, c.d_ff, bias=False)
            self.wi_1 = nn.Linear(c.d_model, c.d_ff, bias=False)
        else:
            self.wi = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.wo = nn.Linear(c.d_ff, c.d_model, bias=False)

    def forward(self, x):
        if self.gated:
            return self.wo(gelu_new(self.wi_0(x)) * self.wi_1(x))
        return self.wo(F.relu(self.wi(x)))


# ----------------------------------------------------------------------------------------------------------
# Adapters: adapters/adapter_modeling.py, adapters/hypercomplex/layers.py, adapters/adapter_controller.py
# ----------------------------------------------------------------------------------------------------------
def _down_size(a) -> int:
    # VL-PET adapter_modeling.py: adapter_down_dim if use_adapter_down_dim, else input_dim // reduction_factor
    return a.adapter_down_dim if a.use_adapter_down_dim else a.d_model // a.reduction_factor


class Adapter(nn.Module):
    # follows adapters/adapter_modeling.py Adapter: down -> gelu_new -> up (biases on both)
    def __init__(self, a):
        super().__init__()
        r = _down_size(a)
        self.down_sampler = nn.Linear(a.d_model, r)
        self.up_sampler = nn.Linear(r, a.d_model)

    def forward(self, x):
        return self.up_sampler(gelu_new(self.down_sampler(x)))


class PHMLinear(nn.Module):
    # follows adapters/hypercomplex/layers.py PHMLinear: y = x @ sum_i kron(phm_rule[i], W[i]) + b
    def __init__(self, in_features: int, out_features: int, a):
        super().__init__()
        n = a.hypercomplex_division
        assert in_features % n == 0 and out_features % n == 0
        self.phm_dim, self.factorized_phm = n, a.factorized_phm
        if not a.shared_phm_rule:  # otherwise VLT5.set_phm_rule registers the model-level phm_rule here
            self.phm_rule = nn.Parameter(torch.zeros(n, n, n))
        if a.factorized_phm:
            self.W_left = nn.Parameter(torch.zeros(n, in_features // n, a.phm_rank))
            self.W_right = nn.Parameter(torch.zeros(n, a.phm_rank, out_features // n))
        else:
            self.W = nn.Parameter(torch.zeros(n, in_features // n, out_features // n))
        self.b = nn.Parameter(torch.zeros(out_features))

    def forward(self, x):
        W = torch.bmm(self.W_left, self.W_right) if self.factorized_phm else self.W
        rule = self.phm_rule
        # kronecker.py kronecker_product_einsum_batched, then .sum(0); weight layout is (in, out)
        H = torch.einsum("bac,bkp->bakcp", rule, W).reshape(rule.size(0), rule.size(1) * W.size(1),
                                                            rule.size(2) * W.size(2)).sum(0)
        return torch.matmul(x, H) + self.b


class HyperComplexAdapter(nn.Module):
    # follows adapters/adapter_modeling.py HyperComplexAdapter (Compacter)
    def __init__(self, a):
        super().__init__()
        r = _down_size(a)
        self.down_sampler = PHMLinear(a.input_dim, r, a)
        self.up_sampler = PHMLinear(r, a.input_dim, a)

    def forward(self, x):
        return self.up_sampler(gelu_new(self.down_sampler(x)))


class AdapterController(nn.Module):
    # follows adapters/adapter_controller.py AdapterController (VL-PET version: y= for parallel adapters)
    def __init__(self, a):
        super().__init__()
        self.config = a
        self.adapters = nn.ModuleDict()
        make = HyperComplexAdapter if a.hypercomplex_adapters else Adapter
        if a.use_single_adapter:  # one module, registered under every task name
            shared = make(a)
            for task in a.tasks:
                self.adapters[task] = shared
        else:
            for task in a.tasks:
                self.adapters[task] = make(a)
            first = self.adapters[a.tasks[0]]
            for task in a.tasks:
                if a.share_up_sampler:
                    self.adapters[task].up_sampler = first.up_sampler
                if a.share_down_sampler:
                    self.adapters[task].down_sampler = first.down_sampler
                if a.hypercomplex_adapters and a.shared_phm_rule_over_tasks and not a.shared_phm_rule:
                    self.adapters[task].up_sampler.phm_rule = first.up_sampler.phm_rule
                    self.adapters[task].down_sampler.phm_rule = first.down_sampler.phm_rule
        if a.add_layer_norm_before_adapter:
            self.pre_layer_norm = nn.LayerNorm(a.input_dim)
        if a.add_layer_norm_after_adapter:
            self.post_layer_norm = nn.LayerNorm(a.input_dim)

    def forward(self, inputs, task, y=None):
        a = self.config
        z = self.pre_layer_norm(inputs) if a.add_layer_norm_before_adapter else inputs
        outputs = self.adapters[task](z)
        if a.use_scaling_factor:
            outputs = a.scaling_factor * outputs
        if a.add_layer_norm_after_adapter:
            outputs = self.post_layer_norm(outputs)
        return outputs + (y if a.use_parallel_adapter else inputs)


# ----------------------------------------------------------------------------------------------------------
# Hyperformer: adapters/adapter_utils.py, adapters/adapter_hypernetwork.py, adapter_controller.py
# ----------------------------------------------------------------------------------------------------------
class TaskEmbeddingController(nn.Module):
    # follows adapters/adapter_utils.py TaskEmbeddingController (train_task_embeddings False: raw embedding)
    def __init__(self, a):
        super().__init__()
        self.task_to_embeddings = nn.ParameterDict()  # filled in task order (a dict would be sorted)
        for t in a.tasks:
            self.task_to_embeddings[t] = nn.Parameter(torch.zeros(a.task_embedding_dim))

    def forward(self, task):
        return self.task_to_embeddings[task]


class TaskHyperNet(nn.Module):
    # follows adapters/adapter_utils.py TaskHyperNet: Linear -> ReLU -> Linear
    def __init__(self, a, input_dim: int):
        super().__init__()
        self.task_embeding_generator = nn.Sequential(  # sic: the seed's spelling
            nn.Linear(input_dim, a.task_hidden_dim), nn.ReLU(),
            nn.Linear(a.task_hidden_dim, a.projected_task_embedding_dim))

    def forward(self, e):
        return self.task_embeding_generator(e.view(-1)).view(-1)


class LayerNormHyperNet(nn.Module):
    # follows adapters/adapter_utils.py LayerNormHyperNet (input: projected task embedding)
    def __init__(self, a):
        super().__init__()
        self.weight_generator = nn.Linear(a.projected_task_embedding_dim, a.input_dim)
        self.bias_generator = nn.Linear(a.projected_task_embedding_dim, a.input_dim)

    def forward(self, e):
        return SimpleNamespace(weight=self.weight_generator(e), bias=self.bias_generator(e))


class AdapterLayersHyperNet(nn.Module):
    # follows adapter_hypernetwork.py AdapterLayersHyperNet: weight viewed (input_dim, output_dim),
    # bias of size input_dim; "up" is built with (d, r) and "down" with (r, d), used as F.linear weights.
    def __init__(self, a, input_dim: int, output_dim: int):
        super().__init__()
        self.input_dim, self.output_dim = input_dim, output_dim
        e = a.projected_task_embedding_dim
        self.weight_generator = nn.Sequential(nn.Linear(e, input_dim * output_dim))
        self.bias_generator = nn.Sequential(nn.Linear(e, input_dim))

    def forward(self, e):
        return SimpleNamespace(weight=self.weight_generator(e).view(self.input_dim, self.output_dim),
                               bias=self.bias_generator(e).view(-1))


class AdapterLayersHyperNetController(nn.Module):
    # follows adapter_hypernetwork.py AdapterLayersHyperNetController (--unique_hyper_net)
    SITES = ("feed_forward", "self_attention", "cross_attention")

    def __init__(self, a, num_layers: int, include_cross_attention: bool):
        super().__init__()
        self.a, self.include_cross_attention = a, include_cross_attention
        self.layer_id_embeddings = nn.Embedding(num_layers, a.task_embedding_dim)
        self.task_hypernet = TaskHyperNet(a, a.task_embedding_dim * 2)
        if a.unique_hyper_net_layer_norm:
            self.LayerNorm = nn.LayerNorm(a.projected_task_embedding_dim, eps=1e-6)
        d, r = a.input_dim, a.input_dim // a.reduction_factor
        for site in self.SITES[:3 if include_cross_attention else 2]:
            setattr(self, f"{site}_up_sampler_hyper_net", AdapterLayersHyperNet(a, d, r))
            setattr(self, f"{site}_down_sampler_hyper_net", AdapterLayersHyperNet(a, r, d))
        for when in ("pre", "post"):  # the cross-attention ones are built in the encoder too (unused there)
            if getattr(a, f"add_layer_norm_{'before' if when == 'pre' else 'after'}_adapter"):
                for site in self.SITES:
                    setattr(self, f"{site}_{when}_layernorm_hypernet", LayerNormHyperNet(a))

    def embed(self, task_embedding, layer_id, block_type=None):
        layer = self.layer_id_embeddings(torch.tensor([layer_id], device=task_embedding.device)).view(-1)
        e = self.task_hypernet(torch.cat([task_embedding.view(1, -1), layer.view(1, -1)], 0).view(-1))
        return self.LayerNorm(e) if self.a.unique_hyper_net_layer_norm else e

    def forward(self, task_embedding, layer_id):
        e = self.embed(task_embedding, layer_id)
        out = {}
        for site in self.SITES:
            if site == "cross_attention" and not self.include_cross_attention:
                out[site] = None
                continue
            w = SimpleNamespace(down=getattr(self, f"{site}_down_sampler_hyper_net")(e),
                                up=getattr(self, f"{site}_up_sampler_hyper_net")(e))
            for when in ("pre", "post"):
                if hasattr(self, f"{site}_{when}_layernorm_hypernet"):
                    setattr(w, f"{when}_norm", getattr(self, f"{site}_{when}_layernorm_hypernet")(e))
            out[site] = w
        return SimpleNamespace(**out)


class AdapterLayersOneHyperNetController(nn.Module):
    # follows adapter_hypernetwork.py AdapterLayersOneHyperNetController (--efficient_unique_hyper_net)
    def __init__(self, a, num_layers: int, include_cross_attention: bool):
        super().__init__()
        self.a, self.include_cross_attention = a, include_cross_attention
        self.layer_id_embeddings = nn.Embedding(num_layers, a.task_embedding_dim)
        self.adapters_block_type = nn.Embedding(3, a.task_embedding_dim)
        self.task_hypernet = TaskHyperNet(a, a.task_embedding_dim * 3)
        if a.unique_hyper_net_layer_norm:
            self.LayerNorm = nn.LayerNorm(a.projected_task_embedding_dim, eps=1e-6)
        d, r = a.input_dim, a.input_dim // a.reduction_factor
        self.up_sampler_hyper_net = AdapterLayersHyperNet(a, d, r)
        self.down_sampler_hyper_net = AdapterLayersHyperNet(a, r, d)
        if a.add_layer_norm_before_adapter:
            self.pre_layernorm_hypernet = LayerNormHyperNet(a)
        if a.add_layer_norm_after_adapter:
            self.post_layernorm_hypernet = LayerNormHyperNet(a)

    def forward(self, task_embedding, layer_id):
        dev = task_embedding.device
        out = {"cross_attention": None}
        for block_type, site in enumerate(AdapterLayersHyperNetController.SITES):
            if site == "cross_attention" and not self.include_cross_attention:
                continue
            layer = self.layer_id_embeddings(torch.tensor([layer_id], device=dev)).view(-1)
            kind = self.adapters_block_type(torch.tensor([block_type], device=dev)).view(-1)
            e = torch.cat([task_embedding.view(1, -1), layer.view(1, -1), kind.view(1, -1)], 0).view(-1)
            e = self.task_hypernet(e)
            e = self.LayerNorm(e) if self.a.unique_hyper_net_layer_norm else e
            w = SimpleNamespace(down=self.down_sampler_hyper_net(e), up=self.up_sampler_hyper_net(e))
            if self.a.add_layer_norm_before_adapter:
                w.pre_norm = self.pre_layernorm_hypernet(e)
            if self.a.add_layer_norm_after_adapter:
                w.post_norm = self.post_layernorm_hypernet(e)
            out[site] = w
        return SimpleNamespace(**out)


class MetaLayersAdapterController(nn.Module):
    # follows adapter_controller.py MetaLayersAdapterController: applies generated weights (no parameters)
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, inputs, w):
        a = self.a
        ln = (lambda x, n: F.layer_norm(x, (a.input_dim,), weight=n.weight, bias=n.bias))  # eps 1e-5
        z = ln(inputs, w.pre_norm) if a.add_layer_norm_before_adapter else inputs
        out = F.linear(gelu_new(F.linear(z, w.down.weight, w.down.bias)), w.up.weight, w.up.bias)
        if a.add_layer_norm_after_adapter:
            out = ln(out, w.post_norm)
        return out + inputs


# ----------------------------------------------------------------------------------------------------------
# Prompt tuning: prompt/prompt_modeling.py, prompt/prompt_controller.py
# ----------------------------------------------------------------------------------------------------------
class InputPrompts(nn.Module):
    # follows prompt/prompt_modeling.py InputPrompts: Embedding -> Linear -> Tanh -> Linear
    def __init__(self, p):
        super().__init__()
        self.prompt_len = p.prompt_len
        self.prefix_embedding = nn.Sequential(nn.Embedding(p.prompt_len, p.input_dim),
                                              nn.Linear(p.input_dim, p.mid_dim), nn.Tanh(),
                                              nn.Linear(p.mid_dim, p.input_dim))

    def forward(self, bsz, device):
        tokens = torch.arange(self.prompt_len, device=device).unsqueeze(0).expand(bsz, -1)
        return self.prefix_embedding(tokens)


class PromptController(nn.Module):
    # follows prompt/prompt_controller.py PromptController (single prompt: one module under every task)
    def __init__(self, p):
        super().__init__()
        self.prompts = nn.ModuleDict()
        shared = InputPrompts(p) if p.use_single_prompt else None
        for task in p.tasks:
            self.prompts[task] = shared if shared is not None else InputPrompts(p)

    def forward(self, bsz, device, task):
        return self.prompts[task](bsz, device)


# ----------------------------------------------------------------------------------------------------------
# Attention and layers: my_transformers/modeling_t5.py
# ----------------------------------------------------------------------------------------------------------
def _relative_position_bucket(rel, bidirectional: bool, num_buckets: int, max_distance: int = 128):
    # follows T5Attention._relative_position_bucket
    buckets = 0
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).to(torch.long) * num_buckets
        rel = torch.abs(rel)
    else:
        rel = -torch.min(rel, torch.zeros_like(rel))
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # clamp(min=1) only keeps log() finite where the small branch is taken anyway
    large = max_exact + (torch.log(rel.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).to(torch.long)
    large = torch.min(large, torch.full_like(large, num_buckets - 1))
    return buckets + torch.where(is_small, rel, large)


class T5Attention(nn.Module):
    # follows VL-PET my_transformers/modeling_t5.py T5Attention (project_vpa: value-parallel adapter)
    def __init__(self, c, is_decoder: bool, has_relative_attention_bias: bool = False, vpa_config=None):
        super().__init__()
        self.is_decoder, self.n_heads, self.d_kv = is_decoder, c.num_heads, c.d_kv
        self.num_buckets = c.relative_attention_num_buckets
        inner = c.num_heads * c.d_kv
        self.q = nn.Linear(c.d_model, inner, bias=False)
        self.k = nn.Linear(c.d_model, inner, bias=False)
        self.v = nn.Linear(c.d_model, inner, bias=False)
        self.o = nn.Linear(inner, c.d_model, bias=False)
        self.attn_value_parallel_adapter = AdapterController(vpa_config) if vpa_config is not None else None
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.num_buckets, c.num_heads)

    def compute_bias(self, q_len: int, k_len: int):
        rel = torch.arange(k_len)[None, :] - torch.arange(q_len)[:, None]
        bucket = _relative_position_bucket(rel, not self.is_decoder, self.num_buckets)
        values = self.relative_attention_bias(bucket.to(self.relative_attention_bias.weight.device))
        return values.permute([2, 0, 1]).unsqueeze(0)  # (1, H, q, k)

    def forward(self, hidden_states, position_bias, key_value_states=None, task=None):
        B = hidden_states.size(0)

        def shape(s):
            return s.view(B, -1, self.n_heads, self.d_kv).transpose(1, 2)

        src = hidden_states if key_value_states is None else key_value_states
        q, k = shape(self.q(hidden_states)), shape(self.k(src))
        v = self.v(src)
        # project_vpa: the adapter runs only on cross-attention values (self-attention never calls it)
        if key_value_states is not None and self.attn_value_parallel_adapter is not None:
            v = self.attn_value_parallel_adapter(key_value_states, task, y=v)
        v = shape(v)
        scores = torch.matmul(q, k.transpose(3, 2)) + position_bias  # no 1/sqrt(d) in T5
        weights = F.softmax(scores.float(), dim=-1).type_as(scores)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous().view(B, -1, self.n_heads * self.d_kv)
        return self.o(out)


def _uses_adapter_controller(c, is_decoder: bool) -> bool:
    # VL-PET: `(use_adapter or use_compacter or use_lradapter) and not no_{encoder,decoder}_adapter`
    off = c.no_decoder_adapter if is_decoder else c.no_encoder_adapter
    return bool((c.use_adapter or c.use_compacter) and not off)


class _EncoderPET:
    """VL-PET encoder modules shared by T5LayerSelfAttention (part 'attn') and T5LayerFF (part 'ff')."""

    def _build_pet(self, c, part: str):
        # follows VL-PET my_transformers/modeling_t5.py T5LayerSelfAttention/T5LayerFF __init__ (encoder)
        d, self._part, self._c = c.d_model, part, c
        if c.use_encoder_adapter_down_multihead:
            n_h = c.encoder_adapter_multihead_num_head
            setattr(self, f"{part}_adapter_multihead_down",
                    nn.ModuleList(nn.Linear(d, int(c.adapter_down_dim / n_h)) for _ in range(n_h)))
            setattr(self, f"{part}_adapter_multihead_up", nn.Linear(c.adapter_down_dim, d))
        g = f"encoder_{part}_adapter_gating_"
        if c.use_encoder_adapter_gating_large_x_lowrank:
            setattr(self, g + "large_x_down", nn.Linear(d, c.adapter_gating_down_dim))
            setattr(self, g + "large_x_up", nn.Linear(c.adapter_gating_down_dim, d))
        if c.use_encoder_adapter_gating_small_xy_cat:
            setattr(self, g + "small_xy_cat", nn.Linear(2 * d, 1))
        if c.use_encoder_adapter_gating_middle_xy_add:
            setattr(self, g + "middle_xy_add", nn.Linear(d, 1))
        if c.use_encoder_adapter_gating_middle_ia3_add:
            setattr(self, g + "middle_ia3_add", nn.Parameter(torch.zeros(d)))

    def _multihead(self, y):
        # the `elif ... use_encoder_adapter_down_multihead` branch: heads of down, concat, gelu_new, up
        c, p = self._c, self._part
        down = torch.cat([m(y) for m in getattr(self, f"{p}_adapter_multihead_down")], dim=-1)
        up = getattr(self, f"{p}_adapter_multihead_up")(gelu_new(down))
        if c.use_encoder_adapter_scaling:
            up = up * c.encoder_adapter_scaling_factor
        if c.use_encoder_x2_scaling:
            y = y * c.encoder_x2_scaling_factor
        return y + up

    def _gate(self, x, y):
        # gates read x = the sublayer input (un-normalized residual stream), then the gating scaling
        c, g = self._c, f"encoder_{self._part}_adapter_gating_"
        if c.use_encoder_adapter_gating_large_x_lowrank:
            gate = getattr(self, g + "large_x_up")(gelu_new(getattr(self, g + "large_x_down")(x)))
            y = y * torch.sigmoid(gate)
        elif c.use_encoder_adapter_gating_small_xy_cat:
            gate = torch.sigmoid(getattr(self, g + "small_xy_cat")(torch.cat([x, y], dim=2)))
            y = y * torch.mean(gate, dim=1).unsqueeze(-1)  # mean over ALL positions (pads, prompt, vision)
        elif c.use_encoder_adapter_gating_middle_xy_add:
            y = y * torch.sigmoid(getattr(self, g + "middle_xy_add")(x + y))
        elif c.use_encoder_adapter_gating_middle_ia3_add:
            y = y + y * getattr(self, g + "middle_ia3_add")
        if c.use_encoder_gating_scaling:
            y = y * c.encoder_gating_scaling_factor
        return y


class T5LayerSelfAttention(nn.Module, _EncoderPET):
    # follows VL-PET my_transformers/modeling_t5.py T5LayerSelfAttention
    def __init__(self, c, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.is_decoder = is_decoder
        self.SelfAttention = T5Attention(c, is_decoder, has_relative_attention_bias, c.self_vpa_config)
        self.layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_epsilon)
        use = _uses_adapter_controller(c, is_decoder)
        self.attn_adapter = AdapterController(c.adapter_config) if use else None
        self.pet = not is_decoder and c.repo == "vl-pet"
        if self.pet:
            self._build_pet(c, "attn")
        self.adapter_hypernet = MetaLayersAdapterController(c.adapter_config) if c.use_hyperformer else None

    def forward(self, x, position_bias, block_adapters=None, task=None):
        y = self.SelfAttention(self.layer_norm(x), position_bias)
        if self.attn_adapter is not None:
            y = self.attn_adapter(y, task)
        elif self.pet and self._c.use_encoder_adapter_down_multihead:
            y = self._multihead(y)
        if self.adapter_hypernet is not None:
            y = self.adapter_hypernet(y, block_adapters.self_attention)
        if self.pet:
            y = self._gate(x, y)
        return x + y


class T5LayerCrossAttention(nn.Module):
    # follows VL-PET my_transformers/modeling_t5.py T5LayerCrossAttention
    def __init__(self, c):
        super().__init__()
        self.EncDecAttention = T5Attention(c, True, False, c.enc_vpa_config)
        self.layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_epsilon)
        use = _uses_adapter_controller(c, True) and c.add_adapter_cross_attn
        self.enc_attn_adapter = AdapterController(c.adapter_config) if use else None
        use_hyper = c.use_hyperformer and c.add_adapter_cross_attn
        self.adapter_hypernet = MetaLayersAdapterController(c.adapter_config) if use_hyper else None

    def forward(self, x, enc, position_bias, block_adapters=None, task=None):
        y = self.EncDecAttention(self.layer_norm(x), position_bias, key_value_states=enc, task=task)
        if self.enc_attn_adapter is not None:
            y = self.enc_attn_adapter(y, task)
        if self.adapter_hypernet is not None:
            y = self.adapter_hypernet(y, block_adapters.cross_attention)
        return x + y


class T5LayerFF(nn.Module, _EncoderPET):
    # follows VL-PET my_transformers/modeling_t5.py T5LayerFF
    def __init__(self, c, is_decoder: bool):
        super().__init__()
        self.DenseReluDense = T5DenseReluDense(c)
        self.layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_epsilon)
        use = _uses_adapter_controller(c, is_decoder)
        self.ff_adapter = AdapterController(c.adapter_config) if use else None
        self.pet = not is_decoder and c.repo == "vl-pet"
        if self.pet:
            self._build_pet(c, "ff")
        self.adapter_hypernet = MetaLayersAdapterController(c.adapter_config) if c.use_hyperformer else None

    def forward(self, x, block_adapters=None, task=None):
        y = self.DenseReluDense(self.layer_norm(x))
        if self.ff_adapter is not None:
            y = self.ff_adapter(y, task)
        elif self.pet and self._c.use_encoder_adapter_down_multihead:
            y = self._multihead(y)
        if self.adapter_hypernet is not None:
            y = self.adapter_hypernet(y, block_adapters.feed_forward)
        if self.pet:
            y = self._gate(x, y)
        return x + y


class T5Block(nn.Module):
    # follows my_transformers/modeling_t5.py T5Block: layer.0 self-attn, [layer.1 cross-attn], layer.-1 FF
    def __init__(self, c, is_decoder: bool, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(c, is_decoder, has_relative_attention_bias)])
        if is_decoder:
            self.layer.append(T5LayerCrossAttention(c))
        self.layer.append(T5LayerFF(c, is_decoder))

    def forward(self, x, position_bias, enc=None, enc_bias=None, block_adapters=None, task=None):
        x = self.layer[0](x, position_bias, block_adapters, task)
        if enc is not None:
            x = self.layer[1](x, enc, enc_bias, block_adapters, task)
        return self.layer[-1](x, block_adapters, task)


class T5Stack(nn.Module):
    # follows my_transformers/modeling_t5.py T5Stack (used as the decoder; JointEncoder extends it)
    def __init__(self, c, is_decoder: bool, embed_tokens, task_embed=None):
        super().__init__()
        self.is_decoder, self.c = is_decoder, c
        self.embed_tokens = embed_tokens
        self.task_embed = task_embed
        n_layers = c.num_decoder_layers if is_decoder else c.num_layers
        self.adapter_layers_hyper_net = None
        if c.use_hyperformer:
            a = c.adapter_config
            if a.unique_hyper_net:
                self.adapter_layers_hyper_net = AdapterLayersHyperNetController(a, n_layers, is_decoder)
            if a.efficient_unique_hyper_net:
                self.adapter_layers_hyper_net = AdapterLayersOneHyperNetController(a, n_layers, is_decoder)
            assert self.adapter_layers_hyper_net is not None, "hyperformer needs --unique_hyper_net"
        self.block = nn.ModuleList(T5Block(c, is_decoder, i == 0) for i in range(n_layers))
        self.final_layer_norm = T5LayerNorm(c.d_model, eps=c.layer_norm_epsilon)

    def run_blocks(self, x, position_bias, enc=None, enc_bias=None, task=None):
        task_embedding = self.task_embed(task) if task is not None and self.task_embed is not None else None
        for i, block in enumerate(self.block):
            hyper = self.adapter_layers_hyper_net
            x = block(x, position_bias, enc, enc_bias, hyper(task_embedding, i) if hyper else None, task)
        return self.final_layer_norm(x)

    def forward(self, input_ids, encoder_hidden_states, encoder_attention_mask, task=None):
        x = self.embed_tokens(input_ids)
        B, L = input_ids.shape
        # decoder_attention_mask is None in the seed: only the causal mask (4.2.1 get_extended_attention_mask)
        ids = torch.arange(L, device=x.device)
        causal = (ids[None, None, :].repeat(B, L, 1) <= ids[None, :, None]).to(x.dtype)
        ext = (1.0 - causal[:, None, :, :] * torch.ones(B, 1, 1, L, device=x.device)) * MASK_VALUE
        position_bias = self.block[0].layer[0].SelfAttention.compute_bias(L, L) + ext  # first block's bias
        enc_ext = (1.0 - encoder_attention_mask[:, None, None, :].to(x.dtype)) * ENC_MASK_VALUE
        zeros = torch.zeros(1, self.c.num_heads, L, encoder_hidden_states.size(1), device=x.device)
        enc_bias = zeros + enc_ext  # cross-attention has no relative bias
        return self.run_blocks(x, position_bias, encoder_hidden_states, enc_bias, task)


# ----------------------------------------------------------------------------------------------------------
# VL-T5: modeling_t5.py
# ----------------------------------------------------------------------------------------------------------
class VisualEmbedding(nn.Module):
    # follows modeling_t5.py VisualEmbedding
    def __init__(self, c, obj_order_embedding):
        super().__init__()
        self.c = c
        d, ind, ln = c.d_model, c.individual_vis_layer_norm, c.use_vis_layer_norm
        def norm():
            return [T5LayerNorm(d, c.layer_norm_epsilon)] if ind and ln else []

        feat = [nn.Linear(c.feat_dim, d)] + norm()
        for _ in range(c.additional_visual_embedding_layers):
            feat += [nn.Linear(d, d), nn.ReLU(True)] + norm()
        self.feat_embedding = nn.Sequential(*feat)
        pos = [nn.Linear(c.pos_dim + 1, d)] + norm()
        self.absolute_vis_pos_embedding = nn.Sequential(*pos)
        # the shared token embedding; registered even without use_vis_order_embedding because
        # resize_token_embeddings -> JointEncoder.set_input_embeddings assigns it unconditionally
        self.obj_order_embedding = obj_order_embedding
        if c.use_vis_order_embedding:
            self.img_order_embedding = nn.Embedding(c.n_images, d)
        if not ind and ln:
            self.layer_norm = T5LayerNorm(d, eps=c.layer_norm_epsilon)

    def forward(self, feats, pos, img_order_ids=None, obj_order_ids=None):
        B, N, _ = feats.size()
        feat_embedding = self.feat_embedding(feats)
        # boxes are read as (x1, x2, y1, y2): area = (y2 - y1) * (x2 - x1)
        area = ((pos[:, :, 3] - pos[:, :, 2]) * (pos[:, :, 1] - pos[:, :, 0])).unsqueeze(2)
        pos_embedding = self.absolute_vis_pos_embedding(torch.cat([pos, area], dim=2))
        if self.c.use_vis_order_embedding:
            if img_order_ids is None:
                img_order_ids = torch.zeros(N, dtype=torch.long, device=feats.device).unsqueeze(0)
            if obj_order_ids is None:
                obj_order_ids = torch.arange(N, dtype=torch.long, device=feats.device).unsqueeze(0)
            obj_order_ids = self.obj_order_embedding.num_embeddings - obj_order_ids - 1  # rows from the end
            vis = feat_embedding + pos_embedding + self.img_order_embedding(img_order_ids) + \
                self.obj_order_embedding(obj_order_ids)
        else:
            vis = feat_embedding + pos_embedding
        if not self.c.individual_vis_layer_norm and self.c.use_vis_layer_norm:
            vis = self.layer_norm(vis)
        return vis


class JointEncoder(T5Stack):
    # follows modeling_t5.py JointEncoder (the `downsample` pooling has no parameters: not reproduced)
    def __init__(self, c, embed_tokens, task_embed=None):
        super().__init__(c, False, embed_tokens, task_embed)
        self.visual_embedding = VisualEmbedding(c, embed_tokens)
        self.prompt_modules = PromptController(c.encoder_prompt_config) if c.encoder_prompt_config else None

    def forward(self, input_ids, vis_inputs, task=None):
        inputs_embeds = self.embed_tokens(input_ids)
        if self.prompt_modules is not None:
            prefix = self.prompt_modules(inputs_embeds.shape[0], inputs_embeds.device, task)
            inputs_embeds = torch.cat([prefix, inputs_embeds], dim=1)
        B, L = inputs_embeds.size()[:-1]
        vis_embeds = self.visual_embedding(*vis_inputs)
        V_L = vis_embeds.size(1)
        x = torch.cat([inputs_embeds, vis_embeds], dim=1)
        mask = input_ids.ne(PAD_ID).to(dtype=x.dtype)
        vis_mask = mask.new_ones(B, V_L)
        if self.prompt_modules is not None:
            mask = torch.cat([torch.ones(B, prefix.shape[1], dtype=x.dtype, device=x.device), mask], dim=1)
        mask = torch.cat([mask, vis_mask], dim=1)
        ext = (1.0 - mask[:, None, None, :]) * MASK_VALUE
        # relative position bias only on the text(+prompt) block; none to/from/among visual tokens
        text_bias = self.block[0].layer[0].SelfAttention.compute_bias(L, L)
        position_bias = text_bias.new_zeros(1, text_bias.size(1), L + V_L, L + V_L)
        position_bias[:, :, :L, :L] = text_bias
        return self.run_blocks(x, position_bias + ext, task=task)


class VLT5(nn.Module):
    # follows modeling_t5.py VLT5 (+ my_transformers T5ForConditionalGeneration for shared_task_embed)
    def __init__(self, c):
        super().__init__()
        self.config, self.model_dim = c, c.d_model
        self.shared = nn.Embedding(c.vocab_size, c.d_model)
        self.shared_task_embed = TaskEmbeddingController(c.adapter_config) if c.use_hyperformer else None
        self.encoder = JointEncoder(c, self.shared, self.shared_task_embed)
        self.decoder = T5Stack(c, True, self.shared, self.shared_task_embed)
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.lm_head.weight = self.shared.weight  # tie_word_embeddings (t5-base), re-tied after resizing
        a = c.adapter_config
        if a is not None and a.train_task_adapters and a.hypercomplex_adapters and a.shared_phm_rule:
            n = a.hypercomplex_division  # VLT5.__init__ + set_phm_rule: one phm_rule in every PHMLinear
            self.phm_rule = nn.Parameter(torch.zeros(n, n, n))
            for m in list(self.encoder.modules()) + list(self.decoder.modules()):
                if isinstance(m, PHMLinear):
                    m.phm_rule = self.phm_rule

    def encode(self, input_ids, vis_inputs, task):
        hidden = self.encoder(input_ids, vis_inputs, task)
        # VLT5.forward: the cross-attention mask is rebuilt from input_ids, prompt ones, then vision ones
        mask = input_ids.ne(PAD_ID).to(hidden.dtype)
        p = self.config.encoder_prompt_config
        if p is not None and p.prompt_len > 0:
            ones = torch.ones(mask.size(0), p.prompt_len, dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.size(0), hidden.size(1) - mask.size(1))], dim=1)
        return hidden, mask

    def decode(self, hidden, mask, decoder_input_ids, task):
        out = self.decoder(decoder_input_ids, hidden, mask, task)
        return self.lm_head(out * (self.model_dim ** -0.5))  # rescale before the tied lm_head

    def forward(self, input_ids, vis_inputs, decoder_input_ids, task=None):
        hidden, mask = self.encode(input_ids, vis_inputs, task)
        return self.decode(hidden, mask, decoder_input_ids, task)


# ----------------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------------
def _init_values(model: VLT5, seed: int) -> None:
    """Seeded random values everywhere (no zero up-projections), sized so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    c, seen = model.config, set()

    def fill(p, std, mean=0.0):
        if id(p) not in seen:
            seen.add(id(p))
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)

    with torch.no_grad():
        for name, m in model.named_modules():
            last = name.rsplit(".", 1)[-1]
            for pname, p in m.named_parameters(recurse=False):
                if isinstance(m, (T5LayerNorm, nn.LayerNorm)):
                    fill(p, 0.1, 1.0 if pname == "weight" else 0.0)
                elif isinstance(m, nn.Embedding):
                    fill(p, {"relative_attention_bias": 0.3, "img_order_embedding": 0.5}.get(last, 1.0))
                elif name.endswith(("Attention.q", "Attention.k", "Attention.v", "Attention.o")):
                    fill(p, {"q": (c.d_model * c.d_kv) ** -0.5,  # HF T5 init stds, o and wo 3x larger
                             "o": 3 * (c.num_heads * c.d_kv) ** -0.5}.get(last, c.d_model ** -0.5))
                elif name.endswith(("DenseReluDense.wi", "DenseReluDense.wi_0", "DenseReluDense.wi_1")):
                    fill(p, c.d_model ** -0.5)
                elif name.endswith("DenseReluDense.wo"):  # so that sublayers, not the input token, lead
                    fill(p, 3 * c.d_ff ** -0.5)
                elif name.endswith(("weight_generator.0", "bias_generator.0")):
                    fill(p, 0.03 if pname == "weight" else 0.02)  # hypernet heads: small generated weights
                elif name.endswith(("weight_generator", "bias_generator")):
                    fill(p, 0.1, 0.0)  # layer-norm hypernetworks
                elif isinstance(m, nn.Linear):
                    fill(p, 0.5 / math.sqrt(m.in_features) if pname == "weight" else 0.05)
                elif isinstance(m, PHMLinear):
                    fill(p, {"phm_rule": 0.5, "W": 0.1, "W_left": 0.3, "W_right": 0.3}.get(pname, 0.05))
                elif isinstance(m, nn.ParameterDict):  # task embeddings (the seed draws torch.randn)
                    fill(p, 1.0)
                else:  # VL-PET ia3 gate vectors, the model-level phm_rule
                    fill(p, 0.5)
        for _, p in model.named_parameters():
            fill(p, 0.1)  # nothing should be left, but never leave a parameter at its constructor value


def build(hf_config: dict, method: dict, tasks: list[str], seed: int = 0) -> nn.Module:
    """VLT5 as the seed builds it for these CLI options (param.py names), with seeded random values.

    ``method["repo"]`` is "vl-adapter" or "vl-pet" (default). Both build the same keys for the VL_adapter
    options; "vl-adapter" rejects the VL-PET-only ones. Unspecified options take param.py's defaults.
    """
    model = VLT5(_make_config(hf_config, method, tasks))
    _init_values(model, seed)
    return model.eval()


def _vis_inputs(vis_feats, boxes, img_order_ids):
    if img_order_ids is None:  # the seed's default: image 0, objects 0..N-1
        return (vis_feats, boxes)
    # nlvr_model.py: obj ids restart at 0 for each image ([0]*V + [1]*V -> arange(V) twice)
    same = img_order_ids.unsqueeze(2) == img_order_ids.unsqueeze(1)  # (B, N, N)
    obj_order_ids = torch.tril(same.long(), diagonal=-1).sum(-1)  # earlier objects of the same image
    return (vis_feats, boxes, img_order_ids, obj_order_ids)


@torch.no_grad()
def logits(model, input_ids, vis_feats, boxes, img_order_ids, decoder_input_ids, task: str) -> torch.Tensor:
    """(B, L_dec, V) logits of VLT5.forward (eval mode)."""
    model.eval()
    return model(input_ids, _vis_inputs(vis_feats, boxes, img_order_ids), decoder_input_ids, task)


@torch.no_grad()
def greedy(model, input_ids, vis_feats, boxes, img_order_ids, task: str,
           max_new_tokens: int) -> list[list[int]]:
    """generate(num_beams=1): start from pad 0, argmax, finished rows padded, stop when all rows hit eos 1."""
    model.eval()
    hidden, mask = model.encode(input_ids, _vis_inputs(vis_feats, boxes, img_order_ids), task)
    B = input_ids.size(0)
    dec = torch.full((B, 1), DECODER_START_ID, dtype=torch.long, device=input_ids.device)
    unfinished = torch.ones(B, dtype=torch.long, device=input_ids.device)
    for _ in range(max_new_tokens):  # full re-decode each step == the seed's cached decode
        nxt = model.decode(hidden, mask, dec, task)[:, -1].argmax(-1)
        nxt = nxt * unfinished + PAD_ID * (1 - unfinished)
        dec = torch.cat([dec, nxt[:, None]], dim=1)
        unfinished = unfinished * (nxt != EOS_ID).long()
        if unfinished.max() == 0:
            break
    out = []
    for row in dec[:, 1:].tolist():
        out.append(row[:row.index(EOS_ID) + 1] if EOS_ID in row else row)
    return out


KINDS: dict[str, dict] = {
    # released settings (VL_adapter scripts/image/*.sh, VL-PET scripts/image-text/T5-VL-PET-*.sh + README),
    # dims scaled for a d_model=64 config. feat_dim 32 replaces 2048 (CLIP RN101 grid features).
    "full": {"feat_dim": 32},
    "lora": {"feat_dim": 32, "use_lora": True, "lora_dim": 4, "use_single_lora": True},  # no LoRA in T5
    "adapter_single": {"feat_dim": 32, "use_adapter": True, "reduction_factor": 8,
                       "use_single_adapter": True},
    "adapter_multiple": {"feat_dim": 32, "use_adapter": True, "reduction_factor": 8},
    "adapter_half_shared_up": {"feat_dim": 32, "use_adapter": True, "reduction_factor": 8,
                               "share_up_sampler": True},
    "adapter_half_shared_down": {"feat_dim": 32, "use_adapter": True, "reduction_factor": 8,
                                 "share_down_sampler": True},
    "compacter_single": {"feat_dim": 32, "use_compacter": True, "shared_phm_rule": False,
                         "factorized_phm": False, "hypercomplex_division": 2, "reduction_factor": 8,
                         "use_single_adapter": True},
    "compacter_multiple": {"feat_dim": 32, "use_compacter": True, "shared_phm_rule": False,
                           "factorized_phm": False, "hypercomplex_division": 2, "reduction_factor": 8},
    "hyperformer": {"feat_dim": 32, "use_hyperformer": True, "unique_hyper_net": True,
                    "projected_task_embedding_dim": 8, "reduction_factor": 8,
                    "task_embedding_dim": 16, "task_hidden_dim": 32},
    "prompt_single": {"feat_dim": 32, "encoder_prompt_len": 6, "mid_dim": 24, "use_single_prompt": True},
    "prompt_multiple": {"feat_dim": 32, "encoder_prompt_len": 6, "mid_dim": 24},
}
_VLPET = {"feat_dim": 32, "repo": "vl-pet", "use_adapter": True, "use_single_adapter": True,
          "no_encoder_adapter": True, "no_decoder_adapter": True, "reduction_factor": 8,
          "use_adapter_down_dim": True, "use_encoder_adapter_down_multihead": True, "adapter_down_dim": 16,
          "encoder_adapter_multihead_num_head": 4, "use_encoder_gating_scaling": True,
          "encoder_gating_scaling_factor": 0.3, "unfreeze_encoder_layer_norms": True,
          "use_decoder_enc_attn_value_parallel_adapter_down_dim": True,
          "decoder_enc_attn_value_parallel_adapter_down_dim": 8}
KINDS["vlpet_large"] = {**_VLPET, "use_encoder_adapter_gating_large_x_lowrank": True,
                        "adapter_gating_down_dim": 16}
KINDS["vlpet_small"] = {**_VLPET, "use_encoder_adapter_gating_small_xy_cat": True}
KINDS["vlpet_middlex"] = {**_VLPET, "use_encoder_adapter_gating_middle_xy_add": True}
KINDS["vlpet_middley"] = {**_VLPET, "use_encoder_adapter_gating_middle_ia3_add": True}


if __name__ == "__main__":  # quick self-test: every kind builds, runs and gives finite logits
    hf = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
              relative_attention_num_buckets=32, vocab_size=300, layer_norm_epsilon=1e-6,
              feed_forward_proj="relu")
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, 300, (2, 7), generator=gen)
    ids[1, 5:] = PAD_ID
    feats, boxes = torch.randn(2, 6, 32, generator=gen), torch.rand(2, 6, 4, generator=gen)
    two_images = torch.tensor([[0, 0, 0, 1, 1, 1]] * 2)
    for kind, options in KINDS.items():
        m = build(hf, options, ["vqa", "gqa", "nlvr", "caption"])
        out = logits(m, ids, feats, boxes, two_images, ids[:, :4], "nlvr")
        assert out.shape == (2, 4, 300) and torch.isfinite(out).all(), kind
        tokens = greedy(m, ids, feats, boxes, None, "vqa", 4)
        print(f"{kind:26s} keys={len(m.state_dict()):4d} greedy={tokens}")
