r"""VLModel: frozen vision encoder -> visual embedding -> T5/BART encoder-decoder, per-row adapters.

Encoder input layout of row i (VL-T5 / VL-BART)::

    [ prefix_i (prompt tuning) ; text_i ; pad ... | visual_i ; pad ... ]
      \_________ text block, width max_i(P_i+L_i) _/ \__ visual block __/

Text is the prompt the row's adapter was trained with (``adapters.tasks.InputFormat``: by default
``"{task}: {text}"``, ``caption:`` for captions; the seeds' ``"vqa: {text}"``), tokenized and
truncated as recorded. A row's boxes are all zero when its adapter was trained so. T5 applies its relative
position bias within the text block only; BART adds learned positions to the text and normalises
the text block with layernorm_embedding, visual tokens skip both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from petserve.adapters.backbone.cache import DecoderCache
from petserve.adapters.backbone.config import BackboneConfig
from petserve.adapters.backbone.lm import Seq2SeqLM
from petserve.adapters.backbone.tokenizer import caps_marker, mark_caps, unmark_caps
from petserve.adapters.backbone.visual import VisionEncoder, VisualEmbedding, VisualTokens, object_index
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.tasks import InputFormat, get_task

DEFAULT_INPUTS = InputFormat()


@dataclass
class RowInput:
    """One request as the model sees it: token ids of the prompt text and its visual tokens
    (``zero_boxes``: fed with all-zero boxes, as the row's adapter was trained)."""

    ids: list[int]
    visual: VisualTokens | None
    zero_boxes: bool = False


class VLModel(nn.Module):
    def __init__(self, cfg: BackboneConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self._caps = caps_marker(tokenizer)
        self.lm = Seq2SeqLM(cfg.lm)
        self.vision = VisionEncoder(cfg.vision) if cfg.vision.kind == "clip" else None
        self.visual_embed = VisualEmbedding(
            cfg.vision.feat_dim, cfg.lm.d_model, cfg.n_images, norm=cfg.visual_norm,
            eps=cfg.lm.norm_eps if cfg.visual_norm == "rms" else 1e-5, object_order=cfg.object_order)
        self.fingerprint = ""          # set by loading.build_backbone
        self._choices: dict[str, tuple[int, ...]] = {}   # choice_ids per task

    @property
    def device(self):
        return self.lm.tokens.weight.device

    @property
    def dtype(self):
        return self.lm.tokens.weight.dtype

    # ---- inputs ----------------------------------------------------------------------------
    def row_input(self, task: str, text: str, visual: VisualTokens | None,
                  inputs: InputFormat = DEFAULT_INPUTS) -> RowInput:
        """The row of a request for an adapter trained with ``inputs``."""
        prompt = mark_caps(inputs.prompt(task, text), self._caps)
        ids = inputs.truncate(task, list(self.tokenizer(prompt)["input_ids"]))
        return RowInput(ids, visual, inputs.boxes == "zero")

    def choice_ids(self, task: str) -> tuple[int, ...]:
        """How a task answered by choosing is decoded: the tokens every target starts with (BART's
        ``<s>``), -1, then the first token of each answer word (the seeds: ``tokenizer(word,
        add_special_tokens=False).input_ids[0]``). () for a freely generated task. Tokenized once
        per task."""
        got = self._choices.get(task)
        if got is None:
            words = get_task(task).choices
            if not words:
                got = ()
            else:
                prefix = self.target_ids("")[:-1]      # an empty target less its end of sequence
                firsts = [self.tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in words]
                got = (*prefix, -1, *firsts)
            self._choices[task] = got
        return got

    def target_ids(self, target: str) -> list[int]:
        return list(self.tokenizer(mark_caps(target, self._caps))["input_ids"])

    def decode_text(self, ids: list[int]) -> str:
        return unmark_caps(self.tokenizer.decode(ids, skip_special_tokens=True).strip(), self._caps)

    # ---- encoder ---------------------------------------------------------------------------
    def encode(self, rows: list[RowInput], ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, T, d) and its validity mask (B, T); sets ``ctx.meta.enc_valid``."""
        text, text_valid, text_pos = self._text_block(rows, ctx)
        vis, vis_valid = self._visual_block(rows, ctx)
        x = torch.cat([text, vis], 1)
        valid = torch.cat([text_valid, vis_valid], 1)
        pos = torch.cat([text_pos, torch.full(vis_valid.shape, -1, dtype=torch.long,
                                              device=self.device)], 1)
        ctx.meta.enc_valid = valid
        return self.lm.encode(x, valid, pos, ctx), valid

    def _text_block(self, rows: list[RowInput], ctx: StepContext):
        """(B, Lt, d) text embeddings with each row's prompt prefix, validity and positions."""
        dev, B = self.device, len(rows)
        L = max(len(r.ids) for r in rows)
        ids = torch.full((B, L), self.cfg.lm.pad_id, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            ids[i, :len(r.ids)] = torch.tensor(r.ids, device=dev)
        lengths = torch.tensor([len(r.ids) for r in rows], device=dev)
        pos = torch.arange(L, device=dev).expand(B, L)
        emb = self.lm.embed_text(ids, torch.where(pos < lengths[:, None], pos, -1), ctx)
        prefix_lens = self._prefix_lengths(ctx)
        if not any(prefix_lens):
            valid = pos < lengths[:, None]
            tpos = torch.where(valid, pos, -1)
            return self.lm.finish_text(emb, ctx), valid, tpos
        return self._with_prefix(emb, lengths.tolist(), prefix_lens, ctx)

    def _prefix_lengths(self, ctx: StepContext) -> list[int]:
        stack = ctx.weights.prefix()
        if stack is None:
            return [0] * ctx.meta.batch_size
        return [stack.lengths_host[s] if s >= 0 else 0 for s in ctx.meta.row_slots.tolist()]

    def _with_prefix(self, emb, lengths, prefix_lens, ctx):
        """Prepend each row's prompt vectors. T5: the prompt takes text positions 0..P-1;
        BART: prompt vectors get no position (VL-Adapter)."""
        stack, slots = ctx.weights.prefix(), ctx.meta.row_slots.tolist()
        W = max(p + n for p, n in zip(prefix_lens, lengths))
        B = len(lengths)
        rows, pos = [], torch.full((B, W), -1, dtype=torch.long, device=self.device)
        for i, (p, n) in enumerate(zip(prefix_lens, lengths)):
            parts = [stack.vectors[slots[i], :p].to(emb.dtype)] if p else []
            rows.append(F.pad(torch.cat(parts + [emb[i, :n]]), (0, 0, 0, W - p - n)))
            start = 0 if self.lm.t5 else p
            pos[i, start:p + n] = torch.arange(p + n - start, device=self.device)
        valid = torch.arange(W, device=self.device)[None] < torch.tensor(
            [p + n for p, n in zip(prefix_lens, lengths)], device=self.device)[:, None]
        return self.lm.finish_text(torch.stack(rows), ctx), valid, pos

    def _visual_block(self, rows: list[RowInput], ctx: StepContext):
        B, dev = len(rows), self.device
        N = max((r.visual.feats.shape[0] for r in rows if r.visual is not None), default=0)
        f = self.cfg.vision.feat_dim
        feats = torch.zeros(B, N, f, device=dev, dtype=self.dtype)
        boxes = torch.zeros(B, N, 4, device=dev, dtype=self.dtype)
        order = torch.zeros(B, N, dtype=torch.long, device=dev)
        obj = torch.zeros(B, N, dtype=torch.long, device=dev)
        valid = torch.zeros(B, N, dtype=torch.bool, device=dev)
        for i, r in enumerate(rows):
            if r.visual is None:
                continue
            n = r.visual.feats.shape[0]
            if r.visual.feats.shape[1] != f:
                raise ValueError(f"visual features have width {r.visual.feats.shape[1]}, "
                                 f"the backbone expects {f}")
            feats[i, :n] = r.visual.feats
            if not r.zero_boxes:
                boxes[i, :n] = r.visual.boxes
            order[i, :n], valid[i, :n] = r.visual.order.clamp(0, self.cfg.n_images - 1), True
            obj[i, :n] = object_index(r.visual.order).clamp_max(self.cfg.lm.vocab_size - 1)
        if N == 0:
            return feats.new_zeros(B, 0, self.cfg.lm.d_model), valid
        return self.visual_embed(feats, boxes, order, obj, self.lm.tokens, ctx), valid

    # ---- decoder ---------------------------------------------------------------------------
    def init_cache(self, enc_out, enc_valid, ctx: StepContext) -> DecoderCache:
        return self.lm.init_cache(enc_out, enc_valid, ctx)

    def decode(self, ids, pos, cache: DecoderCache, ctx: StepContext) -> torch.Tensor:
        return self.lm.decode(ids, pos, cache, ctx)

    def teacher_forced_logits(self, rows: list[RowInput], targets: list[list[int]],
                              ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, L, V), labels (B, L) with -100 past each target) of the targets under
        teacher forcing."""
        enc, valid = self.encode(rows, ctx)
        cache = self.init_cache(enc, valid, ctx)
        B, L = len(targets), max(len(t) for t in targets)
        labels = torch.full((B, L), -100, dtype=torch.long, device=self.device)
        for i, t in enumerate(targets):
            labels[i, :len(t)] = torch.tensor(t, device=self.device)
        start = torch.full((B, 1), self.cfg.lm.decoder_start_id, dtype=torch.long, device=self.device)
        inputs = torch.cat([start, labels[:, :-1].clamp_min(0)], 1)
        pos = torch.arange(L, device=self.device).expand(B, L)
        return self.decode(inputs, pos, cache, ctx), labels

    def loss(self, rows: list[RowInput], targets: list[list[int]], ctx: StepContext) -> torch.Tensor:
        """Mean token cross-entropy of the targets under teacher forcing."""
        logits, labels = self.teacher_forced_logits(rows, targets, ctx)
        B, L = labels.shape
        return F.cross_entropy(logits.float().reshape(B * L, -1), labels.reshape(-1), ignore_index=-100)
