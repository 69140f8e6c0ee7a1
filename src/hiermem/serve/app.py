"""`hiermem serve RUN`: an OpenAI-compatible HTTP server for a trained run, with the memory explorer at `/`.

Endpoints: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events with "stream": true),
GET /v1/models, /health, /metrics (Prometheus text), POST /v1/route (the explorer's route and leaf documents),
GET / (the explorer page). Requests are checked here (protocol.py) and become engine Jobs (engine.py); every
choice of a response carries the route it took ("route": memory, router, block_level, path) and the response
how long its first token took, by stage ("timing"). Anything a client can get wrong answers with a 4xx and
OpenAI's error body; an internal failure answers 500 with the same body and no traceback.
"""

from __future__ import annotations

import asyncio
import json
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hiermem.errors import HiermemError
from hiermem.eval.generation import Sampling, Sequence, TextStream
from hiermem.eval.run import Run
from hiermem.serve.engine import Admitted, Choice, Delta, Engine, Failed, Job
from hiermem.serve.explore import Explorer
from hiermem.serve.metrics import Metrics
from hiermem.serve.protocol import (CHAT_STOP, MAX_RAG, APIError, ChatCompletionRequest, CompletionRequest,
                                    RouteRequest, bad_request, chat_logprobs, chat_prompt, checkpoint_chat_template,
                                    completion_logprobs, envelope, new_id, parse, usage)

STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # far above any prompt that fits a model's context
ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/route")


@dataclass
class Defaults:
    """What a request gets when it does not say: the server's --memory, --router, --block-level and --rag."""

    memory: str
    router: str
    block_level: int | None
    rag: int = 0


class _Limits:
    """ASGI middleware: refuses bodies over max_body bytes (413) and counts every request by endpoint and
    status, timed to its last byte (a stream included)."""

    def __init__(self, app, metrics: Metrics, max_body: int):
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        start, status = loop.time(), [500]
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        too_large = APIError(413, f"the request body exceeds {self.max_body} bytes", param=None,
                             code="request_too_large")
        received = [0]

        async def limited_receive():
            msg = await receive()
            if msg["type"] == "http.request":
                received[0] += len(msg.get("body", b""))
                if received[0] > self.max_body:
                    raise too_large
            return msg

        async def observed_send(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body:
                await _error_response(too_large)(scope, receive, observed_send)
            else:
                await self.app(scope, limited_receive, observed_send)
        finally:
            self.metrics.inc("hiermem_requests_total", endpoint=endpoint, status=str(status[0]))
            self.metrics.observe("hiermem_request_duration_seconds", loop.time() - start, endpoint=endpoint)


def _error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def check_defaults(run: Run, memory: str | None, router: str | None, block_level: int | None,
                   rag: int = 0) -> Defaults:
    """The server's defaults, refused in one line when the run cannot serve them."""
    if not 0 <= rag <= MAX_RAG:
        raise HiermemError(f"--rag must be 0 (off) or a number of documents up to {MAX_RAG}, got {rag}")
    mode = memory or ("fetched" if run.bank is not None else "none")
    if mode != "none" and run.bank is None:
        raise HiermemError(f"{run.path}: --memory {mode} needs a run trained with memory (this one has none)")
    if block_level is not None and (run.tree is None or not 0 <= block_level < run.tree.depth):
        depth = 0 if run.tree is None else run.tree.depth
        raise HiermemError(f"--block-level {block_level} is outside the tree's levels 0..{depth - 1}")
    return Defaults(mode, router or run.cfg.routing.router, block_level, rag)


class _Builder:
    """Requests -> engine Jobs: every check that needs the run (model name, memory, context length, tokens)."""

    def __init__(self, run: Run, defaults: Defaults, model_name: str):
        self.run, self.defaults, self.model_name = run, defaults, model_name
        self.tok, self.context = run.tokenizer, run.cfg.model.max_seq_len
        # a post-hoc run on a Hugging Face checkpoint talks in the checkpoint's own chat template, if it has one
        self.template = checkpoint_chat_template(run.cfg.model.hf) if run.cfg.model.hf else None

    def memory_of(self, req) -> tuple[str, str, int | None]:
        if req.model is not None and req.model != self.model_name:
            raise APIError(404, f"The model `{req.model}` does not exist.", param="model", code="model_not_found")
        mode = req.memory or self.defaults.memory
        if mode != "none" and self.run.bank is None:
            raise bad_request(f"memory: {mode!r} needs a run trained with memory; this one has none", "memory")
        level = req.block_level if req.block_level is not None else self.defaults.block_level
        if level is not None and mode == "fetched" and not level < self.run.tree.depth:
            raise bad_request(f"block_level: {level} is outside the tree's levels 0..{self.run.tree.depth - 1}",
                              "block_level")
        return mode, req.router or self.defaults.router, level

    def sampling(self, req, index: int) -> Sampling:
        return Sampling(temperature=1.0 if req.temperature is None else req.temperature,
                        top_k=max(req.top_k or 0, 0), top_p=1.0 if req.top_p is None else req.top_p,
                        seed=None if req.seed is None else req.seed + index,
                        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
                        logit_bias=req.bias(self.tok.vocab_size))

    def fit(self, ids: list[int], max_tokens: int | None, param: str) -> int:
        """max_tokens, checked against the context (None: what is left of it)."""
        if not ids:
            raise bad_request(f"{param}: the prompt is empty", param)
        if len(ids) >= self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens; the {param} has "
                              f"{len(ids)} (at least one must be left to generate)", param, "context_length_exceeded")
        if max_tokens is None:
            return self.context - len(ids)
        if len(ids) + max_tokens > self.context:
            raise bad_request(f"This model's maximum context length is {self.context} tokens. However, you "
                              f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} "
                              "in the completion). Please reduce the length of the prompt or max_tokens.",
                              "max_tokens", "context_length_exceeded")
        return max_tokens

    def job(self, req, prompts: list[tuple[list[int], str]], max_tokens: int | None, param: str,
            stops: list[str], logprobs: int | None) -> Job:
        """prompts: (token ids, routing text) per prompt; n choices each."""
        mode, router, level = self.memory_of(req)
        rag = req.rag if req.rag is not None else self.defaults.rag
        if rag and max_tokens is None:
            raise bad_request("max_tokens: a request with rag must set it (the retrieved documents take the room "
                              "that the prompt and the completion leave in the context)", "max_tokens")
        choices, prompt_tokens = [], 0
        for i, (ids, route_text) in enumerate(prompts):
            limit = self.fit(ids, max_tokens, param)
            prompt_tokens += len(ids)
            for j in range(req.n):
                index = i * req.n + j
                text = TextStream(self.tok.decode, stops)
                seq = Sequence(ids, limit, self.sampling(req, index), self.tok.eos_id, stop=text, logprobs=logprobs)
                choices.append(Choice(index, seq, text, mode, router, level, route_text, rag))
        # as OpenAI counts them: each prompt once, whatever n (the retrieved documents are not counted)
        return Job(choices, prompt_tokens)

    def completion(self, req: CompletionRequest) -> tuple[Job, list[str]]:
        req.check()
        raw = req.prompt
        if isinstance(raw, str) or (raw and isinstance(raw[0], int)):
            raw = [raw]
        if not raw:
            raise bad_request("prompt: the prompt is empty", "prompt")
        prompts, texts = [], []
        for p in raw:
            if isinstance(p, str):
                ids, text = self.tok.encode(p), p
            else:
                bad = [t for t in p if not 0 <= t < self.tok.vocab_size]
                if bad:
                    raise bad_request(f"prompt: token id {bad[0]} is outside the vocabulary [0, "
                                      f"{self.tok.vocab_size})", "prompt")
                ids, text = list(p), self.tok.decode(p)
            prompts.append((ids, text))
            texts.append(text)
        job = self.job(req, prompts, req.max_tokens, "prompt", req.stops(), req.logprobs)
        return job, texts

    def chat(self, req: ChatCompletionRequest) -> Job:
        req.check()
        prompt, route_text = (self.template or chat_prompt)(req.messages)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        stops = req.stops() + ([] if self.template else [CHAT_STOP])
        return self.job(req, [(self.tok.encode(prompt), route_text)], req.limit(), "messages", stops, logprobs)


async def _next(job: Job):
    event = await job.events.get()
    if isinstance(event, Failed):
        raise event.error
    return event


async def _watch(request: Request, engine: Engine, job: Job) -> None:
    """Cancel the job when its client disconnects (the body has been read: receive waits for the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    engine.cancel(job)


class _Render:
    """Engine events -> OpenAI responses and stream chunks, for completions ("text") or chat ("chat")."""

    def __init__(self, kind: str, model: str, tok, prompts: list[str] | None = None, echo: bool = False, n: int = 1):
        self.kind, self.model, self.tok = kind, model, tok
        self.prompts, self.echo, self.n = prompts, echo, n
        self.id = new_id("cmpl" if kind == "text" else "chatcmpl")
        self.object = "text_completion" if kind == "text" else "chat.completion"
        self.chunk_object = "text_completion" if kind == "text" else "chat.completion.chunk"
        self._sent: dict[int, int] = {}  # characters streamed so far per choice (logprobs' text_offset)

    def _logprobs(self, choice: Choice, steps, offset: int):
        if choice.seq.logprobs is None:
            return None
        entries = [(self.tok.decode([s.token]), s.logprob, None if s.top is None else
                    [(self.tok.decode([t]), v) for t, v in s.top]) for s in steps]
        return completion_logprobs(entries, offset) if self.kind == "text" else chat_logprobs(entries)

    def prefix(self, choice: Choice) -> str:
        """The echoed prompt (completions with echo=true), else nothing."""
        return self.prompts[choice.index // self.n] if self.echo else ""

    def response(self, job: Job, texts: dict, steps: dict, reasons: dict, timing: dict) -> dict:
        choices = []
        for c in job.choices:
            text, lp = self.prefix(c) + texts[c.index], self._logprobs(c, steps[c.index], len(self.prefix(c)))
            body = {"text": text} if self.kind == "text" else {"message": {"role": "assistant", "content": text}}
            choices.append({"index": c.index, **body, "logprobs": lp, "finish_reason": reasons[c.index],
                            "route": c.route()})
        completion = sum(len(c.seq.tokens) for c in job.choices)
        return envelope(self.id, self.object, self.model, choices, usage=usage(job.prompt_tokens, completion),
                        timing=timing)

    def chunk(self, choice: Choice, text: str, steps, finish_reason, first: bool = False, **extra) -> str:
        if self.kind == "text":
            body = {"text": text}
        else:
            body = {"delta": ({"role": "assistant", "content": text} if first else
                              {"content": text} if text or not finish_reason else {})}
        offset = self._sent.get(choice.index, 0)
        self._sent[choice.index] = offset + len(text)
        item = {"index": choice.index, **body, "logprobs": self._logprobs(choice, steps, offset) if steps else None,
                "finish_reason": finish_reason}
        if first:
            item["route"] = choice.route()
        return _sse(envelope(self.id, self.chunk_object, self.model, [item], **extra))


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def create_app(run: Run, model_name: str, memory: str | None = None, router: str | None = None,
               block_level: int | None = None, max_batch: int = 16, max_waiting: int = 64,
               batch_wait_s: float = 0.005, max_body_bytes: int = MAX_BODY_BYTES, rag: int = 0) -> FastAPI:
    """The app for a loaded run. Its default router and the encoder are loaded now: one that cannot be fails
    here in one line, and the first request does not wait for them."""
    defaults = check_defaults(run, memory, router, block_level, rag)
    metrics = Metrics()
    engine = Engine(run, metrics, max_batch, max_waiting, batch_wait_s)
    if run.bank is not None:
        engine.embedder.encode(["warm-up"])
    if defaults.memory == "fetched":
        engine.context(defaults.router)
    if defaults.rag:  # a run without a knn index to retrieve from fails here, in one line
        engine.rag(defaults.rag)
    builder = _Builder(run, defaults, model_name)
    explorer = Explorer(run) if run.tree is not None else None
    _sources(metrics, engine, run)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="hiermem", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(_Limits, metrics=metrics, max_body=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def internal_error(request, e: Exception):  # the traceback goes to the server's log only
        return _error_response(APIError(500, "internal server error", type="server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "hiermem", "max_model_len": builder.context}]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse((STATIC / "explorer.html").read_text(encoding="utf-8"))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = parse(CompletionRequest, await request.body())
        job, texts = builder.completion(req)
        render = _Render("text", model_name, run.tokenizer, texts, req.echo, req.n)
        return await _answer(request, engine, metrics, job, render, req)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = parse(ChatCompletionRequest, await request.body())
        job = builder.chat(req)
        return await _answer(request, engine, metrics, job, _Render("chat", model_name, run.tokenizer), req)

    @app.post("/v1/route")
    async def route(request: Request):
        req = parse(RouteRequest, await request.body())
        if explorer is None:
            raise bad_request("this run was trained without memory: it has no tree to route on")
        if not req.prompt.strip():
            raise bad_request("prompt: the prompt is empty", "prompt")
        name = req.router or defaults.router
        level = req.block_level if req.block_level is not None else defaults.block_level
        if level is not None and level >= run.tree.depth:
            raise bad_request(f"block_level: {level} is outside the tree's levels 0..{run.tree.depth - 1}",
                              "block_level")

        def explain():
            emb = engine.embedder.encode([req.prompt])
            path = engine.context(name).router.route(emb, block_level=level)[0]
            return {"router": name, "block_level": level, **explorer.explain(emb[0], path, req.documents)}

        try:
            return await engine.call(explain)
        except HiermemError as e:
            raise bad_request(str(e), "router") from None

    return app


async def _answer(request: Request, engine: Engine, metrics: Metrics, job: Job, render: _Render, req) -> Response:
    """Submit the job; wait for its admission (so that a failure is still an HTTP error), then answer in one
    piece or as a stream. A client that goes away cancels the job."""
    engine.submit(job)
    metrics.inc("hiermem_prompt_tokens_total", job.prompt_tokens)
    watcher = asyncio.ensure_future(_watch(request, engine, job))
    handed_over = False  # once answered (or streaming), the job is no longer this function's to cancel
    try:
        admitted: Admitted = await _next(job)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            handed_over = True
            return StreamingResponse(_stream(engine, job, render, admitted, include_usage),
                                     media_type="text/event-stream")
        texts = {c.index: "" for c in job.choices}
        steps = {c.index: [] for c in job.choices}
        reasons = {}
        while len(reasons) < len(job):
            d: Delta = await _next(job)
            texts[d.choice.index] += d.text
            steps[d.choice.index] += d.steps
            if d.finish_reason:
                reasons[d.choice.index] = d.finish_reason
        handed_over = True
        return JSONResponse(render.response(job, texts, steps, reasons, admitted.timing))
    finally:
        watcher.cancel()
        if not handed_over:
            engine.cancel(job)


async def _stream(engine: Engine, job: Job, render: _Render, admitted: Admitted, include_usage: bool):
    """Server-sent events: a first chunk per choice (its route; the echoed prompt; the timing), then the text
    as it becomes final, then usage if asked, then [DONE]. Leaving early (a disconnect) cancels the job."""
    finished = 0
    try:
        for c in job.choices:
            yield render.chunk(c, render.prefix(c), [], None, first=True, timing=admitted.timing)
        while finished < len(job):
            try:
                d: Delta = await _next(job)
            except APIError as e:
                yield _sse(e.body())
                break
            finished += d.finish_reason is not None
            yield render.chunk(d.choice, d.text, d.steps, d.finish_reason)
        if include_usage and finished == len(job):
            completion = sum(len(c.seq.tokens) for c in job.choices)
            yield _sse(envelope(render.id, render.chunk_object, render.model, [], usage=usage(job.prompt_tokens,
                                                                                            completion)))
        yield "data: [DONE]\n\n"
    finally:
        if finished < len(job):
            engine.cancel(job)


def _sources(metrics: Metrics, engine: Engine, run: Run) -> None:
    """Gauges and the bank's block-cache counters, read when /metrics is scraped."""
    metrics.source("hiermem_sequences_running", lambda: engine.running)
    metrics.source("hiermem_sequences_waiting", lambda: engine.waiting)
    stats = run.bank.io_stats if run.bank is not None and run.bank.on_disk else None
    for name, key in (("hiermem_block_cache_hits_total", "hits"), ("hiermem_block_cache_misses_total", "misses"),
                      ("hiermem_bank_read_bytes_total", "read_bytes"), ("hiermem_block_cache_evictions_total", "evictions"),
                      ("hiermem_block_cache_resident_bytes", "resident_bytes"),
                      ("hiermem_block_cache_peak_bytes", "peak_bytes")):
        metrics.source(name, (lambda key=key: stats()[key]) if stats else (lambda: None))


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening socket, or a one-line error (a port in use, an address not on this machine)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise HiermemError(f"serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(run_dir: str, overrides: list[str] | tuple[str, ...] = (), memory: str | None = None,
          router: str | None = None, block_level: int | None = None, device: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, max_waiting: int = 64,
          served_model_name: str | None = None, rag: int = 0) -> None:
    import uvicorn

    from hiermem.eval.evaluate import open_run

    sock = listen(host, port)  # first: a port in use fails before the run is loaded
    run = open_run(run_dir, overrides, router=router, device=device)
    app = create_app(run, served_model_name or run_dir, memory, router, block_level, max_batch, max_waiting,
                     rag=rag)
    print(f"serving {run.path} as model {served_model_name or run_dir!r} on http://{host}:{sock.getsockname()[1]} "
          "(explorer at /)", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=5)).run(sockets=[sock])


__all__ = ["Defaults", "check_defaults", "create_app", "listen", "serve"]
