import json

import numpy as np

from hiermem.data.tokenize_workers import Encoder, encode_records
from hiermem.data.tokenizer import train_tokenizer

TEXTS = ["the quick brown fox", "jumps over\nthe lazy dog", "東京 café", ""]


def test_encode_records_decodes_each_format():
    tok = train_tokenizer(TEXTS * 3, vocab_size=300, min_frequency=1)
    expected = [tok.encode(t) for t in TEXTS[:3]]
    raws = {
        "jsonl": [(json.dumps({"text": t}) + "\n").encode() for t in TEXTS[:3]],
        "txt": [b"the quick brown fox\n", b"jumps over\r\nthe lazy dog", "東京 café".encode()],
        "parquet": TEXTS[:3],
    }
    for fmt, raw in raws.items():
        flat, lengths = encode_records(tok, fmt, raw, np.uint16)
        assert flat.dtype == np.uint16 and lengths.tolist() == [len(e) for e in expected]
        assert flat.tolist() == [i for e in expected for i in e], fmt


def test_in_process_encoder_keeps_batch_order():
    tok = train_tokenizer(TEXTS, vocab_size=300, min_frequency=1)
    batches = [("parquet", [t] * k) for k, t in enumerate(TEXTS * 2, start=1)]
    with Encoder(tok, 1, np.uint16) as enc:
        out = list(enc.map(batches))
    assert [lengths.tolist() for _, lengths in out] == [[len(tok.encode(t))] * len(b) for _, b in batches
                                                         for t in b[:1]]
