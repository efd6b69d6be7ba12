"""CLIP's text side: LiT training of a tiny text tower against the frozen image tower gives
zero-shot classification; the towers' artifact round-trips and is refused for another backbone;
a real CLIP checkpoint's text tower loads from its save_pretrained directory."""
from __future__ import annotations

import pytest
import torch

from petserve.adapters.clip_towers import TowersError, from_checkpoint, load_towers
from petserve.adapters.data.synthetic import COLORS, SHAPES, make_demo_scenes, render_scene
from petserve.adapters.training.lit import LiTConfig, cls_features, train_lit, zero_shot


def test_lit_gives_zero_shot_classification_on_the_demo_backbone(tmp_path):
    from petserve.adapters.backbone import build_backbone
    from petserve.adapters.demo import ensure_demo_assets
    model = build_backbone(ensure_demo_assets(progress=False).backbone_dir)
    towers, losses = train_lit(model, LiTConfig(steps=300, scenes=600))
    assert losses[-1] < losses[0] / 2
    classes = [(c, s) for c in COLORS for s in SHAPES]
    test = make_demo_scenes("colors", 120, 4242)
    pred = zero_shot(towers, cls_features(model, [render_scene(s) for s in test]),
                     [f"{c} {s}" for c, s in classes])
    gold = torch.tensor([classes.index((s.shapes[0].color, s.shapes[0].shape)) for s in test])
    assert float((pred == gold).float().mean()) > 0.5          # 24 classes: chance 0.04
    path = towers.save(tmp_path / "text.safetensors")
    back = load_towers(path, model)
    texts = ["a red circle", "a blue square and a white triangle"]
    torch.testing.assert_close(back.text_embeds(texts), towers.text_embeds(texts))
    with pytest.raises(TowersError, match="made for backbone"):
        load_towers(path, build_backbone("tiny"))
    with pytest.raises(TowersError, match="no such"):
        load_towers(tmp_path / "missing", model)


def test_a_real_clip_checkpoint_gives_its_text_tower(tmp_path, tiny_t5):
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizerFast, CLIPVisionConfig  # noqa: F401
    text = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=16, eos_token_id=98)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    hf = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                              projection_dim=24)).eval()
    hf.save_pretrained(tmp_path)
    from petserve.adapters.backbone.tokenizer import tiny_tokenizer
    tiny_tokenizer().save_pretrained(str(tmp_path))          # any tokenizer saved beside it
    towers = from_checkpoint(tmp_path, tiny_t5)
    ids = torch.tensor([[0, 5, 9, 98, 1], [0, 8, 3, 4, 98]])
    valid = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        want = hf.get_text_features(input_ids=ids)
        got = towers.text(ids, valid)
        cls = torch.randn(3, 32)
        torch.testing.assert_close(towers.visual_projection(cls), hf.visual_projection(cls))
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
