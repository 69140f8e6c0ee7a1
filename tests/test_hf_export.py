"""hf/export.py and hf/memory_model.py: `hiermem export RUN OUT` gives a transformers model whose logits match
hiermem's (fp32, 1e-5), whose greedy `generate` gives hiermem's tokens and stops where hiermem does, a tokenizer
AutoTokenizer loads, and MemoryModel runs it with the run's fetched memory."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

from hiermem.cli import main
from hiermem.config import ModelConfig
from hiermem.errors import HiermemError
from hiermem.eval.evaluate import generate_text, open_run
from hiermem.eval.generation import generate_ids
from hiermem.eval.inference import MemoryContext
from hiermem.hf import MemoryModel
from hiermem.hf.export import save_anchor
from hiermem.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

PROMPTS = ["The city of", "Its population is about"]


def native_anchor(qk_norm, d_model=32, n_heads=2, seed=0):
    cfg = ModelConfig(vocab_size=97, n_layers=2, d_model=d_model, n_heads=n_heads, head_dim=8, d_ff=48,
                      max_seq_len=48, init_std=0.2, qk_norm=qk_norm, tie_embeddings=qk_norm)
    torch.manual_seed(seed)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("qk_norm,d_model,n_heads,architecture", [
    (False, 32, 2, "LlamaForCausalLM"),  # stock: loads without remote code
    (True, 32, 2, "HiermemForCausalLM"),  # full-projection QK-norm: no stock architecture
    (False, 36, 8, "HiermemForCausalLM"),  # 36 % 8 != 0: LlamaConfig refuses it
])
def test_the_exported_anchor_gives_hiermems_logits(tmp_path, qk_norm, d_model, n_heads, architecture):
    model = native_anchor(qk_norm, d_model, n_heads)
    meta = save_anchor(model, eos_id=0, out=tmp_path)
    assert meta == {"architecture": architecture, "trust_remote_code": architecture != "LlamaForCausalLM"}
    assert (tmp_path / "modeling_hiermem.py").is_file() == meta["trust_remote_code"]
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=meta["trust_remote_code"]).eval()
    assert type(hf).__name__ == architecture
    # stock: transformers' own class; else the modeling code shipped in the folder (not hiermem's copy)
    assert type(hf) is LlamaForCausalLM if architecture == "LlamaForCausalLM" else \
        type(hf).__module__.startswith("transformers_modules.")
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids)[0], rtol=0, atol=1e-5)


def test_transformers_generate_stops_where_hiermem_does(tmp_path):
    """The end-of-document token of the generation config ends transformers' greedy decoding at the same step
    as hiermem's (here a token the model does produce, so that both stop early), on a left-padded batch."""
    model = native_anchor(True)
    prompts = [[5, 17, 33, 2], [40, 8]]
    free = generate_ids(model, prompts, max_new_tokens=20)
    eos = free[0][6]  # row 0 reaches it at step 6 (or earlier)
    save_anchor(model, eos_id=eos, out=tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    assert (hf.generation_config.eos_token_id, hf.generation_config.pad_token_id) == (eos, eos)
    want = generate_ids(model, prompts, max_new_tokens=20, eos_id=eos)
    assert len(want[0]) < 20
    ids = torch.tensor([prompts[0], [eos, eos] + prompts[1]])  # left padding, masked
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20)[:, 4:].tolist()
    got = [row[: row.index(eos)] if eos in row else row for row in out]
    assert got == want


def test_the_exported_attention_takes_the_cache_under_either_name(tmp_path):
    """The shipped modeling code runs under the transformers its user has: before 5.24 the decoder layer hands
    the cache over as past_key_values, from 5.24 as cache; either way the keys and values land in it."""
    from transformers.cache_utils import DynamicCache

    save_anchor(native_anchor(True), eos_id=0, out=tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True).eval()
    attn = hf.model.layers[0].self_attn
    x = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(2))
    pe = hf.model.rotary_emb(x, torch.arange(5)[None])
    caches, outs = {}, {}
    with torch.no_grad():
        for name in ("cache", "past_key_values"):
            caches[name] = DynamicCache(config=hf.config)
            outs[name] = attn(x, position_embeddings=pe, attention_mask=None, **{name: caches[name]})[0]
    torch.testing.assert_close(outs["cache"], outs["past_key_values"], rtol=0, atol=0)
    for name, c in caches.items():
        assert c.get_seq_length() == 5, name
    torch.testing.assert_close(caches["cache"].layers[0].keys, caches["past_key_values"].layers[0].keys)


@pytest.fixture(scope="module")
def exported(memory_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "out"
    assert main(["export", str(memory_run), str(out)]) == 0
    return out


def test_the_export_folder(exported, memory_run):
    meta = json.loads((exported / "hiermem" / "export.json").read_text())
    assert meta["architecture"] == "HiermemForCausalLM" and meta["trust_remote_code"] and meta["memory"]
    assert {p.name for p in exported.iterdir()} >= {"config.json", "model.safetensors", "generation_config.json",
                                                   "tokenizer.json", "tokenizer_config.json", "modeling_hiermem.py",
                                                   "hiermem"}
    assert {p.name for p in (exported / "hiermem").iterdir()} == {"export.json", "config.yaml", "tree.npz", "bank",
                                                                 "knn_emb.npy", "knn_paths.npy"}
    assert (exported / "tokenizer.json").read_bytes() == (memory_run / "tokenizer.json").read_bytes()
    run = open_run(str(memory_run), device="cpu")
    gen = GenerationConfig.from_pretrained(exported)
    assert gen.eos_token_id == gen.pad_token_id == run.tokenizer.eos_id and gen.bos_token_id is None
    tok = AutoTokenizer.from_pretrained(exported)
    for text in ["Zürich has a population of about 400,000.", "a literal <|endoftext|> stays text"]:
        assert tok(text).input_ids == run.tokenizer.encode(text)
        assert tok.decode(run.tokenizer.encode(text)) == text
    assert tok.eos_token_id == run.tokenizer.eos_id and tok.padding_side == "left"


def test_the_exported_model_gives_hiermems_logits_and_greedy_tokens(exported, memory_run):
    run = open_run(str(memory_run), device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(exported, trust_remote_code=True).eval()
    assert type(hf).__module__.startswith("transformers_modules.")  # the code shipped in the export
    tok = AutoTokenizer.from_pretrained(exported)
    ids = torch.tensor([run.tokenizer.encode(run.data().texts()[0])[:48]])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, run.model(ids)[0], rtol=0, atol=1e-5)
    batch = tok(PROMPTS, return_tensors="pt", padding=True)
    out = hf.generate(**batch, max_new_tokens=12)[:, batch.input_ids.shape[1]:]
    eos = run.tokenizer.eos_id
    got = [tok.decode(r[: r.index(eos)] if eos in r else r) for r in out.tolist()]
    assert got == generate_text(str(memory_run), PROMPTS, memory="none", max_new_tokens=12, device="cpu")


@pytest.mark.parametrize("memory", ["fetched", "generic", "none"])
def test_memory_model_runs_the_export_with_the_runs_memory(exported, memory_run, memory):
    """Same paths as hiermem's router, the same logits with the fetched (or generic) memory, the same greedy
    tokens as `hiermem generate` with that memory."""
    mm = MemoryModel.from_pretrained(exported, memory=memory)
    run = open_run(str(memory_run), device="cpu")
    ctx = MemoryContext(run, memory)
    if memory == "fetched":
        assert np.array_equal(mm.route(PROMPTS), ctx.route(PROMPTS))
    docs = [run.tokenizer.encode(t) for t in run.data().texts()[:2]]
    n = min(40, *map(len, docs))
    ids = torch.tensor([d[:n] for d in docs])
    with torch.no_grad():  # each row routed on one of the prompts
        want = run.model(ids, memory=ctx.memory_for_texts(PROMPTS))[0]
        got = mm(ids, route_texts=PROMPTS).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    if memory != "none":
        with torch.no_grad():
            assert (got - run.model(ids)[0]).abs().max() > 1e-3  # the memory does change the output
    batch = mm.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = mm.generate(**batch, max_new_tokens=12)[:, batch.input_ids.shape[1]:]
    eos = run.tokenizer.eos_id
    got_text = [mm.tokenizer.decode(r[: r.index(eos)] if eos in r else r) for r in out.tolist()]
    assert got_text == generate_text(str(memory_run), PROMPTS, memory=memory, max_new_tokens=12, device="cpu")


def test_an_export_with_the_older_knn_npz_routes_the_same(exported, tmp_path):
    """Exports written before knn_emb.npy/knn_paths.npy held the index as hiermem/knn.npz: still read."""
    old = tmp_path / "old"
    shutil.copytree(exported, old)
    side = old / "hiermem"
    np.savez(side / "knn.npz", doc_emb=np.load(side / "knn_emb.npy"), doc_paths=np.load(side / "knn_paths.npy"))
    for name in ("knn_emb.npy", "knn_paths.npy"):
        (side / name).unlink()
    assert np.array_equal(MemoryModel.from_pretrained(old).route(PROMPTS),
                          MemoryModel.from_pretrained(exported).route(PROMPTS))


def test_bad_input_gets_one_line_and_exit_code_2(exported, memory_run, tmp_path, capsys):
    not_a_run = tmp_path / "empty"
    not_a_run.mkdir()
    cases = [
        (["export", str(not_a_run), str(tmp_path / "o1")], f"error: {not_a_run}: not a hiermem run directory (no "
                                                           "config.yaml)"),
        (["export", str(memory_run), str(exported)], f"error: {exported}: already exists and is not an empty "
                                                     "folder (export into a new folder)"),
    ]
    for argv, line in cases:
        assert main(argv) == 2
        assert capsys.readouterr().err == line + "\n"
    assert not (tmp_path / "o1").exists()
    with pytest.raises(HiermemError) as e:
        MemoryModel.from_pretrained(not_a_run)
    assert str(e.value) == (f"{not_a_run}: not a hiermem export (no hiermem/export.json; write one with "
                            "`hiermem export RUN OUT`)")
    with pytest.raises(HiermemError, match="^MemoryModel.generate: one memory per prompt"):
        MemoryModel.from_pretrained(exported).generate(torch.tensor([[1, 2]]), num_return_sequences=2)


def test_export_refuses_a_data_directory_of_another_tokenizer(memory_run, tmp_path, capsys):
    """The knn index comes from the run's data directory: one tokenised with another tokenizer is refused."""
    run = open_run(str(memory_run), device="cpu")
    data = tmp_path / "data"
    shutil.copytree(run.cfg.data_dir, data)
    from hiermem.integrity import read_json, write_sealed_json

    meta = read_json(data / "prepare.json")
    meta["tokenizer_fingerprint"] = "0" * 64
    write_sealed_json(data / "prepare.json", meta)  # a consistent file of another tokenizer, not a damaged one
    assert main(["export", str(memory_run), str(tmp_path / "out"), f"data.dir={data}"]) == 2
    assert capsys.readouterr().err == f"error: {data}: tokenised with another tokenizer than the run {memory_run}\n"
    assert not (tmp_path / "out").exists()
