import json

import pytest

from hiermem.data.tokenizer import EOS, Tokenizer, train_tokenizer
from hiermem.errors import HiermemError

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France; population 2,102,650 (2023).",
    "Zürich, Kraków, 東京, Москва — naïve café résumé 🎉",
    "def f(x):\n\treturn x ** 2  # trailing   spaces   \n\n",
    "Numbers: 0 1 12 123 1234 3.14159 -42 1e-9",
]
ROUND_TRIP = [
    "",
    " leading and trailing ",
    "tabs\tand\nnewlines\r\n\n  indented",
    "unicode: 東京 Москва 🎉👩‍👩‍👧 e\u0301",
    "numbers 9876543210 0.000001 ½",
    "never seen: ǅ ༀ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    f"a literal {EOS} in text",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)


def test_round_trip(tok):
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch(ROUND_TRIP) == [tok.encode(t) for t in ROUND_TRIP]


def test_eos_and_vocab(tok):
    assert tok.eos_id == 0
    assert 257 < tok.vocab_size <= 300
    assert tok.eos_id not in tok.encode(f"x {EOS} y")  # text cannot forge a document boundary
    assert tok.decode([tok.eos_id]) == EOS
    assert max(i for t in CORPUS for i in tok.encode(t)) < tok.vocab_size


def test_save_load(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.json")
    assert json.loads(path.read_text())  # a plain tokenizer.json
    loaded = Tokenizer.load(path)
    assert loaded.fingerprint() == tok.fingerprint()
    assert loaded.encode_batch(ROUND_TRIP) == tok.encode_batch(ROUND_TRIP)
    assert Tokenizer.load(tmp_path).fingerprint() == tok.fingerprint()  # folder -> tokenizer.json in it
    assert not [p for p in tmp_path.iterdir() if p.name != "tokenizer.json"]  # no temp files left


def test_deterministic_and_sensitive(tok):
    again = train_tokenizer(CORPUS, vocab_size=300, min_frequency=1)
    assert again.fingerprint() == tok.fingerprint()
    other = train_tokenizer(CORPUS[:2], vocab_size=300, min_frequency=1)
    assert other.fingerprint() != tok.fingerprint()


def test_load_errors(tmp_path, tok):
    missing = tmp_path / "nope.json"
    with pytest.raises(HiermemError, match=r"nope.json: no such file or directory"):
        Tokenizer.load(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(HiermemError, match=r"bad.json: not a valid tokenizer.json \(") as e:
        Tokenizer.load(bad)
    assert "\n" not in str(e.value)
    no_eos = json.loads(tok.to_json())
    no_eos["added_tokens"] = []
    del no_eos["model"]["vocab"][EOS]
    p = tmp_path / "noeos.json"
    p.write_text(json.dumps(no_eos))
    with pytest.raises(HiermemError, match=r'noeos.json: tokenizer has no "<\|endoftext\|>" token'):
        Tokenizer.load(p)


def test_vocab_too_small():
    with pytest.raises(HiermemError, match="vocab_size must be at least 257"):
        train_tokenizer(CORPUS, vocab_size=100)


class _Tok:
    vocab_size = 3000


def test_resolve_vocab_rounds_up_and_refuses_a_smaller_model():
    from hiermem.config import load_config
    from hiermem.data.tokenizer import resolve_vocab

    cfg = load_config("tiny")
    resolve_vocab(cfg, _Tok())
    assert cfg.model.vocab_size == 3008
    cfg.model.vocab_size = 2048
    with pytest.raises(HiermemError, match="model.vocab_size=2048 is smaller than the tokenizer's 3000"):
        resolve_vocab(cfg, _Tok())


def checkpoint_tokenizer(folder, **files):
    """A tiny tokenizer.json built here whose only specials are <s> and </s> (no <|endoftext|>), in a folder
    with the given checkpoint files (name -> JSON content)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    hf = HF(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, min_frequency=1, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    for name, content in files.items():
        (folder / name).write_text(json.dumps(content))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("files", [
    {"tokenizer_config.json": {"eos_token": "</s>"}},
    {"tokenizer_config.json": {"eos_token": {"content": "</s>", "special": True}}},
    {"tokenizer_config.json": {}, "generation_config.json": {"eos_token_id": [1, 0]}},
    {"config.json": {"eos_token_id": 1}},
])
def test_a_checkpoint_tokenizer_without_endoftext_ends_documents_with_its_own_eos(tmp_path, files):
    tok = Tokenizer.load(checkpoint_tokenizer(tmp_path / "ckpt", **files))
    assert (tok.eos_token, tok.eos_id) == ("</s>", 1)
    assert tok.eos_id not in tok.encode("a </s> b")  # text cannot forge a document boundary
    (tmp_path / "copy").mkdir()
    copy = Tokenizer.load(tok.save(tmp_path / "copy"))  # a copy (the data directory's) keeps the eos
    assert (copy.eos_id, copy.fingerprint()) == (1, tok.fingerprint())
    assert json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text()) == {"eos_token": "</s>"}


def test_a_tokenizer_with_no_eos_anywhere_is_one_line(tmp_path):
    path = checkpoint_tokenizer(tmp_path / "ckpt", **{"config.json": {"eos_token_id": None}})
    with pytest.raises(HiermemError, match=r'tokenizer has no "<\|endoftext\|>" token and .* names no eos token') as e:
        Tokenizer.load(path)
    assert "\n" not in str(e.value)


def test_prepare_records_and_packs_with_the_checkpoint_eos(tmp_path):
    from hiermem.config import load_config
    from hiermem.data.prepare import prepare

    path = checkpoint_tokenizer(tmp_path / "ckpt", **{"tokenizer_config.json": {"eos_token": "</s>"}})
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": t}) + "\n" for i, t in enumerate(CORPUS)))
    cfg = load_config("tiny", [f"data.corpus={corpus}", f"data.dir={tmp_path / 'data'}", f"data.tokenizer={path}",
                               "data.val_fraction=0.0", "data.seq_len=16", "data.workers=1"])
    data = prepare(cfg)
    assert json.loads((data.path / "prepare.json").read_text())["eos_token"] == "</s>"
    assert data.tokenizer().eos_id == 1
    packed = data.packed("train", 16)
    assert packed.meta["eos_id"] == 1 and (packed.tokens == 1).any()  # documents end with </s>
