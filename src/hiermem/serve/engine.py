"""Request batching: one thread owns the model and decodes every running sequence together.

HTTP handlers (on the asyncio event loop) submit Jobs, one per request, each with one or more Choices (one
sequence each: n per prompt). The engine thread admits waiting jobs between decoding steps, as many as the
batch has free rows (`max_batch`): it embeds their routing texts in one call, routes them (per router and
blocking level), fetches every memory row in one fetch() - paths that differ, the generic block and rows
without memory alike - puts the retrieved training documents before the prompts that ask for them (`rag`),
and prefills them as one batch that then joins the running one (eval/generation.py
BatchDecoder). Requests that arrive while the engine is idle are given `batch_wait_s` to arrive together.
Each step's tokens go back to the handlers' queues through the loop (call_soon_threadsafe).

Limits answer at once instead of queueing without bound: beyond `max_batch` running plus `max_waiting`
waiting sequences a request is refused with 429. A cancelled job (its client went away) leaves the batch at
the next step, freeing its rows. The bank is read only through fetch(), so a bank on disk is read through its
block cache (memory.cache_bytes), as in training.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from hiermem.errors import HiermemError
from hiermem.eval.generation import BatchDecoder, Sequence, Step, TextStream, stack_memory
from hiermem.eval.inference import MemoryContext
from hiermem.eval.rag import Rag, make_rag
from hiermem.eval.run import Run
from hiermem.memory.fetch import fetch
from hiermem.routing.clustering import embedder_for
from hiermem.serve.metrics import Metrics
from hiermem.serve.protocol import APIError

log = logging.getLogger("hiermem.serve")


@dataclass(eq=False)
class Choice:
    """One sequence of a request and how its memory is chosen; path is filled in when it is routed."""

    index: int
    seq: Sequence
    text: TextStream
    memory: str  # fetched | generic | none
    router: str
    block_level: int | None
    route_text: str
    rag: int = 0  # training documents retrieved and put before the prompt (eval/rag.py)
    path: list[int] | None = None
    documents: list[int] | None = None  # the retrieved documents' ids, nearest first, when rag > 0
    unsent: list[Step] = field(default_factory=list)  # tokens whose text is still held back

    def route(self) -> dict:
        out = {"memory": self.memory, "router": self.router if self.memory == "fetched" else None,
               "block_level": self.block_level if self.memory == "fetched" else None, "path": self.path}
        if self.rag:
            out["rag"] = {"k": self.rag, "documents": self.documents}
        return out


@dataclass
class Admitted:
    """The job's sequences are prefilled: where its time went (seconds) and each choice's route."""

    timing: dict[str, float]


@dataclass
class Delta:
    """New text of a choice (and the tokens it came from); finish_reason once the choice has ended."""

    choice: Choice
    text: str
    steps: list[Step]
    finish_reason: str | None


@dataclass
class Failed:
    error: APIError


class Job:
    """One request on its way through the engine. Create it on the event loop that will read its events."""

    def __init__(self, choices: list[Choice], prompt_tokens: int):
        self.choices, self.prompt_tokens = choices, prompt_tokens
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.cancelled = False
        self.timing: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self.choices)

    def emit(self, event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            pass


class Engine:
    def __init__(self, run: Run, metrics: Metrics, max_batch: int = 16, max_waiting: int = 64,
                 batch_wait_s: float = 0.005):
        if max_batch < 1 or max_waiting < 0:
            raise HiermemError(f"serve: --max-batch must be >= 1 and --max-waiting >= 0, got {max_batch}, "
                               f"{max_waiting}")
        self.run, self.metrics = run, metrics
        self.max_batch, self.max_waiting, self.batch_wait_s = max_batch, max_waiting, batch_wait_s
        self.decoder = BatchDecoder(run.model)
        self._contexts: dict[str, MemoryContext] = {}
        self._rags: dict[int, Rag] = {}
        self._embedder = None
        self._pending: deque[Job] = deque()
        self._calls: list[tuple[Callable[[], Any], asyncio.Future, asyncio.AbstractEventLoop]] = []
        self._owner: dict[int, tuple[Job, Choice]] = {}  # id(sequence) -> its job and choice
        self._cond = threading.Condition()
        self.waiting = self.running = 0  # sequences
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- the event loop's side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="hiermem-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a job, or refuse it with 429 when the server is full."""
        if len(job) > self.max_batch:
            raise APIError(400, f"this request asks for {len(job)} sequences (prompts x n); the server decodes at "
                                f"most {self.max_batch} at once", param="n")
        with self._cond:
            if self.running + self.waiting + len(job) > self.max_batch + self.max_waiting:
                raise APIError(429, f"the server is full ({self.running} sequences running, {self.waiting} "
                                    "waiting); retry later", type="rate_limit_error", code="rate_limit_exceeded")
            self._pending.append(job)
            self.waiting += len(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client went away: its sequences leave the batch (or the queue) before the next step."""
        with self._cond:
            job.cancelled = True
            if job in self._pending:  # still queued: its place is free at once
                self._pending.remove(job)
                self.waiting -= len(job)
            self._cond.notify_all()

    async def call(self, fn: Callable[[], Any]) -> Any:
        """Run fn on the engine thread between two steps (the model, the encoder and the routers are its own)."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        with self._cond:
            self._calls.append((fn, fut, loop))
            self._cond.notify_all()
        return await fut

    @property
    def embedder(self):
        """The run's routing encoder (loaded on first use, on the engine thread)."""
        if self._embedder is None:
            self._embedder = embedder_for(self.run.cfg)
        return self._embedder

    def context(self, router: str) -> MemoryContext:
        """The router of that name (built on first use, on the engine thread)."""
        if router not in self._contexts:
            ctx = MemoryContext(self.run, "fetched" if self.run.bank is not None else "none", router)
            ctx.router  # noqa: B018 - built now: one that cannot be built fails the request that asked for it
            self._contexts[router] = ctx
        return self._contexts[router]

    def rag(self, k: int) -> Rag:
        """Retrieval of k documents (built on first use, on the engine thread), with the engine's encoder."""
        if k not in self._rags:
            ctx = self.context("knn") if self.run.tree is not None else MemoryContext(self.run, "none", "knn")
            self._rags[k] = make_rag(self.run, ctx, k, embedder=self.embedder)
        return self._rags[k]

    # -- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._pending or self._calls or self.decoder.seqs):
                    self._cond.wait()
                if self._stopping:
                    break
                if self._pending and not self.decoder.seqs and self.batch_wait_s > 0:
                    self._cond.wait(self.batch_wait_s)  # requests that arrive together are prefilled together
                calls, self._calls = self._calls, []
                admit = self._take()
            for fn, fut, loop in calls:
                self._answer(fn, fut, loop)
            try:
                self._drop_cancelled()
                if admit:
                    self._admit(admit)
                if self.decoder.seqs:
                    self.metrics.observe("hiermem_batch_sequences", len(self.decoder.seqs))
                    self._publish(self.decoder.step())
            except Exception:  # a bug, not bad input: fail what is running, keep serving
                log.exception("decoding failed")
                self._fail_running(APIError(500, "internal error while generating", type="server_error"))
            with self._cond:
                self.running = len(self.decoder.seqs)

    def _take(self) -> list[Job]:
        """Waiting jobs (first come, first served) that fit in the batch's free rows."""
        room, out = self.max_batch - len(self.decoder.seqs), []
        while self._pending and len(self._pending[0]) <= room:
            job = self._pending.popleft()
            self.waiting -= len(job)
            out.append(job)
            room -= len(job)
        self.running = len(self.decoder.seqs) + sum(len(j) for j in out)
        return out

    @staticmethod
    def _answer(fn, fut: asyncio.Future, loop: asyncio.AbstractEventLoop) -> None:
        def done(result=None, error=None) -> None:
            if not fut.done():
                fut.set_exception(error) if error is not None else fut.set_result(result)

        try:
            result = fn()
        except Exception as e:  # handed to the caller, which answers the request
            loop.call_soon_threadsafe(done, None, e)
        else:
            loop.call_soon_threadsafe(done, result)

    def _drop_cancelled(self) -> None:
        gone = [s for s in self.decoder.seqs if self._owner[id(s)][0].cancelled]
        if gone:
            self.decoder.drop(gone)
            for s in gone:
                del self._owner[id(s)]

    def _admit(self, jobs: list[Job]) -> None:
        start = time.perf_counter()
        ready = []
        for job in jobs:
            job.timing["queue_s"] = start - job.arrival
            try:
                param = "router"
                for c in job.choices:
                    if c.memory == "fetched":
                        self.context(c.router)
                param = "rag"
                for c in job.choices:
                    if c.rag:
                        self.rag(c.rag)
                ready.append(job)
            except HiermemError as e:
                job.emit(Failed(APIError(400, str(e), param=param)))
        if not ready:
            return
        try:
            stages, memory, order = self._memory_for([c for j in ready for c in j.choices])
            retrieving = [c for c in order if c.rag]
            if retrieving:
                t = time.perf_counter()
                self._retrieve(retrieving)
                stages["retrieve_s"] = time.perf_counter() - t
            t = time.perf_counter()
            steps = self.decoder.add([c.seq for c in order], memory)
            stages["prefill_s"] = time.perf_counter() - t
        except Exception as e:  # these jobs fail; the running ones and the server go on
            if isinstance(e, HiermemError):
                error = APIError(400, str(e))
            else:
                log.exception("admitting requests failed")
                error = APIError(500, "internal error while preparing the request", type="server_error")
            for job in ready:
                job.emit(Failed(error))
            return
        for job in ready:
            for c in job.choices:
                self._owner[id(c.seq)] = (job, c)
            job.timing.update(stages, ttft_s=time.perf_counter() - job.arrival)
            for stage, seconds in job.timing.items():
                self.metrics.observe("hiermem_stage_seconds", seconds, stage=stage.removesuffix("_s"))
            job.emit(Admitted(dict(job.timing)))
        self._publish(steps)

    def _memory_for(self, choices: list[Choice]):
        """Route the choices that fetch (one encoder call; one route per router and blocking level) and fetch
        every memory row at once. Returns the stage timings, the memory and the choices in its row order."""
        t0 = time.perf_counter()
        routed = [c for c in choices if c.memory == "fetched"]
        texts = list(dict.fromkeys(c.route_text for c in routed))
        emb = self.embedder.encode(texts) if texts else None
        t1 = time.perf_counter()
        row = {text: i for i, text in enumerate(texts)}
        groups: dict[tuple[str, int | None], list[Choice]] = {}
        for c in routed:
            groups.setdefault((c.router, c.block_level), []).append(c)
        for (router, level), group in groups.items():
            paths = self.context(router).router.route(emb[[row[c.route_text] for c in group]], block_level=level)
            for c, p in zip(group, paths):
                c.path = [int(x) for x in p]
        t2 = time.perf_counter()
        with_memory = [c for c in choices if c.memory != "none"]
        without = [c for c in choices if c.memory == "none"]
        memory = None
        if with_memory:
            depth = self.run.tree.depth
            paths = np.array([c.path if c.memory == "fetched" else [0] * depth for c in with_memory], np.int64)
            generic = np.array([c.memory == "generic" for c in with_memory])
            f = fetch(self.run.bank, paths, generic, device=self.run.device)
            self.metrics.inc("hiermem_bank_fetched_bytes_total", f.nbytes)
            memory = stack_memory([(f.memory, len(with_memory)), (None, len(without))])
        t3 = time.perf_counter()
        return {"embed_s": t1 - t0, "route_s": t2 - t1, "fetch_s": t3 - t2}, memory, with_memory + without

    def _retrieve(self, choices: list[Choice]) -> None:
        """Put each choice's retrieved documents before its prompt: one search per (k, completion length)."""
        groups: dict[tuple[int, int], list[Choice]] = {}
        for c in choices:
            groups.setdefault((c.rag, c.seq.max_new_tokens), []).append(c)
        for (k, max_new), group in groups.items():
            prompts, docs = self.rag(k).augment_with_ids([c.route_text for c in group], [c.seq.prompt for c in group],
                                                         max_new)
            for c, prompt, ids in zip(group, prompts, docs):
                c.seq.prompt, c.documents = prompt, ids

    def _publish(self, steps: list[Step]) -> None:
        for st in steps:
            job, c = self._owner[id(st.seq)]
            if st.token is not None:
                c.unsent.append(st)
                self.metrics.inc("hiermem_generation_tokens_total")
            final = st.seq.finish_reason is not None
            text = c.text.take(final)
            if text or final:
                job.emit(Delta(c, text, c.unsent, st.seq.finish_reason))
                c.unsent = []
            if final:
                del self._owner[id(st.seq)]

    def _fail_running(self, error: APIError) -> None:
        for job in {id(j): j for j, _ in self._owner.values()}.values():
            job.emit(Failed(error))
        self._owner.clear()
        self.decoder = BatchDecoder(self.run.model)


__all__ = ["Admitted", "Choice", "Delta", "Engine", "Failed", "Job"]
