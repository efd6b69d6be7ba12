"""CLIP's two towers for classification (CapS-Adapter, /v1/classify): the backbone's vision tower
gives the image side, a text tower (adapters/backbone/clip.py ``ClipText``) the text side.

    image_embeds = normalise(visual_projection(post_layernorm(CLS)))
    text_embeds  = normalise(ClipText(tokens))

With a real CLIP checkpoint (a ``save_pretrained`` directory of CLIPModel) both come from it:
``text_model.*``, ``text_projection``, ``visual_projection``, ``logit_scale`` and its tokenizer
(``from_checkpoint``). The embedded default's tiny vision tower has no text side: a tiny text
tower and the image projection are trained against the frozen image tower on the synthetic
captions, LiT-style (adapters/training/lit.py), and saved as an artifact tied to the backbone's
fingerprint (``save`` / ``load_towers``).
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from petserve.adapters.backbone.clip import ClipText, ClipTextConfig

TOWERS_FORMAT = "petserve-clip-text"


class TowersError(ValueError):
    """A text-tower file that cannot be used with this backbone; the message says why."""


class ClipTowers(torch.nn.Module):
    def __init__(self, cfg: ClipTextConfig, image_width: int, tokenizer, backbone: str):
        super().__init__()
        self.cfg, self.tokenizer, self.backbone = cfg, tokenizer, backbone
        self.text = ClipText(cfg)
        self.visual_projection = torch.nn.Linear(image_width, cfg.projection_dim, bias=False)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.6592))      # log(1 / 0.07), CLIP's
        torch.nn.init.normal_(self.visual_projection.weight, std=image_width ** -0.5)

    def image_embeds(self, cls_features: torch.Tensor) -> torch.Tensor:
        """(n, D) normalised image embeddings of the vision tower's post-layernormed CLS (n, f)."""
        return F.normalize(self.visual_projection(cls_features.to(self.visual_projection.weight)),
                           dim=-1)

    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        """(n, D) normalised text embeddings (each text tokenized, cut to the position limit)."""
        limit = self.cfg.max_position_embeddings
        ids = []
        for t in texts:
            got = list(self.tokenizer(t)["input_ids"])
            ids.append(got if len(got) <= limit else got[:limit - 1] + got[-1:])
        T = max(len(i) for i in ids)
        dev = self.visual_projection.weight.device
        x = torch.zeros(len(ids), T, dtype=torch.long, device=dev)
        valid = torch.zeros(len(ids), T, dtype=torch.bool, device=dev)
        for k, i in enumerate(ids):
            x[k, :len(i)] = torch.tensor(i, device=dev)
            valid[k, :len(i)] = True
        return F.normalize(self.text(x, valid), dim=-1)

    # ---- the artifact (the embedded default's trained towers) ---------------------------------
    def save(self, path: Path) -> Path:
        from safetensors.torch import save

        from petserve.adapters.atomic_file import write_atomically
        meta = {"format": TOWERS_FORMAT, "config": asdict(self.cfg), "backbone": self.backbone,
                "image_width": self.visual_projection.in_features}
        tensors = {k: v.detach().contiguous().float() for k, v in self.state_dict().items()}
        data = save(tensors, metadata={"petserve": json.dumps(meta, separators=(",", ":"))})
        return write_atomically(Path(path), lambda f: f.write(data))


def load_towers(path: Path, model) -> ClipTowers:
    """The text tower file in ``path`` for ``model`` (its tokenizer is the backbone's); TowersError
    for another backbone or a file that is not one."""
    from petserve.adapters.adapter_file import read_petserve_file
    try:
        meta, tensors = read_petserve_file(Path(path).read_bytes())
    except FileNotFoundError:
        raise TowersError(f"{path}: no such text tower file") from None
    except ValueError as e:
        raise TowersError(f"{path}: not a petserve text tower file ({e})") from None
    if meta.get("format") != TOWERS_FORMAT:
        raise TowersError(f"{path}: not a petserve text tower file")
    if meta.get("backbone") != model.fingerprint:
        raise TowersError(f"{path}: made for backbone {meta.get('backbone')}, this backbone is "
                          f"{model.fingerprint}")
    towers = ClipTowers(ClipTextConfig(**meta["config"]), meta["image_width"], model.tokenizer,
                        model.fingerprint)
    try:
        towers.load_state_dict(tensors)
    except RuntimeError as e:
        raise TowersError(f"{path}: tensors do not match its config ({e})") from None
    return towers.to(model.device).eval().requires_grad_(False)


def load_clip(path: Path, model) -> ClipTowers:
    """A text tower file (``load_towers``) or a CLIPModel directory (``from_checkpoint``)."""
    return from_checkpoint(path, model) if Path(path).is_dir() else load_towers(path, model)


def from_checkpoint(directory: Path, model) -> ClipTowers:
    """Both towers' text side from a CLIPModel ``save_pretrained`` directory (``config.json`` with
    ``text_config`` and ``projection_dim``; weights; a CLIP tokenizer beside them)."""
    from transformers import AutoTokenizer

    from petserve.adapters.backbone.hf_weights import read_state_dict
    directory = Path(directory)
    c = json.loads((directory / "config.json").read_text())
    if "text_config" not in c:
        raise TowersError(f"{directory}: not a CLIP checkpoint with a text tower (no text_config)")
    text = dict(c["text_config"])
    text["projection_dim"] = c.get("projection_dim", text.get("projection_dim", 512))
    cfg = ClipTextConfig.from_dict(text)
    towers = ClipTowers(cfg, c.get("vision_config", {}).get("hidden_size", 768),
                        AutoTokenizer.from_pretrained(str(directory), local_files_only=True),
                        model.fingerprint)
    state = read_state_dict(directory)
    text_state = {k.removeprefix("text_model."): v for k, v in state.items()
                  if k.startswith("text_model.") and not k.endswith("position_ids")}
    text_state["text_projection.weight"] = state["text_projection.weight"]
    towers.text.load_state_dict(text_state)
    towers.visual_projection.weight.data.copy_(state["visual_projection.weight"])
    towers.logit_scale.data.copy_(state["logit_scale"].reshape(()))
    return towers.to(model.device).eval().requires_grad_(False)
