"""Retrieval-augmented generation over the run's own index (`hiermem eval/generate --rag K`).

The prompt is embedded with the run's routing encoder and its K nearest TRAINING documents are looked up in
the knn router's faiss index (routing/routers.py KnnRouter: the training documents' embeddings, cosine
similarity); no second index is built. Their texts are read from the data directory's document index,
tokenised with the run's tokenizer and put before the prompt:

    doc_K <eos> ... doc_2 <eos> doc_1 <eos> prompt        (doc_1 = the nearest, right before the prompt)

<eos> is the separator that ends every document in the training data (data/packing.py). The context budget is
model.max_seq_len - len(prompt) - max_new_tokens: documents are taken nearest first; the first one that does
not fit whole keeps its head (the entity is usually named first) and the rest are dropped.

Positions and segments: retrieved text and prompt are one attention segment with positions 0, 1, ... running
through all of it (generation treats the result as one longer prompt); separate segments would hide the
documents from the prompt. Training never attends across documents (each packed document is its own segment
and restarts at position 0), so this is a context the model has not seen in training; the prompt also sits at
later positions than in training. Only generation (probes, `generate`) is retrieval-augmented: held-out
perplexity is measured without RAG. Memory routing is unchanged and uses the prompt only.

A memory run with the knn router shares that router (one index); with another router a knn router is built
from the same clustering. An anchor run has no tree of its own: it uses the clustering of its data directory
(a memory run trained on the same data, as in the long-tail demo, leaves one there).
"""

from __future__ import annotations

import numpy as np

from hiermem.data.prepare import DataDir
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError
from hiermem.eval.inference import MemoryContext
from hiermem.eval.run import Run
from hiermem.routing.clustering import load_clustering
from hiermem.routing.embedders import l2_normalize
from hiermem.routing.routers import KnnRouter, make_router


def build_context(docs: list[list[int]], prompt: list[int], max_seq_len: int, max_new_tokens: int,
                  sep_id: int) -> list[int]:
    """The prompt with retrieved documents `docs` (token ids, nearest first) before it, within
    max_seq_len - len(prompt) - max_new_tokens tokens (separators included); see the module docstring."""
    room = max_seq_len - len(prompt) - max_new_tokens
    pieces = []
    for doc in docs:
        if not doc:
            continue  # an empty document adds nothing but a separator
        if room < 2:  # not even one token of a document besides its separator
            break
        take = list(doc[:room - 1])
        pieces.append(take + [sep_id])
        room -= len(take) + 1
        if len(take) < len(doc):  # truncated: nothing more fits
            break
    return [t for piece in reversed(pieces) for t in piece] + list(prompt)


class Retriever:
    """The nearest training documents of texts, searched in a knn router's index (which answers document ids)."""

    def __init__(self, router: KnnRouter, embedder, data: DataDir):
        is_val = data.is_val()
        n_train = len(is_val) - int(np.count_nonzero(is_val))
        if router.index.ntotal != n_train:
            raise HiermemError(f"{data.path}: the knn index holds {router.index.ntotal} documents, the split "
                               f"{n_train} training documents (re-prepared since clustering?)")
        self.router, self.embedder, self.data = router, embedder, data

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """(document ids [n, k'], cosine similarities [n, k']), nearest first; k' = min(k, training documents);
        id -1 (similarity -inf) in the places a probing index found no more documents for."""
        q = np.ascontiguousarray(l2_normalize(self.embedder.encode(list(texts))))  # as KnnRouter.route
        sims, ids = self.router.index.search(q, k)
        return ids, sims


class Rag:
    """Prompts (texts and their token ids) -> the same prompts with their k nearest training documents."""

    def __init__(self, retriever: Retriever, tokenizer: Tokenizer, k: int, max_seq_len: int):
        self.retriever, self.tokenizer, self.k, self.max_seq_len = retriever, tokenizer, k, max_seq_len

    def augment(self, texts: list[str], prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        return self.augment_with_ids(texts, prompts, max_new_tokens)[0]

    def augment_with_ids(self, texts: list[str], prompts: list[list[int]], max_new_tokens: int
                         ) -> tuple[list[list[int]], list[list[int]]]:
        """(the augmented prompts, the retrieved training documents' ids per prompt, nearest first)."""
        if not texts:
            return [], []
        ids, _ = self.retriever.search(texts, self.k)
        rows = [[d for d in row if d >= 0] for row in ids.tolist()]  # -1: fewer found in a probing index
        wanted = sorted({d for row in rows for d in row})
        tokens = dict(zip(wanted, self.tokenizer.encode_batch(self.retriever.data.texts_at(wanted))))
        return [build_context([tokens[d] for d in row], p, self.max_seq_len, max_new_tokens, self.tokenizer.eos_id)
                for row, p in zip(rows, prompts)], rows


def _anchor_knn(run: Run, data: DataDir):
    """The clustering of an anchor run's data directory (it has no tree of its own), or a one-line error."""
    if not (data.path / "cluster" / "cluster.json").is_file():
        raise HiermemError(f"{run.path}: --rag needs a knn index, and this anchor run's data directory {data.path} "
                           f"has no cluster/cluster.json (run `hiermem cluster` on it with the run's routing config)")
    c = load_clustering(data, run.cfg, required=True)  # another routing config: its own one-line error
    return c.tree, c


def make_rag(run: Run, ctx: MemoryContext, k: int, embedder=None) -> Rag | None:
    """RAG with k documents for `run` (None when k is 0); ctx supplies the encoder (unless `embedder` is given)
    and, if knn, the index."""
    if k < 0:
        raise HiermemError(f"--rag must be 0 (off) or a number of documents, got {k}")
    if k == 0:
        return None
    data = run.data()
    if run.tree is not None:  # a memory run: its knn router (shared with routing when that is knn)
        router = ctx.router if ctx.router_name == "knn" else MemoryContext(run, "none", "knn").router
    else:  # the training documents of the data directory's clustering, memory-mapped
        tree, c = _anchor_knn(run, data)
        r = run.cfg.routing
        router = make_router("knn", tree, doc_emb=c.doc_emb(), doc_paths=c.doc_paths, k=r.knn_k, skip=data.is_val(),
                             ram_docs=r.knn_ram_docs, probe=r.knn_probe)
    return Rag(Retriever(router, embedder or ctx.embedder, data), run.tokenizer, k, run.model.cfg.max_seq_len)
