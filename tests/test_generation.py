import pytest
import torch

from hiermem.config import ModelConfig
from hiermem.eval.generation import filter_logits, generate_ids
from hiermem.model import FetchedMemory
from hiermem.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

CFG = ModelConfig(vocab_size=97, n_layers=2, d_model=32, n_heads=2, head_dim=8, d_ff=48, max_seq_len=32,
                  init_std=0.2)  # a large init: peaked logits, so no argmax is a near-tie


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def prompts(*lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, CFG.vocab_size, (n,), generator=g).tolist() for n in lengths]


def random_memory(batch, rank=4, seed=2):
    g = torch.Generator().manual_seed(seed)
    return FetchedMemory.per_sequence(torch.randn(batch, CFG.n_layers, 3, rank, CFG.d_model, generator=g) * 0.3)


@torch.no_grad()
def reference_greedy(model, prompt, n, memory=None):
    """Full forward pass per step (plain causal attention, positions 0..T-1), argmax of the last logits."""
    ids = list(prompt)
    for _ in range(n):
        window = ids[-CFG.max_seq_len:]
        logits, _ = model(torch.tensor([window]), memory=memory)
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_is_argmax_of_full_forward_passes(model):
    for p in prompts(1, 5, 11):
        assert generate_ids(model, [p], max_new_tokens=12) == [reference_greedy(model, p, 12)]


def test_greedy_with_memory(model):
    (p,) = prompts(6)
    mem = random_memory(1)
    with_mem = generate_ids(model, [p], memory=mem, max_new_tokens=10)
    assert with_mem == [reference_greedy(model, p, 10, memory=mem)]
    assert with_mem != generate_ids(model, [p], max_new_tokens=10)  # the memory does change the output


def test_context_longer_than_the_model_window_slides(model):
    (p,) = prompts(29)
    out = generate_ids(model, [p], max_new_tokens=8)  # reaches 37 tokens > max_seq_len 32
    assert out == [reference_greedy(model, p, 8)]


def test_left_padded_batch_equals_each_prompt_alone(model):
    ps = prompts(3, 9, 1, 14)
    batch = generate_ids(model, ps, max_new_tokens=10)
    assert batch == [generate_ids(model, [p], max_new_tokens=10)[0] for p in ps]
    mem = random_memory(len(ps))
    batch = generate_ids(model, ps, memory=mem, max_new_tokens=10)
    alone = [generate_ids(model, [p], memory=mem.rows(slice(i, i + 1)), max_new_tokens=10)[0]
             for i, p in enumerate(ps)]
    assert batch == alone


def test_eos_ends_each_sequence_on_its_own(model):
    ps = prompts(4, 8)
    full = [reference_greedy(model, p, 10) for p in ps]
    eos = full[0][3]  # the first sequence meets this token at step 3 (or earlier)
    cut = [f[: f.index(eos)] if eos in f else f for f in full]
    assert len(cut[0]) <= 3
    assert generate_ids(model, ps, max_new_tokens=10, eos_id=eos) == cut
    assert generate_ids(model, [ps[1]], max_new_tokens=10, eos_id=eos) == [cut[1]]


def test_stop_fn_ends_a_row_early(model):
    ps = prompts(4, 8, 6)
    full = generate_ids(model, ps, max_new_tokens=10)
    seen = []

    def stop(i, new):
        seen.append((i, len(new)))
        return i == 1 and len(new) >= 3

    out = generate_ids(model, ps, max_new_tokens=10, stop_fn=stop)
    assert out == [full[0], full[1][:3], full[2]]
    assert (1, 4) not in seen and (0, 10) in seen  # a stopped row is not asked again


def test_top_k_1_sampling_equals_greedy(model):
    ps = prompts(2, 7)
    greedy = generate_ids(model, ps, max_new_tokens=10)
    for seed in (0, 1, 2):
        assert generate_ids(model, ps, max_new_tokens=10, temperature=0.8, top_k=1, seed=seed) == greedy


def test_sampling_is_reproducible_for_a_seed(model):
    ps = prompts(3, 5)
    kw = dict(max_new_tokens=16, temperature=1.5)
    a = generate_ids(model, ps, seed=11, **kw)
    assert a == generate_ids(model, ps, seed=11, **kw)
    assert a != generate_ids(model, ps, seed=12, **kw)
    assert a != generate_ids(model, ps, **{**kw, "temperature": 0.0})


@torch.no_grad()
def test_sampled_tokens_stay_inside_top_k(model):
    (p,) = prompts(5)
    out = generate_ids(model, [p], max_new_tokens=20, temperature=3.0, top_k=3, seed=4)[0]
    ids = list(p)
    for tok in out:
        logits, _ = model(torch.tensor([ids]))
        assert tok in logits[0, -1].topk(3).indices.tolist()
        ids.append(tok)
    assert len(set(out)) > 1


def reference_top_p(logits_row, p):
    """Indices of the smallest set of most likely tokens whose probability reaches p."""
    probs = logits_row.softmax(-1)
    order = probs.argsort(descending=True)
    total, keep = 0.0, []
    for i in order.tolist():
        keep.append(i)
        total += float(probs[i])
        if total >= p:
            break
    return sorted(keep)


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p):
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 30, generator=g, dtype=torch.float64) * 2
    out = filter_logits(logits, top_p=top_p)
    for row, filtered in zip(logits, out):
        kept = torch.isfinite(filtered).nonzero().squeeze(1).tolist()
        assert kept == reference_top_p(row, top_p)
        assert torch.equal(filtered[kept], row[kept])  # kept logits are untouched


def test_top_p_on_an_exact_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p)).squeeze(0).tolist()  # noqa: E731
    assert kept(0.4) == [True, False, False, False]
    assert kept(0.7) == [True, True, False, False]
    assert kept(0.9) == [True, True, True, False]
    assert kept(1.0) == [True] * 4


def test_top_k_then_top_p():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(20, 50, generator=g, dtype=torch.float64)
    only_k = filter_logits(logits, top_k=6)
    assert (torch.isfinite(only_k).sum(-1) == 6).all()
    assert torch.equal(torch.isfinite(only_k), torch.zeros_like(only_k, dtype=torch.bool).scatter(
        -1, logits.topk(6).indices, True))
    both = filter_logits(logits, top_k=6, top_p=0.6)
    for row, k_row, filtered in zip(logits, only_k, both):
        kept = torch.isfinite(filtered).nonzero().squeeze(1).tolist()
        assert kept == reference_top_p(k_row, 0.6)  # top-p over the renormalised top-k
        assert set(kept) <= set(row.topk(6).indices.tolist())


# --- the KV cache ----------------------------------------------------------------------------------------


def test_kv_cache_gives_the_tokens_of_full_recomputation(model):
    """Left-padded prompts of different lengths, per-row memory, greedy and sampled: the cached decode feeds
    one token per step and must choose exactly what recomputing the whole sequence chooses."""
    ps = prompts(3, 9, 1, 14)
    mem = random_memory(len(ps))
    for kw in (dict(), dict(memory=mem), dict(memory=mem, temperature=0.9, top_k=20, seed=4)):
        cached = generate_ids(model, ps, max_new_tokens=12, **kw)
        assert cached == generate_ids(model, ps, max_new_tokens=12, use_cache=False, **kw)
    assert generate_ids(model, ps[:1], max_new_tokens=12) == [reference_greedy(model, ps[0], 12)]


def test_kv_cache_logits_equal_the_full_forward_at_every_step(model):
    from hiermem.model.transformer import KVCache

    (p,) = prompts(7)
    ids = torch.tensor([p + [5, 17, 3]])
    full, _ = model(ids)
    cache = KVCache()
    with torch.no_grad():
        first, _ = model(ids[:, :7], cache=cache)
        torch.testing.assert_close(first[:, -1], full[:, 6], rtol=1e-5, atol=1e-5)
        for t in range(7, 10):
            step, _ = model(ids[:, t:t + 1], positions=torch.tensor([[t]]), cache=cache)
            torch.testing.assert_close(step[:, -1], full[:, t], rtol=1e-5, atol=1e-5)
    assert cache.keys[0].shape[2] == 10 and (cache.segments == 0).all()


def test_an_empty_prompt_is_refused_in_one_line(model):
    from hiermem.errors import HiermemError

    with pytest.raises(HiermemError, match=r"prompt 2 of 2 is empty"):
        generate_ids(model, [[5, 6], []], max_new_tokens=3)


# --- continuous batching: sequences join and leave a running batch ------------------------------------------

from hiermem.eval.generation import (BatchDecoder, Sampling, Sequence, TextStream, stack_memory,  # noqa: E402
                                     take_memory)


def alone(model, prompt, n, memory=None, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """The cache-free reference: the prompt by itself, the whole sequence recomputed at every step."""
    return generate_ids(model, [prompt], memory=memory, max_new_tokens=n, use_cache=False, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed)[0]


def test_sequences_joining_a_running_batch_decode_as_they_would_alone(model):
    """Three groups join at steps 0, 3 and 5, each with its own rows of memory (one row without any), greedy
    and sampled rows mixed: every sequence's tokens equal its cache-free decoding alone."""
    ps = prompts(3, 9, 1, 14, 6, 2)
    mem = random_memory(len(ps))
    row = lambda i: mem.rows(slice(i, i + 1))  # noqa: E731
    sampled = dict(temperature=0.9, top_k=20, seed=7)
    spec = [(0, {}, row(0)), (1, sampled, row(1)), (2, {}, None), (3, {}, row(3)), (4, sampled, row(4)), (5, {}, row(5))]
    seqs = [Sequence(ps[i], 10, Sampling(**kw)) for i, kw, _ in spec]
    decoder = BatchDecoder(model)
    joins = {0: [0, 1, 2], 3: [3, 4], 5: [5]}
    for step in range(20):
        if step in joins:
            group = joins[step]
            decoder.add([seqs[i] for i in group], stack_memory([(spec[i][2], 1) for i in group]))
        elif decoder.seqs:
            decoder.step()
    assert not decoder.seqs and all(s.finish_reason == "length" for s in seqs)
    for (i, kw, m), s in zip(spec, seqs):
        assert s.tokens == alone(model, ps[i], 10, memory=m, **kw), i
    assert seqs[2].tokens != alone(model, ps[2], 10, memory=row(2))  # row 2 really had no memory


def test_a_dropped_sequence_leaves_the_others_unchanged(model):
    ps = prompts(5, 12, 3)
    mem = random_memory(3)
    seqs = [Sequence(p, 9) for p in ps]
    decoder = BatchDecoder(model)
    decoder.add(seqs, mem)
    for step in range(8):
        if step == 2:
            decoder.drop([seqs[1]])
        decoder.step()
    assert seqs[1].finish_reason == "cancelled" and len(seqs[1].tokens) == 3
    for i in (0, 2):
        assert seqs[i].tokens == alone(model, ps[i], 9, memory=mem.rows(slice(i, i + 1)))
    assert decoder.cache is None and decoder.memory is None  # everything left: nothing is kept


def test_sampled_rows_do_not_depend_on_their_batch(model):
    ps = prompts(4, 7, 2)
    kw = dict(temperature=1.2, top_p=0.9)
    batch = [Sequence(p, 12, Sampling(seed=3, **kw)) for p in ps]
    decoder = BatchDecoder(model)
    decoder.add(batch)
    while decoder.seqs:
        decoder.step()
    for p, s in zip(ps, batch):
        assert s.tokens == alone(model, p, 12, seed=3, **kw)


def test_stacked_and_selected_memory_keeps_each_rows_neurons():
    a, b = random_memory(3, seed=1), random_memory(2, seed=2)
    stacked = stack_memory([(a, 3), (None, 2), (b, 2)])
    n = stacked.neurons()
    torch.testing.assert_close(n[:3], a.neurons(), rtol=0, atol=0)
    assert (n[3:5] == 0).all()
    torch.testing.assert_close(n[5:], b.neurons(), rtol=0, atol=0)
    kept = take_memory(stacked, torch.tensor([6, 0]))
    torch.testing.assert_close(kept.neurons(), torch.stack([n[6], n[0]]), rtol=0, atol=0)
    assert len(kept.parts[0].weights) == 2  # only the blocks still used
    assert take_memory(stacked, torch.tensor([3, 4])) is None
    assert stack_memory([(None, 2)]) is None


def test_logprobs_are_the_models_own_distribution(model):
    (p,) = prompts(6)
    seq = Sequence(p, 4, Sampling(temperature=2.0, seed=1), logprobs=3)
    decoder = BatchDecoder(model)
    steps = [decoder.add([seq])[0]] + [decoder.step()[0] for _ in range(3)]
    ids = list(p)
    for st in steps:
        with torch.no_grad():
            full = model(torch.tensor([ids]))[0][0, -1].log_softmax(-1)
        assert st.logprob == pytest.approx(float(full[st.token]), abs=1e-4)
        assert [t for t, _ in st.top] == full.topk(3).indices.tolist()
        ids.append(st.token)


def test_logit_bias_and_penalties(model):
    (p,) = prompts(5)
    forced = Sequence(p, 6, Sampling(logit_bias={42: 100.0}))
    BatchDecoder(model).add([forced])
    plain = generate_ids(model, [p], max_new_tokens=24)[0]
    penalised = Sequence(p, 24, Sampling(frequency_penalty=2.0, presence_penalty=2.0))
    decoder = BatchDecoder(model)
    decoder.add([penalised])
    while decoder.seqs:
        decoder.step()
    assert forced.tokens[0] == 42
    assert len(set(penalised.tokens)) > len(set(plain))  # repeating costs: more distinct tokens


def test_a_prompt_past_the_context_is_refused(model):
    from hiermem.errors import HiermemError

    with pytest.raises(HiermemError, match="exceeds the model's context of 32 tokens"):
        BatchDecoder(model).add([Sequence(prompts(30)[0], 4)])


# --- stop strings ------------------------------------------------------------------------------------------


def stream_of(pieces, stops):
    """Feed TextStream the tokens of `pieces` (each one token's bytes, decoded as a byte-level BPE does) one at
    a time; what it sends after each, and whether a stop string ended it."""
    pieces = [p.encode() if isinstance(p, str) else p for p in pieces]
    s = TextStream(lambda toks: b"".join(pieces[t] for t in toks).decode("utf-8", errors="replace"), stops)
    sent, tokens = [], []
    for t in range(len(pieces)):
        tokens.append(t)
        if s(tokens):
            sent.append(s.take())
            return sent, True
        sent.append(s.take())
    sent.append(s.take(final=True))
    return sent, False


def test_a_stop_string_across_tokens_ends_the_text_before_it():
    sent, stopped = stream_of(["Hello", " wor", "ld\nUs", "er: hi"], ["\nUser:"])
    assert stopped and "".join(sent) == "Hello world"
    assert sent == ["Hello", " wor", "ld", ""]  # "\nUs" might begin the stop string: held back, then cut


def test_held_back_text_is_sent_once_it_cannot_be_a_stop_string():
    sent, stopped = stream_of(["a\nU", "nder", " it"], ["\nUser:"])
    assert not stopped and sent == ["a", "\nUnder", " it", ""]
    sent, _ = stream_of(["x", "\nU"], ["\nUser:"])
    assert sent == ["x", "", "\nU"]  # the sequence ended: nothing is held back any more


def test_an_unfinished_utf8_character_waits_for_its_last_byte():
    sent, _ = stream_of([b"caf", b"\xc3", b"\xa9!"], [])  # "é" is split over two tokens
    assert sent == ["caf", "", "é!", ""]


def test_stop_strings_in_a_decoding_batch(model):
    (p,) = prompts(4)
    full = generate_ids(model, [p], max_new_tokens=12)[0]
    decode = lambda toks: "".join(f"<{t}>" for t in toks)  # noqa: E731
    stop = f"<{full[4]}><{full[5]}>"
    text = TextStream(decode, [stop])
    seq = Sequence(p, 12, stop=text)
    decoder = BatchDecoder(model)
    decoder.add([seq])
    while decoder.seqs:
        decoder.step()
    first = decode(full).find(stop)
    assert seq.finish_reason == "stop" and text.text == decode(full)[:first]
