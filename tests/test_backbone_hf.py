"""Our T5 / BART forward equals Hugging Face's on text-only input, from a save_pretrained directory."""
import pytest
import torch

from petserve.adapters.backbone import build_backbone
from petserve.adapters.backbone.model import RowInput
from petserve.adapters.runtime.context import StepContext


def _hf_model(family, tmp_path):
    import transformers as tf
    torch.manual_seed(0)
    if family == "t5":
        cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(cfg)
    elif family == "t5-gated":
        cfg = tf.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(cfg)
    else:
        cfg = tf.BartConfig(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4,
                            encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                            pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)
        model = tf.BartForConditionalGeneration(cfg)
        with torch.no_grad():
            model.final_logits_bias.normal_()
    model.eval()
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", ["t5", "t5-gated", "bart"])
def test_logits_match_hugging_face(family, tmp_path):
    hf = _hf_model(family, tmp_path)
    ours = build_backbone(tmp_path)
    ids = [[5, 9, 13, 27, 2 if family == "bart" else 1], [7, 8, 2 if family == "bart" else 1]]
    dec = torch.tensor([[ours.cfg.lm.decoder_start_id, 11, 12, 13]] * 2)
    B, L = dec.shape
    pad = ours.cfg.lm.pad_id
    inp = torch.full((2, 5), pad)
    mask = torch.zeros(2, 5, dtype=torch.long)
    for i, r in enumerate(ids):
        inp[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    with torch.no_grad():
        ref = hf(input_ids=inp, attention_mask=mask, decoder_input_ids=dec).logits
        ctx = StepContext.backbone_only(2, "cpu")
        enc, valid = ours.encode([RowInput(r, None) for r in ids], ctx)
        cache = ours.init_cache(enc, valid, ctx)
        pos = torch.arange(L).expand(B, L)
        full = ours.decode(dec, pos, cache, ctx)
        # the same logits one token at a time through the cache
        cache2 = ours.init_cache(enc, valid, ctx)
        steps = [ours.decode(dec[:, t:t + 1], pos[:, t:t + 1], cache2, ctx) for t in range(L)]
    torch.testing.assert_close(full, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(steps, 1), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_tower_matches_hugging_face(act, tmp_path):
    """Our CLIP ViT: transformers' parameter names, random init for a seed, outputs (bitwise), and
    a saved Hugging Face CLIP checkpoint (4.x nesting, position_ids) loads into it."""
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from petserve.adapters.backbone.clip import ClipConfig, ClipVision
    from petserve.adapters.backbone.loading import load_clip_weights
    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               image_size=32, patch_size=8, hidden_act=act, layer_norm_eps=1e-5)
    torch.manual_seed(5)
    hf = CLIPVisionModel(CLIPVisionConfig(**cfg)).eval()
    torch.manual_seed(5)
    ours = ClipVision(ClipConfig.from_dict(cfg)).eval()
    theirs = hf.state_dict()
    assert set(ours.state_dict()) == set(theirs)
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(ours(x), hf(pixel_values=x).last_hidden_state)
    nested = {f"vision_model.{k}": v.clone() + 1 for k, v in theirs.items()}
    nested["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    save_file(nested, str(tmp_path / "model.safetensors"))
    load_clip_weights(ours, tmp_path)
    assert torch.equal(ours.pre_layrnorm.weight, theirs["pre_layrnorm.weight"] + 1)


@pytest.mark.parametrize("eos", [2, 7])
def test_clip_text_tower_matches_hugging_face(eos):
    """Our ClipText = transformers' CLIPTextModelWithProjection (weights copied by name, padded
    batch of different lengths; eos 2 takes the legacy argmax end, another id its first
    occurrence)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from petserve.adapters.backbone.clip import ClipText, ClipTextConfig
    cfg = dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=16, projection_dim=24,
               eos_token_id=eos, bos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    hf = CLIPTextModelWithProjection(CLIPTextConfig(**cfg)).eval()
    ours = ClipText(ClipTextConfig.from_dict(cfg)).eval()
    state = {k.removeprefix("text_model."): v for k, v in hf.state_dict().items()
             if not k.endswith("position_ids")}
    ours.load_state_dict(state)
    ids = torch.tensor([[0, 5, 9, 12, eos if eos != 2 else 49, 1, 1],
                        [0, 8, 3, 4, 6, 10, eos if eos != 2 else 49]])
    valid = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=valid.long()).text_embeds
        got = ours(ids, valid)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
