"""Read Hugging Face T5 / BART checkpoints (save_pretrained layout) into our modules.

Only local directories are read; nothing is downloaded. The same name rules map PEFT module paths to
our adapter sites.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from petserve.adapters.backbone.config import LMConfig

_T5_RULES = [
    (r"^(?:encoder|decoder)\.embed_tokens\.weight$", None),
    (r"^shared\.weight$", "tokens.weight"),
    (r"^lm_head\.weight$", "lm_head.weight"),
    (r"^(enc|dec)oder\.final_layer_norm\.weight$", r"\1_final_norm.weight"),
    (r"^(enc|dec)oder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight$",
     r"\1_rel_bias.weight"),
    (r"^(enc|dec)oder\.block\.(\d+)\.layer\.0\.SelfAttention\.(\w+)", r"\1_layers.\2.self_attn.\3"),
    (r"^(enc|dec)oder\.block\.(\d+)\.layer\.0\.layer_norm", r"\1_layers.\2.self_norm"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(\w+)", r"enc_layers.\1.ffn.\2"),
    (r"^encoder\.block\.(\d+)\.layer\.1\.layer_norm", r"enc_layers.\1.ffn_norm"),
    (r"^decoder\.block\.(\d+)\.layer\.1\.EncDecAttention\.(\w+)", r"dec_layers.\1.cross_attn.\2"),
    (r"^decoder\.block\.(\d+)\.layer\.1\.layer_norm", r"dec_layers.\1.cross_norm"),
    (r"^decoder\.block\.(\d+)\.layer\.2\.DenseReluDense\.(\w+)", r"dec_layers.\1.ffn.\2"),
    (r"^decoder\.block\.(\d+)\.layer\.2\.layer_norm", r"dec_layers.\1.ffn_norm"),
]
_BART_RULES = [
    (r"^(?:model\.)?(?:encoder|decoder)\.embed_tokens\.weight$", None),
    (r"^lm_head\.weight$", None),                       # tied to the shared embedding
    (r"^(?:model\.)?shared\.weight$", "tokens.weight"),
    (r"^final_logits_bias$", "final_logits_bias"),
    (r"^(?:model\.)?(enc|dec)oder\.embed_positions\.weight$", r"\1_pos.weight"),
    (r"^(?:model\.)?(enc|dec)oder\.layernorm_embedding", r"\1_embed_norm"),
    (r"^(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.self_attn\.([qkv])_proj", r"\1_layers.\2.self_attn.\3"),
    (r"^(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.self_attn\.out_proj", r"\1_layers.\2.self_attn.o"),
    (r"^(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.self_attn_layer_norm", r"\1_layers.\2.self_norm"),
    (r"^(?:model\.)?decoder\.layers\.(\d+)\.encoder_attn\.([qkv])_proj", r"dec_layers.\1.cross_attn.\2"),
    (r"^(?:model\.)?decoder\.layers\.(\d+)\.encoder_attn\.out_proj", r"dec_layers.\1.cross_attn.o"),
    (r"^(?:model\.)?decoder\.layers\.(\d+)\.encoder_attn_layer_norm", r"dec_layers.\1.cross_norm"),
    (r"^(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.fc1", r"\1_layers.\2.ffn.wi"),
    (r"^(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.fc2", r"\1_layers.\2.ffn.wo"),
    (r"^(?:model\.)?(enc|dec)oder\.layers\.(\d+)\.final_layer_norm", r"\1_layers.\2.ffn_norm"),
]
RULES = {"t5": _T5_RULES, "bart": _BART_RULES}


def own_name(hf_name: str, family: str) -> str | None:
    """Our parameter name for a Hugging Face one; None = skip (tied copy); KeyError = unknown."""
    for pattern, repl in RULES[family]:
        m = re.match(pattern, hf_name)
        if m:
            return None if repl is None else m.expand(repl) + hf_name[m.end():]
    raise KeyError(hf_name)


def site_of(own_module_path: str) -> str:
    """Adapter site of one of our module paths: ``enc_layers.3.self_attn.q`` -> ``enc.3.self.q``."""
    path = re.sub(r"^(enc|dec)_layers\.", r"\1.", own_module_path)
    return path.replace(".self_attn.", ".self.").replace(".cross_attn.", ".cross.")


def lm_config_from_hf(directory: Path) -> LMConfig:
    """LMConfig from a checkpoint's config.json (model_type t5 or bart)."""
    return lm_config_from_dict(json.loads((Path(directory) / "config.json").read_text()), directory)


def lm_config_from_dict(c: dict, where: str | Path = "config") -> LMConfig:
    """LMConfig from a Hugging Face T5 / BART config dict (``where`` names it in errors)."""
    kind = c.get("model_type")
    if kind == "t5":
        return LMConfig(
            family="t5", d_model=c["d_model"], num_heads=c["num_heads"], d_ff=c["d_ff"],
            enc_layers=c["num_layers"], dec_layers=c.get("num_decoder_layers") or c["num_layers"],
            vocab_size=c["vocab_size"], d_kv=c["d_kv"], ffn_act=c.get("feed_forward_proj", "relu"),
            norm_eps=c.get("layer_norm_epsilon", 1e-6),
            rel_buckets=c.get("relative_attention_num_buckets", 32),
            rel_max_distance=c.get("relative_attention_max_distance", 128),
            scale_decoder_outputs=c.get("scale_decoder_outputs",
                                        c.get("tie_word_embeddings", True) is not False),
            pad_id=c.get("pad_token_id", 0), eos_id=c.get("eos_token_id", 1),
            decoder_start_id=c.get("decoder_start_token_id") or c.get("pad_token_id", 0))
    if kind == "bart":
        return LMConfig(
            family="bart", d_model=c["d_model"], num_heads=c["encoder_attention_heads"],
            d_ff=c["encoder_ffn_dim"], enc_layers=c["encoder_layers"], dec_layers=c["decoder_layers"],
            vocab_size=c["vocab_size"], ffn_act=c.get("activation_function", "gelu"), norm_eps=1e-5,
            max_positions=c.get("max_position_embeddings", 1024),
            scale_embedding=bool(c.get("scale_embedding", False)), scale_decoder_outputs=False,
            pad_id=c.get("pad_token_id", 1), eos_id=c.get("eos_token_id", 2),
            bos_id=c.get("bos_token_id", 0), decoder_start_id=c.get("decoder_start_token_id", 2))
    raise ValueError(f"{where}: model_type {kind!r} is not supported (expected 't5' or 'bart')")


def read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a save_pretrained directory (safetensors only; pickled .bin files are refused)."""
    from safetensors.torch import load_file
    directory = Path(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{directory}: no *.safetensors weights (pickled pytorch_model.bin is not loaded for safety; "
            "convert with save_pretrained(..., safe_serialization=True))")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_lm_weights(lm: torch.nn.Module, directory: Path) -> None:
    """Copy a Hugging Face checkpoint's weights into ``lm`` (a Seq2SeqLM); every weight must match."""
    family = lm.cfg.family
    state = {}
    for hf_name, t in read_state_dict(directory).items():
        name = own_name(hf_name, family)
        if name is not None:
            state[name] = t
    if "lm_head.weight" in state:
        if torch.equal(state["lm_head.weight"], state["tokens.weight"]):
            del state["lm_head.weight"]
        else:
            lm.lm_head = torch.nn.Linear(lm.cfg.d_model, lm.cfg.vocab_size, bias=False)
    missing, unexpected = lm.load_state_dict(state, strict=False)
    missing = [m for m in missing if m != "final_logits_bias"]
    if missing or unexpected:
        raise ValueError(f"{directory}: checkpoint does not match the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
