"""Batched text generation: greedy or sampled (temperature, top-k, top-p), with optional fetched memory.

Prompts of different lengths are left-padded; padding is its own masked segment and positions start at 0 on
each prompt's first real token, so a padded prompt decodes exactly as it would alone. With a KV cache the
prompts run once and each step feeds one token per row; a continuation that would outgrow the model's context
(model.max_seq_len) instead recomputes a sliding window of the last max_seq_len tokens at every step.
"""

from __future__ import annotations

import torch

from hiermem.errors import HiermemError
from hiermem.model import FetchedMemory
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


@torch.no_grad()
def generate_ids(model: Transformer, prompts: list[list[int]], memory: FetchedMemory | None = None,
                 max_new_tokens: int = 16, eos_id: int | None = None, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_fn=None, use_cache: bool = True) -> list[list[int]]:
    """Continue each prompt (token ids). A row stops at eos (dropped) or once stop_fn(row, new_ids) is true;
    decoding ends when every row has stopped or after max_new_tokens."""
    device = next(model.parameters()).device
    empty = [i for i, p in enumerate(prompts) if not len(p)]
    if empty:
        raise HiermemError(f"prompt {empty[0] + 1} of {len(prompts)} is empty (no tokens to continue)")
    B = len(prompts)
    longest = max(len(p) for p in prompts)
    limit = model.cfg.max_seq_len
    ids = torch.zeros(B, longest, dtype=torch.long)
    seg = torch.full((B, longest), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = torch.tensor(p)
        seg[i, longest - len(p):] = 0
    ids, seg = ids.to(device), seg.to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out: list[list[int]] = [[] for _ in range(B)]
    cache = KVCache() if use_cache and longest + max_new_tokens - 1 <= limit else None  # no window slides
    pos = None
    for step in range(max_new_tokens):
        if cache is not None and step > 0:  # the cache holds everything before: feed the new token only
            x, s, pos = ids[:, -1:], seg[:, -1:], (seg >= 0).sum(1, keepdim=True) - 1
        else:
            window = slice(max(0, ids.shape[1] - limit), None)  # keep within the RoPE/context budget
            x, s = ids[:, window], seg[:, window]
            pos = ((s >= 0).long().cumsum(1) - 1).clamp(min=0)
        logits, _ = model(x, positions=pos, segment_ids=s, memory=memory, cache=cache)
        logits = logits[:, -1].float()
        if temperature <= 0:
            nxt = logits.argmax(-1)
        else:
            probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        for i in range(B):
            if not done[i]:
                out[i].append(int(nxt[i]))
                if stop_fn is not None and stop_fn(i, out[i]):
                    done[i] = True
        if eos_id is not None:
            done |= nxt == eos_id
        if bool(done.all()):
            break
        ids = torch.cat([ids, nxt[:, None]], 1)
        seg = torch.cat([seg, torch.zeros(B, 1, dtype=torch.long, device=device)], 1)
    if eos_id is not None:
        out = [o[: o.index(eos_id)] if eos_id in o else o for o in out]
    return out
