"""Batched text generation: greedy or sampled, with per-sequence fetched memory, a KV cache and stop strings.

Prompts of different lengths are left-padded; padding is its own masked segment and positions start at 0 on
each prompt's first real token, so a padded prompt decodes exactly as it would alone. With a KV cache
(BatchDecoder) the prompts run once and each step feeds one token per row; a continuation that would outgrow
the model's context (model.max_seq_len) instead recomputes a sliding window of the last max_seq_len tokens at
every step (the cache-free path, also the reference the cached one is tested against).

BatchDecoder is continuous batching, as a server needs it: sequences may join a running batch between steps
(their prompts are prefilled as a batch of their own, then their keys, values and memory rows are stacked onto
the running ones, the shorter side left-padded) and leave it when they finish or are cancelled. Every row
carries its own sampling parameters and random generator, so what a sequence generates never depends on the
sequences it happens to be batched with. Each row's memory is its own rows of one FetchedMemory (model/
fetched.py): rows of different paths, the generic block and no memory at all share a batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Callable

import torch

from hiermem.errors import HiermemError
from hiermem.model import FetchedMemory
from hiermem.model.fetched import MemoryPart
from hiermem.model.transformer import KVCache, Transformer


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask everything outside the top-k and outside the smallest set whose probability reaches top_p."""
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


@dataclass(frozen=True)
class Sampling:
    """How one sequence picks its tokens. temperature 0 is greedy (top_k/top_p then do not matter); seed None
    draws a fresh one. The penalties and logit_bias (token id -> added logit) follow OpenAI's definitions:
    logit -= frequency_penalty * count + presence_penalty * (count > 0), counting the generated tokens."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None

    def adjust(self, logits: torch.Tensor, generated: list[int]) -> torch.Tensor:
        """The logits [V] the choice is made from (a copy where anything changes)."""
        if self.logit_bias:
            logits = logits.clone()
            for tok, bias in self.logit_bias.items():
                logits[tok] += bias
        if generated and (self.presence_penalty or self.frequency_penalty):
            counts = torch.bincount(torch.tensor(generated), minlength=logits.shape[-1]).to(logits.dtype)
            logits = logits - self.frequency_penalty * counts - self.presence_penalty * (counts > 0).to(logits.dtype)
        return logits

    def pick(self, logits: torch.Tensor, generator: torch.Generator) -> int:
        if self.temperature <= 0:
            return int(logits.argmax())
        probs = filter_logits(logits[None] / self.temperature, self.top_k, self.top_p).softmax(-1)
        return int(torch.multinomial(probs, 1, generator=generator))


@dataclass(eq=False)
class Sequence:
    """One row being generated: its prompt (token ids), limits, sampling and, as it goes, its tokens.

    A sequence ends at eos_id (not kept in tokens), once stop(tokens) is true, or after max_new_tokens;
    finish_reason is then "stop" (eos or the stop hook) or "length", and "cancelled" when the caller drops
    it. logprobs: how many of the most likely alternatives to report per token, from the model's own
    distribution (before temperature, penalties or bias); None computes none."""

    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling = Sampling()
    eos_id: int | None = None
    stop: Callable[[list[int]], bool] | None = None
    logprobs: int | None = None
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        seed = self.sampling.seed if self.sampling.seed is not None else random.SystemRandom().getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed)


@dataclass
class Step:
    """What one decoding step did for a sequence: the token it appended (None when it met eos), that
    token's log-probability and the top alternatives (token id, log-probability) when logprobs were asked."""

    seq: Sequence
    token: int | None
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _choose(seqs: list[Sequence], logits: torch.Tensor) -> list[Step]:
    """Each sequence's next token from its row of logits [n, V] (float32, cpu); ends the sequences that finish."""
    steps = []
    logprobs = logits.log_softmax(-1) if any(s.logprobs is not None for s in seqs) else None
    for i, (s, row) in enumerate(zip(seqs, logits)):
        tok = s.sampling.pick(s.sampling.adjust(row, s.tokens), s.generator)
        lp = top = None
        if s.logprobs is not None:
            lp = float(logprobs[i, tok])
            if s.logprobs > 0:
                vals, ids = logprobs[i].topk(min(s.logprobs, row.shape[-1]))
                top = list(zip(ids.tolist(), vals.tolist()))
        if tok == s.eos_id:
            s.finish_reason = "stop"
            steps.append(Step(s, None, lp, top))
            continue
        s.tokens.append(tok)
        if s.stop is not None and s.stop(s.tokens):
            s.finish_reason = "stop"
        elif len(s.tokens) >= s.max_new_tokens:
            s.finish_reason = "length"
        steps.append(Step(s, tok, lp, top))
    return steps


def _fed(steps: list[Step]) -> torch.Tensor:
    """The token each row feeds next (a row that met eos has left the batch; 0 stands in for it)."""
    return torch.tensor([0 if st.token is None else st.token for st in steps], dtype=torch.long)


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, T] and segment ids [B, T] (-1 = padding) of left-padded prompts."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    seg = torch.full((len(prompts), longest), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        seg[i, longest - len(p):] = 0
    return ids.to(device), seg.to(device)


def check_prompts(prompts: list[list[int]]) -> None:
    empty = [i for i, p in enumerate(prompts) if not len(p)]
    if empty:
        raise HiermemError(f"prompt {empty[0] + 1} of {len(prompts)} is empty (no tokens to continue)")


# -- batches that change: memory rows and KV caches stacked and selected ------------------------------------


def stack_memory(pieces: list[tuple[FetchedMemory | None, int]]) -> FetchedMemory | None:
    """One FetchedMemory for the rows of several batches, in order; (None, n) are n rows without memory.
    A part (same name) of several pieces becomes one: its blocks concatenated, the later indices shifted."""
    if all(m is None for m, _ in pieces):
        return None
    ref = next(m for m, _ in pieces if m is not None)
    total = sum(n for _, n in pieces)
    merged: dict[str, tuple[int, list[torch.Tensor], torch.Tensor]] = {}
    start = 0
    for m, n in pieces:
        for p in (m.parts if m is not None else []):
            offset, weights, index = merged.setdefault(p.name, (p.offset, [], torch.full((total,), -1)))
            shift = sum(len(w) for w in weights)
            index[start:start + n] = torch.where(p.index >= 0, p.index + shift, -1)
            weights.append(p.weights)
        start += n
    parts = [MemoryPart(torch.cat(w), index, offset, name) for name, (offset, w, index) in merged.items()]
    return ref.with_parts(parts)


def take_memory(memory: FetchedMemory | None, rows: torch.Tensor) -> FetchedMemory | None:
    """The memory of rows (cpu int64) only, keeping just the blocks they use; None if none uses any."""
    if memory is None:
        return None
    parts = []
    for p in memory.parts:
        index = p.index[rows]
        used = torch.unique(index[index >= 0])
        if len(used):
            remap = torch.searchsorted(used, index.clamp(min=0))
            parts.append(MemoryPart(p.weights[used.to(p.weights.device)], torch.where(index >= 0, remap, -1),
                                    p.offset, p.name))
    return memory.with_parts(parts) if parts else None


def layer_major(memory: FetchedMemory | None) -> FetchedMemory | None:
    """The same memory with each part's blocks stored layer by layer, so that the per-layer view the model
    gathers rows from (weights[:, j]) is contiguous: gathering from the strided view of a [U, layers, ...]
    tensor is far slower (about 70x for a d-256 block on a CPU), and decoding gathers at every step."""
    if memory is None:
        return None
    parts = [MemoryPart(p.weights.transpose(0, 1).contiguous().transpose(0, 1), p.index, p.offset, p.name)
             for p in memory.parts]
    return memory.with_parts(parts)


def _stack_caches(a: KVCache, b: KVCache) -> KVCache:
    """a's rows then b's, the shorter left-padded with never-attended positions (segment -1)."""
    ta, tb = a.segments.shape[1], b.segments.shape[1]
    t = max(ta, tb)

    def pad(x: torch.Tensor, n: int, value: float) -> torch.Tensor:  # left-pad dim 2 (keys) or 1 (segments)
        if n == 0:
            return x
        shape = list(x.shape)
        dim = 2 if x.dim() == 4 else 1
        shape[dim] = n
        return torch.cat([torch.full(shape, value, dtype=x.dtype, device=x.device), x], dim)

    keys = [torch.cat([pad(ka, t - ta, 0), pad(kb, t - tb, 0)]) for ka, kb in zip(a.keys, b.keys)]
    values = [torch.cat([pad(va, t - ta, 0), pad(vb, t - tb, 0)]) for va, vb in zip(a.values, b.values)]
    segments = torch.cat([pad(a.segments, t - ta, -1), pad(b.segments, t - tb, -1)])
    return KVCache(keys, values, segments)


def _take_cache(cache: KVCache, rows: torch.Tensor) -> KVCache:
    """Rows of a cache, without the leading positions that are padding in every one of them."""
    rows = rows.to(cache.segments.device)
    segments = cache.segments[rows]
    real = (segments >= 0).any(0).nonzero()
    first = int(real[0]) if len(real) else segments.shape[1]
    keep = slice(first, None)
    return KVCache([k[rows][:, :, keep] for k in cache.keys], [v[rows][:, :, keep] for v in cache.values],
                   segments[:, keep])


class BatchDecoder:
    """KV-cached decoding of a set of sequences that changes between steps (see the module docstring).

    add() prefills new sequences and picks their first tokens, step() appends one token to every running
    sequence, drop() removes sequences; finished sequences leave the batch on their own. The caller owns
    the order of events; this class does no threading."""

    def __init__(self, model: Transformer):
        self.model = model
        self.device = next(model.parameters()).device
        self.seqs: list[Sequence] = []
        self.cache: KVCache | None = None
        self.memory: FetchedMemory | None = None
        self._lengths = torch.zeros(0, dtype=torch.long)  # tokens in the cache per row
        self._last = torch.zeros(0, dtype=torch.long)  # each row's newest token, fed at the next step

    @torch.no_grad()
    def add(self, seqs: list[Sequence], memory: FetchedMemory | None = None) -> list[Step]:
        """Prefill seqs (memory: their rows, in order, or None) and choose their first tokens."""
        if not seqs:
            return []
        check_prompts([s.prompt for s in seqs])
        limit = self.model.cfg.max_seq_len
        for s in seqs:
            if s.max_new_tokens < 1:
                raise HiermemError(f"max_new_tokens must be at least 1, got {s.max_new_tokens}")
            if len(s.prompt) + s.max_new_tokens - 1 > limit:
                raise HiermemError(f"a prompt of {len(s.prompt)} tokens plus {s.max_new_tokens} new ones exceeds "
                                   f"the model's context of {limit} tokens")
        ids, seg = _left_pad([s.prompt for s in seqs], self.device)
        pos = ((seg >= 0).long().cumsum(1) - 1).clamp(min=0)
        memory = layer_major(memory)
        cache = KVCache()
        logits, _ = self.model(ids, positions=pos, segment_ids=seg, memory=memory, cache=cache)
        steps = _choose(seqs, logits[:, -1].float().cpu())
        if self.seqs:
            cache = _stack_caches(self.cache, cache)
            memory = layer_major(stack_memory([(self.memory, len(self.seqs)), (memory, len(seqs))]))
        self.cache, self.memory, self.seqs = cache, memory, self.seqs + list(seqs)
        self._lengths = torch.cat([self._lengths, torch.tensor([len(s.prompt) for s in seqs])])
        self._last = torch.cat([self._last, _fed(steps)])
        self._keep(lambda s: s.finish_reason is None)
        return steps

    @torch.no_grad()
    def step(self) -> list[Step]:
        """One token for every running sequence."""
        if not self.seqs:
            return []
        x = self._last[:, None].to(self.device)
        pos = self._lengths[:, None].to(self.device)
        logits, _ = self.model(x, positions=pos, segment_ids=torch.zeros_like(x), memory=self.memory,
                               cache=self.cache)
        self._lengths = self._lengths + 1
        steps = _choose(self.seqs, logits[:, -1].float().cpu())
        self._last = _fed(steps)
        self._keep(lambda s: s.finish_reason is None)
        return steps

    def drop(self, seqs: list[Sequence]) -> None:
        """Remove running sequences (a cancelled request): they end with finish_reason "cancelled"."""
        gone = {id(s) for s in seqs}
        for s in self.seqs:
            if id(s) in gone:
                s.finish_reason = "cancelled"
        self._keep(lambda s: id(s) not in gone)

    def _keep(self, wanted: Callable[[Sequence], bool]) -> None:
        keep = [i for i, s in enumerate(self.seqs) if wanted(s)]
        if len(keep) == len(self.seqs):
            return
        rows = torch.tensor(keep, dtype=torch.long)
        self.seqs = [self.seqs[i] for i in keep]
        self._lengths, self._last = self._lengths[rows], self._last[rows]
        if keep:
            self.cache, self.memory = _take_cache(self.cache, rows), layer_major(take_memory(self.memory, rows))
        else:
            self.cache = self.memory = None


class TextStream:
    """The text of a sequence's new tokens as it grows, ending at the first stop string (not included).

    Used as a Sequence's stop hook: called with the tokens so far, it is true once a stop string appeared.
    take() returns the text that became final since the last call: text that may still turn into the start
    of a stop string, or an unfinished UTF-8 character, is held back until it cannot (or the sequence ends)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | tuple[str, ...] = ()):
        self.decode, self.stops = decode, [s for s in stops if s]
        self._text, self._sent, self.stopped = "", 0, False

    def __call__(self, tokens: list[int]) -> bool:
        text = self.decode(tokens)
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            text, self.stopped = text[:min(cuts)], True
        self._text = text
        return self.stopped

    @property
    def text(self) -> str:
        return self._text

    def take(self, final: bool = False) -> str:
        end = len(self._text)
        if not (final or self.stopped):
            end -= self._held_back()
        delta = self._text[self._sent:end] if end > self._sent else ""
        self._sent = max(self._sent, end)
        return delta

    def _held_back(self) -> int:
        """Characters at the end that must wait: a proper prefix of a stop string, or replacement characters
        of a token that decoded to an unfinished UTF-8 sequence."""
        t = self._text
        n = len(t) - len(t.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, len(t)), n, -1):
                if t.endswith(s[:k]):
                    n = k
                    break
        return n


@torch.no_grad()
def _recompute(model: Transformer, seqs: list[Sequence], memory: FetchedMemory | None) -> None:
    """The cache-free path: every step reruns the whole (left-padded) batch over the last max_seq_len tokens."""
    device = next(model.parameters()).device
    limit = model.cfg.max_seq_len
    ids, seg = _left_pad([s.prompt for s in seqs], device)
    while True:
        window = slice(max(0, ids.shape[1] - limit), None)  # keep within the RoPE/context budget
        x, s = ids[:, window], seg[:, window]
        pos = ((s >= 0).long().cumsum(1) - 1).clamp(min=0)
        logits, _ = model(x, positions=pos, segment_ids=s, memory=memory)
        logits = logits[:, -1].float().cpu()
        live = [i for i, q in enumerate(seqs) if q.finish_reason is None]
        steps = dict(zip(live, _choose([seqs[i] for i in live], logits[live])))
        if all(q.finish_reason is not None for q in seqs):
            return
        nxt = _fed([steps.get(i, Step(q, None)) for i, q in enumerate(seqs)]).to(device)
        ids = torch.cat([ids, nxt[:, None]], 1)
        seg = torch.cat([seg, torch.zeros(len(seqs), 1, dtype=torch.long, device=device)], 1)


def generate_ids(model: Transformer, prompts: list[list[int]], memory: FetchedMemory | None = None,
                 max_new_tokens: int = 16, eos_id: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_fn=None, use_cache: bool = True) -> list[list[int]]:
    """Continue each prompt (token ids). A row stops at eos (dropped) or once stop_fn(row, new_ids) is true;
    decoding ends when every row has stopped or after max_new_tokens. Every row samples with its own generator
    seeded with `seed`, so a row generates what it would alone."""
    check_prompts(prompts)
    sampling = Sampling(temperature, top_k, top_p, seed)
    seqs = [Sequence(list(p), max_new_tokens, sampling, eos_id,
                     stop=None if stop_fn is None else (lambda new, i=i: stop_fn(i, new)))
            for i, p in enumerate(prompts)]
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    if use_cache and max(len(p) for p in prompts) + max_new_tokens - 1 <= model.cfg.max_seq_len:  # no window slides
        decoder = BatchDecoder(model)
        decoder.add(seqs, memory)
        while decoder.seqs:
            decoder.step()
    else:
        _recompute(model, seqs, layer_major(memory))
    return [s.tokens for s in seqs]
