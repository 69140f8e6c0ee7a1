"""Tokenising raw document records, in this process or in a pool of worker processes, results in order.

A batch is (format, raw records) as data/shards.py reads them; the worker decodes the texts (JSON
parsing included, so the main process only moves bytes) and encodes them with the tokenizer's
encode_batch, itself multi-threaded (with workers > 1, each worker gets cores / workers threads).
`Encoder.map` yields each batch's (tokens, lengths) in submission order and keeps at most 2 x workers
batches in flight, so memory does not depend on the corpus. The tokens are the same for any number of
workers: each text is encoded on its own, by the same tokenizer.
"""

from __future__ import annotations

import itertools
import multiprocessing as mp
import os
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Iterable, Iterator, Sequence

import numpy as np

from hiermem.data.readers import decode_raw
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError

Batch = tuple[str, Sequence[bytes | str]]

_worker_tok: Tokenizer | None = None
_worker_dtype: np.dtype | None = None


def encode_records(tok: Tokenizer, fmt: str, raws: Sequence[bytes | str], dtype) -> tuple[np.ndarray, np.ndarray]:
    """(all tokens of the batch, flat, in dtype; tokens per document)."""
    ids = tok.encode_batch([decode_raw(fmt, r) for r in raws])
    lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return flat, lengths


def _init(tokenizer_json: str, dtype: str, workers: int) -> None:
    global _worker_tok, _worker_dtype
    # tokenizers' own thread pool, sized to this worker's share of the cores (read when the pool starts)
    os.environ["RAYON_NUM_THREADS"] = str(max(1, len(os.sched_getaffinity(0)) // workers))
    from tokenizers import Tokenizer as _HF

    _worker_tok = Tokenizer(_HF.from_str(tokenizer_json))
    _worker_dtype = np.dtype(dtype)


def _encode(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    return encode_records(_worker_tok, batch[0], batch[1], _worker_dtype)


class Encoder:
    """`map(batches)`: (tokens, lengths) per batch, in order; workers > 1 encodes in that many processes."""

    def __init__(self, tok: Tokenizer, workers: int, dtype):
        self.tok, self.workers, self.dtype = tok, workers, np.dtype(dtype)
        self._pool = None
        if workers > 1:  # spawn: a forked child would inherit tokenizers' thread pool (and disable it)
            self._pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init,
                                             initargs=(tok.to_json(), self.dtype.str, workers))

    def map(self, batches: Iterable[Batch]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        if self._pool is None:
            for fmt, raws in batches:
                yield encode_records(self.tok, fmt, raws, self.dtype)
            return
        pending: deque = deque()
        try:
            for batch in batches:
                pending.append(self._pool.submit(_encode, batch))
                if len(pending) >= 2 * self.workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BrokenProcessPool as e:
            raise HiermemError(f"a tokenizer worker process died ({e}); a script that runs prepare with data.workers "
                               f"> 1 must guard its entry point with `if __name__ == \"__main__\":`") from None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "Encoder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
