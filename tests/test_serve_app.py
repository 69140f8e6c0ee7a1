"""serve/app.py: the OpenAI-compatible server, driven by the real `openai` client over loopback.

The server runs the tiny memory run with its bank on disk behind a small block cache (memory.mmap=true), in a
thread of this process on a free port. Greedy completions must equal `hiermem generate` (eval/evaluate.py)
token for token; every way a client can get a request wrong must answer 4xx with OpenAI's error body.
"""

import functools
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from hiermem.cli import main
from hiermem.eval.evaluate import generate_text
from hiermem.eval.inference import MemoryContext
from hiermem.eval.rag import make_rag
from serve_support import MODEL, http, metric, running_server

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

DISK = ["memory.mmap=true", f"memory.cache_bytes={256 << 10}"]
PROMPTS = ["Nantes has a population of about", "The city of Aisai lies in", "Paris is", "A small town"]


@pytest.fixture(scope="module")
def server(memory_run):
    with running_server(memory_run, DISK) as (base, run, _):
        yield base, run


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0, timeout=60)


@functools.lru_cache(maxsize=None)
def expected(run_dir, prompt, memory="fetched", router="knn", block_level=None, n=8, rag=0):
    """What `hiermem generate RUN -p PROMPT` prints after the prompt (the bank in RAM, one prompt alone)."""
    return generate_text(str(run_dir), [prompt], memory=memory, router=router, block_level=block_level,
                         max_new_tokens=n, device="cpu", rag=rag)[0]


def test_models_health_and_the_explorer_page(server, client):
    base, _ = server
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert http(base + "/health") == (200, {"status": "ok"})
    status, page = http(base + "/")
    assert status == 200 and "memory explorer" in page


@pytest.mark.parametrize("memory,router,level", [("fetched", "knn", None), ("fetched", "centroid", None),
                                                 ("fetched", "knn", 0), ("generic", None, None), ("none", None, None)])
def test_a_completion_equals_hiermem_generate_and_names_its_route(server, client, memory_run, memory, router, level):
    _, run = server
    prompt = PROMPTS[0]
    extra = {"memory": memory, **({"router": router} if router else {}),
             **({"block_level": level} if level is not None else {})}
    res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, extra_body=extra)
    choice = res.choices[0]
    assert choice.text == expected(memory_run, prompt, memory, router or "knn", level)
    assert choice.finish_reason in ("length", "stop") and res.usage.completion_tokens <= 8
    route = choice.route
    assert route["memory"] == memory
    if memory == "fetched":
        ctx = MemoryContext(run, "fetched", router, level)
        assert route == {"memory": "fetched", "router": router, "block_level": level,
                         "path": ctx.route([prompt])[0].tolist()}
    else:
        assert route["path"] is None
    assert set(res.timing) == {"queue_s", "embed_s", "route_s", "fetch_s", "prefill_s", "ttft_s"}


@pytest.mark.parametrize("rag", [1, 3])
def test_rag_equals_hiermem_generate_with_rag_and_names_its_documents(server, client, memory_run, rag):
    """`rag`: the prompt's nearest training documents before it, as `hiermem generate --rag K`; the route names them."""
    _, run = server
    prompt = PROMPTS[1]
    res = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, logprobs=1,
                                    extra_body={"rag": rag})
    choice = res.choices[0]
    assert choice.text == expected(memory_run, prompt, rag=rag)
    ctx = MemoryContext(run, "fetched", "knn")
    want = make_rag(run, ctx, rag).retriever.search([prompt], rag)[0][0].tolist()
    assert choice.route["rag"] == {"k": rag, "documents": want} and len(want) == rag
    assert res.usage.prompt_tokens == len(run.tokenizer.encode(prompt))  # the request's tokens, not the documents
    assert "retrieve_s" in res.timing
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                      logprobs=1).choices[0]
    assert "rag" not in plain.route and plain.text == expected(memory_run, prompt)
    # the documents are in the context: the first token's distribution differs (this small model's text may not)
    assert choice.logprobs.token_logprobs[0] != plain.logprobs.token_logprobs[0]


def test_blocking_a_level_changes_the_route_at_that_level(client):
    free = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0)
    blocked = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=1, temperature=0,
                                        extra_body={"block_level": 0})
    assert free.choices[0].route["path"][0] != blocked.choices[0].route["path"][0]


def test_requests_that_arrive_together_are_batched_and_each_decodes_as_alone(server, client, memory_run):
    base, _ = server
    jobs = [(p, m) for p in PROMPTS for m in ("fetched", "generic", "none")]
    want = [expected(memory_run, p, m) for p, m in jobs]
    multi_before = metric(base, "hiermem_batch_sequences_count") - _single_steps(base)
    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(lambda job: client.completions.create(
            model=MODEL, prompt=job[0], max_tokens=8, temperature=0, extra_body={"memory": job[1]}), jobs))
    assert [r.choices[0].text for r in got] == want
    paths = {tuple(r.choices[0].route["path"]) for r, (_, m) in zip(got, jobs) if m == "fetched"}
    assert len(paths) > 1  # the batch held different paths
    assert metric(base, "hiermem_batch_sequences_count") - _single_steps(base) > multi_before  # steps of > 1 row


def _single_steps(base):
    _, text = http(base + "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith('hiermem_batch_sequences_bucket{le="1"}'))


def test_a_prompt_list_and_n_give_one_choice_each(server, client, memory_run):
    res = client.completions.create(model=MODEL, prompt=PROMPTS[:2], n=2, max_tokens=6, temperature=0)
    assert [c.index for c in res.choices] == [0, 1, 2, 3]
    assert res.usage.prompt_tokens == sum(len(server[1].tokenizer.encode(p)) for p in PROMPTS[:2])  # once each
    for c in res.choices:
        assert c.text == expected(memory_run, PROMPTS[c.index // 2], n=6)
    sampled = client.completions.create(model=MODEL, prompt=PROMPTS[2], n=3, max_tokens=12, temperature=1.5,
                                        seed=5)
    again = client.completions.create(model=MODEL, prompt=PROMPTS[2], n=3, max_tokens=12, temperature=1.5, seed=5)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]  # the seed reproduces them
    assert len({c.text for c in sampled.choices}) > 1  # and each choice draws its own


def test_echo_logprobs_and_stop(client, memory_run):
    full = expected(memory_run, PROMPTS[1], n=10)
    res = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, echo=True,
                                    logprobs=3)
    c = res.choices[0]
    assert c.text == PROMPTS[1] + full
    assert "".join(c.logprobs.tokens) == full and all(len(t) == 3 for t in c.logprobs.top_logprobs)
    assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    stop = full[3:6]
    cut = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_streaming_gives_the_same_text_route_and_usage(client, memory_run):
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected(memory_run, PROMPTS[0])
    assert chunks[0].choices[0].route["memory"] == "fetched" and chunks[0].timing["ttft_s"] > 0
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    logprobs = [c.choices[0].logprobs for c in client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True, logprobs=1) if c.choices[0].logprobs]
    tokens = [t for lp in logprobs for t in lp.tokens]
    assert "".join(tokens) == text
    assert [o for lp in logprobs for o in lp.text_offset] == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


def test_chat_uses_the_native_template_and_streams(client, memory_run):
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": PROMPTS[3]}]
    res = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                         extra_body={"memory": "none"})
    template = f"System: Answer briefly.\nUser: {PROMPTS[3]}\nAssistant:"
    want = expected(memory_run, template, memory="none")
    msg = res.choices[0].message
    assert msg.role == "assistant" and msg.content == want.split("\nUser:")[0]
    assert res.usage.prompt_tokens > 8 and res.choices[0].route == {"memory": "none", "router": None,
                                                                       "block_level": None, "path": None}
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0,
                                            stream=True, extra_body={"memory": "none"})
    deltas = [c.choices[0].delta for c in stream]
    assert deltas[0].role == "assistant" and "".join(d.content or "" for d in deltas) == msg.content
    routed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                            logprobs=True, top_logprobs=2)
    assert routed.choices[0].route["path"] == client.completions.create(
        model=MODEL, prompt=PROMPTS[3], max_tokens=1, temperature=0).choices[0].route["path"]  # routed on the user text
    assert all(len(t.top_logprobs) == 2 for t in routed.choices[0].logprobs.content)


BAD = [  # (endpoint, body, status, param, words in the message)
    ("completions", b"{bad", 400, None, "not valid JSON"),
    ("completions", b"[1, 2]", 400, None, "object"),
    ("completions", {"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ("completions", {"prompt": 5}, 400, "prompt", "string"),
    ("completions", {"prompt": "x", "temperature": 3}, 400, "temperature", "less than or equal to 2"),
    ("completions", {"prompt": ""}, 400, "prompt", "empty"),
    ("completions", {"prompt": []}, 400, "prompt", "empty"),
    ("completions", {"prompt": "word " * 100}, 400, "prompt", "maximum context length is 64"),
    ("completions", {"prompt": "x", "max_tokens": 1000}, 400, "max_tokens", "maximum context length is 64"),
    ("completions", {"prompt": [99999]}, 400, "prompt", "outside the vocabulary"),
    ("completions", {"prompt": "x", "model": "gpt-4"}, 404, "model", "does not exist"),
    ("completions", {"prompt": "x", "memory": "all"}, 400, "memory", "'fetched', 'generic' or 'none'"),
    ("completions", {"prompt": "x", "router": "oracle"}, 400, "router", "'centroid' or 'knn'"),
    ("completions", {"prompt": "x", "block_level": 2}, 400, "block_level", "outside the tree's levels 0..1"),
    ("completions", {"prompt": "x", "n": 100}, 400, "n", "at most 16"),
    ("completions", {"prompt": "x", "suffix": "y"}, 400, "suffix", "not supported"),
    ("completions", {"prompt": "x", "best_of": 3}, 400, "best_of", "not supported"),
    ("completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs", "less than or equal to 20"),
    ("completions", {"prompt": "x", "logit_bias": {"abc": 1}}, 400, "logit_bias", "not a token id"),
    ("completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ("completions", {"prompt": "x", "rag": -1}, 400, "rag", "greater than or equal to 0"),
    ("completions", {"prompt": "x", "rag": 17}, 400, "rag", "less than or equal to 16"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "rag": 2}, 400, "max_tokens",
     "a request with rag must set it"),
    ("chat/completions", {"messages": []}, 400, "messages", "at least 1"),
    ("chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "role"),
    ("chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400, "messages",
     "only text"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400,
     "tools", "not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}],
                          "response_format": {"type": "json_object"}}, 400, "response_format", "not supported"),
    ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400,
     "top_logprobs", "logprobs=true"),
]


@pytest.mark.parametrize("endpoint,body,status,param,words", BAD)
def test_bad_requests_get_an_openai_error(server, endpoint, body, status, param, words):
    got, err = http(f"{server[0]}/v1/{endpoint}", body, headers={"Content-Type": "application/json"})
    assert got == status, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["param"] == param and words in err["error"]["message"], err


def test_other_http_errors_have_the_same_body(server):
    base = server[0]
    declared = raw(base, b"Content-Length: %d\r\n" % (2 << 20), [])  # refused before any body is read
    chunked = raw(base, b"Transfer-Encoding: chunked\r\n", [b"%x\r\n%s\r\n" % (1 << 16, b"x" * (1 << 16))] * 17)
    for answer in (declared, chunked):
        assert answer.startswith(b"HTTP/1.1 413") and b'"code":"request_too_large"' in answer
    status, err = http(base + "/v1/nothing")
    assert status == 404 and err["error"]["type"] == "not_found_error"
    status, err = http(base + "/v1/completions")
    assert status == 405 and "error" in err


def raw(base, headers: bytes, chunks: list[bytes]) -> bytes:
    """The raw answer to a POST /v1/completions with these extra headers and body chunks (the server may answer
    and close before the client has sent everything)."""
    with socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _length(answer):
            piece = sock.recv(65536)
            if not piece:
                break
            answer += piece
        return answer


def _length(answer: bytes) -> int:
    head = answer.split(b"\r\n\r\n", 1)[0].lower()
    return int(head.split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0]) if b"content-length: " in head else 0


def test_the_openai_client_sees_errors_as_its_own_exceptions(client):
    with pytest.raises(openai.BadRequestError, match="less than or equal to 2"):
        client.completions.create(model=MODEL, prompt="x", temperature=5)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="other", prompt="x")


def test_metrics_count_requests_tokens_and_the_block_cache(server, client):
    base, run = server
    before = metric(base, "hiermem_generation_tokens_total")
    res = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=5, temperature=0)
    _, text = http(base + "/metrics")
    assert metric(base, "hiermem_generation_tokens_total") == before + res.usage.completion_tokens > before
    assert 'hiermem_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'hiermem_stage_seconds_count{stage="fetch"}' in text
    stats = run.bank.io_stats()  # the server reads the bank on disk through its block cache
    assert metric(base, "hiermem_block_cache_hits_total") == stats["hits"] > 0
    assert metric(base, "hiermem_block_cache_misses_total") == stats["misses"] > 0
    assert metric(base, "hiermem_bank_read_bytes_total") == stats["read_bytes"] > 0
    assert stats["peak_bytes"] <= 256 << 10  # bounded by memory.cache_bytes
    for line in text.splitlines():  # Prometheus text format: comments or `name{labels} value`
        assert line.startswith("# ") or float(line.rsplit(" ", 1)[1]) >= 0


def test_a_full_server_answers_429_and_a_disconnect_frees_the_slot(memory_run):
    with running_server(memory_run, max_batch=1, max_waiting=0) as (base, _, app):
        decoder = app.state.engine.decoder
        step = decoder.step
        decoder.step = lambda: (time.sleep(0.05), step())[1]  # slow enough that the stream outlives the race
        sock = socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])))
        body = b'{"prompt": "Paris is", "max_tokens": 50, "temperature": 0, "stream": true}'
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert b"200 OK" in sock.recv(4096)  # streaming has begun: the one slot is taken
        status, err = http(base + "/v1/completions", {"prompt": "x", "max_tokens": 2})
        assert status == 429 and err["error"]["code"] == "rate_limit_exceeded"
        sock.close()  # the client goes away mid-stream
        wait_for(lambda: metric(base, "hiermem_sequences_running") == 0)
        status, res = http(base + "/v1/completions", {"prompt": "x", "max_tokens": 2, "temperature": 0})
        assert status == 200 and res["choices"][0]["finish_reason"] == "length"
        assert metric(base, "hiermem_generation_tokens_total") < 50 + 2  # the abandoned stream stopped early


def wait_for(condition, timeout=15.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_cli_refuses_a_port_in_use_in_one_line(memory_run, capsys):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    try:
        assert main(["serve", str(memory_run), "--port", str(busy.getsockname()[1])]) == 2
    finally:
        busy.close()
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: serve: cannot listen on 127.0.0.1:") and "\n" not in err


def test_a_server_default_rag_out_of_range_is_refused_in_one_line(server):
    from hiermem.errors import HiermemError
    from hiermem.serve.app import check_defaults

    _, run = server
    assert check_defaults(run, None, None, None, rag=2).rag == 2
    for bad in (-1, 17):
        with pytest.raises(HiermemError, match=rf"^--rag must be 0 \(off\) or a number of documents up to 16, got {bad}$"):
            check_defaults(run, None, None, None, rag=bad)
