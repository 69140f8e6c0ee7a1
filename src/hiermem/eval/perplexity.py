"""Held-out perplexity per document: each document (plus its end token) is cut into windows of seq_len + 1
tokens, every window uses its document's memory (routed once per document, as the paper does for Wiki-En)."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from hiermem.model import FetchedMemory
from hiermem.model.transformer import Transformer


@torch.no_grad()
def perplexity(model: Transformer, docs: Sequence[np.ndarray], eos_id: int, seq_len: int,
               memory_for: Callable[[np.ndarray], FetchedMemory | None] | None = None, batch_size: int = 32,
               progress: bool = False) -> dict:
    """docs: token arrays; memory_for(doc_indices) -> memory for those windows' documents (or None)."""
    device = next(model.parameters()).device
    windows, owners = [], []
    for d, toks in enumerate(docs):
        stream = np.concatenate([np.asarray(toks, dtype=np.int64), [eos_id]])
        for lo in range(0, len(stream) - 1, seq_len):
            windows.append(stream[lo: lo + seq_len + 1])
            owners.append(d)
    owners = np.asarray(owners)
    nll, count = 0.0, 0
    for lo in tqdm(range(0, len(windows), batch_size), desc="perplexity", disable=not progress):
        chunk = windows[lo: lo + batch_size]
        width = max(len(w) for w in chunk) - 1
        x = torch.zeros(len(chunk), width, dtype=torch.long)
        y = torch.full((len(chunk), width), -100, dtype=torch.long)
        for i, w in enumerate(chunk):
            x[i, : len(w) - 1] = torch.from_numpy(w[:-1])
            y[i, : len(w) - 1] = torch.from_numpy(w[1:])
        memory = memory_for(owners[lo: lo + batch_size]) if memory_for is not None else None
        logits, _ = model(x.to(device), memory=memory)
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.to(device).reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        nll += float(loss)
        count += int((y != -100).sum())
    mean = nll / max(1, count)
    return {"loss": mean, "ppl": math.exp(mean), "tokens": count, "docs": len(docs)}
