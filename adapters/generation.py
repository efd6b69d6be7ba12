"""Generation with per-row adapters: greedy and beam search, split into prefill / decode_step.

Each request owns a searcher (``width`` rows of the batch: 1 for greedy, K for beams). Every step the
driver runs one decoder step for all live rows, hands each searcher its rows' log-probabilities and
gathers the cache rows the searchers keep. The serving engine drives the same searchers, admitting
new requests between steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from petserve.adapters.backbone.cache import DecoderCache
from petserve.adapters.backbone.model import RowInput, VLModel
from petserve.adapters.runtime.context import StepContext
from petserve.adapters.runtime.meta import BatchMeta
from petserve.adapters.runtime.weights import RuntimeWeights


@dataclass
class GenerationRequest:
    row: RowInput
    slot: int = -1                  # -1 = backbone only
    max_new_tokens: int = 20
    num_beams: int = 1
    choices: tuple[int, ...] = ()   # answer with the likeliest of these tokens (NLVR2's true / false)


@dataclass
class GenerationResult:
    tokens: list[int]               # generated ids, end-of-sequence excluded
    logprob: float                  # sum of the chosen tokens' log-probabilities (eos included)
    text: str = ""


class GreedySearch:
    width = 1

    def __init__(self, max_new_tokens: int, eos_id: int):
        self.max_new, self.eos = max_new_tokens, eos_id
        self.tokens: list[int] = []
        self.logprob, self.done = 0.0, False

    def step(self, logprobs: torch.Tensor) -> tuple[list[int], list[int]]:
        """logprobs (1, V) -> (parent rows, next tokens) of the rows that go on."""
        lp, tok = logprobs[0].max(-1)
        return self.take(float(lp), int(tok))

    def take(self, logprob: float, tok: int) -> tuple[list[int], list[int]]:
        """:meth:`step` given the row's best (log-prob, token), for drivers that take one batched
        max over all greedy rows (one device sync per step instead of one per row)."""
        self.logprob += logprob
        if tok == self.eos:
            self.done = True
            return [], []
        self.tokens.append(tok)
        self.done = len(self.tokens) >= self.max_new
        return ([], []) if self.done else ([0], [tok])

    def result(self) -> GenerationResult:
        return GenerationResult(self.tokens, self.logprob)

    def stop(self) -> None:
        """End after the next step (its token is the last): the row leaves the batch the way a
        finished one does."""
        self.max_new = min(self.max_new, len(self.tokens) + 1)


@dataclass(order=True)
class _Hyp:
    score: float                                     # length-normalised, for ranking
    logprob: float = field(compare=False)
    tokens: list[int] = field(compare=False)


class BeamSearch:
    """K beams with length penalty (score / length**penalty) and HF's "heuristic" stopping."""

    def __init__(self, num_beams: int, max_new_tokens: int, eos_id: int, length_penalty: float = 1.0):
        self.width, self.max_new, self.eos, self.lp = num_beams, max_new_tokens, eos_id, length_penalty
        self.scores = [0.0] + [-math.inf] * (num_beams - 1)   # one live beam until the first step
        self.seqs: list[list[int]] = [[] for _ in range(num_beams)]
        self.finished: list[_Hyp] = []
        self.done = False

    def _add(self, logprob: float, tokens: list[int], length: int) -> None:
        self.finished.append(_Hyp(logprob / length ** self.lp, logprob, tokens))
        self.finished = sorted(self.finished, reverse=True)[:self.width]

    def step(self, logprobs: torch.Tensor) -> tuple[list[int], list[int]]:
        """logprobs (K, V) -> (parent beams, next tokens), K of each unless done."""
        K, V = logprobs.shape
        cand = (torch.tensor(self.scores, dtype=logprobs.dtype).unsqueeze(1) + logprobs).view(-1)
        values, indices = cand.topk(2 * K)
        parents, toks, scores, seqs = [], [], [], []
        for rank, (score, flat) in enumerate(zip(values.tolist(), indices.tolist())):
            beam, tok = divmod(flat, V)
            if score == -math.inf:
                break
            if tok == self.eos:
                if rank < K:
                    self._add(score, list(self.seqs[beam]), len(self.seqs[beam]) + 1)
                continue
            parents.append(beam), toks.append(tok), scores.append(score)
            seqs.append(self.seqs[beam] + [tok])
            if len(parents) == K:
                break
        self.scores, self.seqs = scores, seqs
        length = len(seqs[0]) if seqs else 0
        if not seqs or length >= self.max_new:
            for s, q in zip(scores, seqs):
                self._add(s, q, len(q))
            self.done = True
        elif len(self.finished) >= K and self.finished[-1].score >= max(scores) / length ** self.lp:
            self.done = True
        return ([], []) if self.done else (parents, toks)

    def result(self) -> GenerationResult:
        best = self.finished[0]
        return GenerationResult(best.tokens, best.logprob)

    def stop(self) -> None:
        """End after the next step: the best hypotheses so far are then its answer."""
        self.max_new = min(self.max_new, len(self.seqs[0]) + 1 if self.seqs else 1)


class ChoiceSearch:
    """The likeliest of ``choices`` (token ids) after the forced ``prefix`` tokens, as the seeds
    decide NLVR2: they compare the logits of ``true`` and ``false`` after the decoder start token
    (VL-T5) or after start + ``<s>`` (VL-BART, whose targets begin with ``<s>``)."""

    width = 1

    def __init__(self, choices: tuple[int, ...], prefix: tuple[int, ...] = ()):
        self.choices, self.prefix = list(choices), list(prefix)
        self.tokens: list[int] = []
        self.logprob, self.done = 0.0, False

    def step(self, logprobs: torch.Tensor) -> tuple[list[int], list[int]]:
        if len(self.tokens) < len(self.prefix):
            tok = self.prefix[len(self.tokens)]
            self.tokens.append(tok)
            self.logprob += float(logprobs[0, tok])
            return [0], [tok]
        lp = logprobs[0, self.choices]
        best = int(lp.argmax())
        self.tokens.append(self.choices[best])
        self.logprob += float(lp[best])
        self.done = True
        return [], []

    def result(self) -> GenerationResult:
        return GenerationResult(self.tokens, self.logprob)

    def stop(self) -> None:
        """Nothing to cut short: it ends once its forced prefix is through (a step or two)."""


def make_searcher(num_beams: int, max_new_tokens: int, eos_id: int, choices: tuple[int, ...] = ()):
    """``choices``: (prefix tokens ..., -1, choice tokens ...) as ``VLModel.choice_ids`` gives
    them, or () for free generation."""
    if choices:
        cut = choices.index(-1)
        return ChoiceSearch(choices[cut + 1:], choices[:cut])
    if num_beams > 1:
        return BeamSearch(num_beams, max_new_tokens, eos_id)
    return GreedySearch(max_new_tokens, eos_id)


@dataclass
class DecodeState:
    """Live rows of a decoding batch: their cache, context, last token and position."""

    cache: DecoderCache
    ctx: StepContext
    tokens: torch.Tensor            # (R,) last token of each row
    pos: torch.Tensor               # (R,) position of that token

    @staticmethod
    def concat(states: list[DecodeState]) -> DecodeState:
        """Rows of every state in order (continuous batching: new rows join running ones);
        histories and encoder lengths are padded, positions stay per row."""
        meta = BatchMeta.concat([s.ctx.meta for s in states])
        return DecodeState(DecoderCache.concat([s.cache for s in states]),
                           StepContext(states[0].ctx.weights, meta),
                           torch.cat([s.tokens for s in states]), torch.cat([s.pos for s in states]))

    def compact(self) -> DecodeState:
        """Drop leading self-attention columns no row uses any more and trailing encoder columns
        that are padding for every row (rows that left were the only ones there). Without it a
        batch that never drains grows its cache with every step it has ever run."""
        cache, meta = self.cache, self.ctx.meta
        empty_keys = ~(cache.key_pos >= 0).any(0)                 # (L,)
        pad_enc = ~cache.enc_valid.any(0)                         # (T,)
        lead, trail = torch.stack([empty_keys.long().cumprod(0).sum(),
                                   pad_enc.flip(0).long().cumprod(0).sum()]).tolist()
        if lead == 0 and trail == 0:
            return self
        T = cache.enc_valid.shape[1] - trail
        keys = lambda ts: [t[:, :, lead:] for t in ts]  # noqa: E731
        enc = lambda ts: [t[:, :, :T] for t in ts]  # noqa: E731
        cache = DecoderCache(keys(cache.self_k), keys(cache.self_v), cache.key_pos[:, lead:],
                             enc(cache.cross_k), enc(cache.cross_v), cache.enc_valid[:, :T])
        valid = None if meta.enc_valid is None else meta.enc_valid[:, :T]
        ctx = StepContext(self.ctx.weights, BatchMeta(meta.row_slots, meta.num_slots, valid))
        return DecodeState(cache, ctx, self.tokens, self.pos)


def prefill(model: VLModel, weights: RuntimeWeights, requests: list[GenerationRequest],
            searchers: list) -> DecodeState:
    """Encode the requests together and lay out ``searcher.width`` decoder rows per request."""
    meta = BatchMeta.build([r.slot for r in requests], weights.num_slots, model.device)
    ctx = StepContext(weights, meta)
    enc, valid = model.encode([r.row for r in requests], ctx)
    cache = model.init_cache(enc, valid, ctx)
    expand = torch.tensor([i for i, s in enumerate(searchers) for _ in range(s.width)],
                          device=model.device)
    n = expand.shape[0]
    start = torch.full((n,), model.cfg.lm.decoder_start_id, dtype=torch.long, device=model.device)
    return DecodeState(cache.select(expand), ctx.select(expand), start,
                       torch.zeros(n, dtype=torch.long, device=model.device))


def decode_step(model: VLModel, state: DecodeState) -> torch.Tensor:
    """One decoder step for every live row: (R, V) log-probabilities (fp32)."""
    logits = model.decode(state.tokens.unsqueeze(1), state.pos.unsqueeze(1), state.cache, state.ctx)
    return torch.log_softmax(logits[:, -1].float(), dim=-1)


def advance(state: DecodeState, searchers: list, logprobs: torch.Tensor) -> DecodeState | None:
    """The one decode driver step (``generate`` and the serving scheduler both use it).

    ``searchers`` own the rows of ``state`` in order (``width`` rows each); ``logprobs`` is (R, V).
    Each searcher picks its rows' continuations: one batched max over every greedy row (one device
    sync per step, not one per row), one topk per beam search. Returns the next state, None when
    no row is left; a searcher with ``done`` set has finished and owns no row of it."""
    greedy_lp = greedy_tok = None
    if any(isinstance(s, GreedySearch) for s in searchers):
        lp, tok = logprobs.max(-1)
        greedy_lp, greedy_tok = lp.tolist(), tok.tolist()
    parents, toks, offset = [], [], 0
    for s in searchers:
        if isinstance(s, GreedySearch):
            p, t = s.take(greedy_lp[offset], greedy_tok[offset])
        else:
            p, t = s.step(logprobs[offset:offset + s.width])
        parents += [offset + i for i in p]
        toks += t
        offset += s.width
    return _carry(state, parents, toks) if parents else None


def _carry(state: DecodeState, parents: list[int], toks: list[int]) -> DecodeState:
    """The kept rows with their next tokens: a copy only when rows left or beams reordered, and
    compacted when rows left (so a batch that never drains does not grow its cache forever)."""
    dev = state.tokens.device
    tokens = torch.tensor(toks, dtype=torch.long, device=dev)
    n = state.tokens.shape[0]
    if len(parents) == n and parents == list(range(n)):
        return DecodeState(state.cache, state.ctx, tokens, state.pos + 1)
    idx = torch.tensor(parents, device=dev)
    kept = DecodeState(state.cache.select(idx), state.ctx.select(idx), tokens,
                       state.pos.index_select(0, idx) + 1)
    return kept.compact() if len(parents) < n else kept


@torch.no_grad()
def generate(model: VLModel, weights: RuntimeWeights,
             requests: list[GenerationRequest]) -> list[GenerationResult]:
    """Generate for a batch of requests that may each use a different adapter slot."""
    eos = model.cfg.lm.eos_id
    searchers = [make_searcher(r.num_beams, r.max_new_tokens, eos, r.choices) for r in requests]
    state = prefill(model, weights, requests, searchers)
    live = searchers
    while state is not None:
        state = advance(state, live, decode_step(model, state))
        live = [s for s in live if not s.done]
    results = [s.result() for s in searchers]
    for r in results:
        r.text = model.decode_text(r.tokens)
    return results


def answer_mixed(model, bank, requests: list[tuple], seed: int, batch_size: int = 96) -> dict:
    """``requests``: (*key, GenerationRequest); answered in a seeded shuffle (slots and tasks
    mixed in every batch) -> {key: its GenerationResult}. What the demo score commands use."""
    import random
    requests = list(requests)
    random.Random(seed).shuffle(requests)
    out = {}
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        for r, res in zip(chunk, generate(model, bank, [r[-1] for r in chunk])):
            out[r[:-1]] = res
    return out
