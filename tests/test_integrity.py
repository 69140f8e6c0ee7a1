"""Damaged files are refused when loaded (a one-line HiermemError naming the file, and the bank block), damaged
caches are rebuilt, and `hiermem verify` checks everything and digests a run's weights."""

import re
import shutil

import numpy as np
import pytest

from hiermem.cli import main
from hiermem.config import load_config
from hiermem.data.prepare import DataDir
from hiermem.data.tokenizer import Tokenizer
from hiermem.errors import HiermemError
from hiermem.memory.store import open_store
from hiermem.routing.tree import Tree
from hiermem.train.checkpoint import load_state, read_run_format, read_weights, save_weights
from hiermem.verify import verify


def damage(path, how):
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:  # flip one bit in the middle
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def run_copy(memory_run, tmp_path_factory):
    """A copy of the session's memory run, to damage file by file (each test restores what it damaged)."""
    dst = tmp_path_factory.mktemp("integrity") / "run"
    shutil.copytree(memory_run, dst)
    return dst


def _one(name, run):
    (path,) = sorted(run.glob(name))
    return path


def _open_bank(run):
    store = open_store(run / "bank")
    for key, lay in store.layouts.items():
        store.read(key, np.arange(lay.n_blocks), lay.weight_bytes + lay.state_bytes, check=True)


RUN_LOADERS = {  # file (glob in the run) -> what loads it
    "checkpoint/model-*.safetensors": lambda run: load_state(run / "checkpoint"),
    "checkpoint/optimizer-*.pt": lambda run: load_state(run / "checkpoint"),
    "checkpoint/bank-adam-*.npz": lambda run: load_state(run / "checkpoint"),
    "anchor.safetensors": lambda run: read_weights(run / "anchor.safetensors"),
    "run.json": read_run_format,
    "tokenizer.json": lambda run: Tokenizer.load(run / "tokenizer.json"),
    "tree.npz": lambda run: Tree.load(run / "tree.npz"),
    "bank/manifest.json": _open_bank,
    "bank/table-*.npz": _open_bank,
    "bank/level1.*.bin": _open_bank,
}
MESSAGES = {"delete": r"(missing|no such file|not found|not a hiermem run)",
            "truncate": r"(corrupted|truncated|unreadable|cannot read|not a readable)",
            "flip": r"(corrupted|checksum mismatch|unreadable|cannot read|not a readable|do not match)"}


@pytest.mark.parametrize("how", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", sorted(RUN_LOADERS))
def test_a_damaged_run_file_is_refused_naming_it(run_copy, name, how):
    if name == "bank/level1.*.bin":  # the slot file that holds the committed records
        store = open_store(run_copy / "bank")
        path = store.file_of("level1", 0)
    else:
        path = _one(name, run_copy)
    saved = path.read_bytes()
    try:
        damage(path, how)
        with pytest.raises(HiermemError) as e:
            RUN_LOADERS[name](run_copy)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}:")
        assert re.search(MESSAGES[how], msg), msg
    finally:
        path.write_bytes(saved)
    RUN_LOADERS[name](run_copy)  # restored: loads again


def test_a_flipped_byte_in_a_bank_block_names_the_block(run_copy):
    store = open_store(run_copy / "bank")
    lay = store.layouts["level1"]
    path = store.file_of("level1", 3)
    saved = path.read_bytes()
    data = bytearray(saved)
    data[3 * lay.record_bytes + 5] ^= 0x10
    path.write_bytes(bytes(data))
    try:
        with pytest.raises(HiermemError, match=rf"^{path}: block 3 of level 1 is corrupted \(checksum mismatch\)$"):
            _open_bank(run_copy)
        code = main(["verify", str(run_copy)])
        assert code == 1
    finally:
        path.write_bytes(saved)


@pytest.fixture
def data_copy(longtail_data, tmp_path):
    src = DataDir(load_config("tiny", longtail_data).data_dir).path
    shutil.copytree(src, tmp_path / "data", ignore=shutil.ignore_patterns(".lock"))
    return tmp_path / "data"


def _clustering(data):
    from hiermem.routing.clustering import load_clustering

    return load_clustering(DataDir(data), load_config("tiny", ["routing.encoder=wordllama", "memory.ranks=[8,8]"]),
                           required=True)


DATA_LOADERS = {
    "prepare.json": DataDir,
    "split.npy": lambda d: DataDir(d).is_val(),
    "tokenizer.json": lambda d: DataDir(d).tokenizer(),
    "doc_tokens/offsets.npy": lambda d: DataDir(d).doc_tokens(),
    "index/offset.npy": lambda d: DataDir(d).ids(),
    "index/shards.json": lambda d: DataDir(d).ids(),
    "cluster/doc_paths.npy": _clustering,
    "cluster/tree.npz": _clustering,
}


@pytest.mark.parametrize("how", ["truncate", "flip"])
@pytest.mark.parametrize("name", sorted(DATA_LOADERS))
def test_a_damaged_data_file_is_refused_naming_it(data_copy, name, how):
    path = data_copy / name
    damage(path, how)
    with pytest.raises(HiermemError) as e:
        DATA_LOADERS[name](data_copy)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}:"), msg
    assert re.search(MESSAGES[how], msg), msg


def test_a_damaged_packed_cache_is_rebuilt_equal(data_copy, capsys):
    data = DataDir(data_copy)
    out = data.packed_path("train", 64)
    first = data.packed("train", 64)
    clean = {p.name: p.read_bytes() for p in out.iterdir()}
    big = max(clean, key=lambda n: len(clean[n]))
    damage(out / big, "flip")
    data.packed("train", 64)
    assert "packing it again" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == clean and len(first) > 0


def test_a_damaged_embedding_cache_is_rebuilt_equal(data_copy, longtail_data, capsys):
    from hiermem.routing.clustering import cluster

    cfg = load_config("tiny", [*longtail_data, f"data.dir={data_copy}"])
    data = DataDir(data_copy)
    (emb,) = (data_copy / "embeddings").glob("emb-*.npy")
    clean, paths = emb.read_bytes(), (data_copy / "cluster" / "doc_paths.npy").read_bytes()
    damage(emb, "flip")
    cluster(cfg, data, progress=False)
    assert "embedding again" in capsys.readouterr().err
    assert emb.read_bytes() == clean and (data_copy / "cluster" / "doc_paths.npy").read_bytes() == paths


def test_verify_a_data_dir(data_copy, capsys):
    assert main(["verify", str(data_copy)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(f"ok: {data_copy}")
    damage(data_copy / "doc_tokens" / "tokens.npy", "flip")
    assert main(["verify", str(data_copy)]) == 1
    out = capsys.readouterr().out
    tokens = data_copy / "doc_tokens" / "tokens.npy"
    assert f"{tokens}: corrupted file listed in .checksums.json (checksum mismatch)" in out


def test_verify_digest_is_the_same_for_ram_and_disk_banks_and_sees_one_weight(longtail_data, tmp_path, capsys):
    from hiermem.train.loop import train

    digests = {}
    for mmap in ("false", "true"):
        run = tmp_path / f"mmap-{mmap}"
        train(load_config("tiny", [*longtail_data, "train.mode=scratch", "train.max_steps=3", "train.ckpt_every=2",
                                   f"memory.mmap={mmap}", f"train.run_dir={run}"]), progress=False)
        assert main(["verify", str(run)]) == 0
        out = capsys.readouterr().out.splitlines()
        (line,) = [x for x in out if x.startswith("digest: ")]
        digests[mmap] = line.removeprefix("digest: ")
    assert digests["false"] == digests["true"] and len(digests["true"]) == 64
    run = tmp_path / "mmap-true"
    state = read_weights(run / "anchor.safetensors")
    state["norm.weight"][0] += 1.0
    save_weights(state, run / "anchor.safetensors")
    report = verify(run)
    assert not report.problems and report.digest != digests["true"]


def test_verify_names_a_damaged_metrics_line(run_copy, capsys):
    path = run_copy / "metrics.jsonl"
    saved = path.read_text()
    lines = saved.splitlines(keepends=True)
    path.write_text("".join([lines[0], lines[1].replace('"step": 2', '"step": 3'), *lines[2:]]))
    try:
        assert main(["verify", str(run_copy)]) == 1
        assert f"{path}:2: corrupted metrics line (checksum mismatch)" in capsys.readouterr().out
    finally:
        path.write_text(saved)
    assert main(["verify", str(run_copy), "--json"]) == 0


def test_verify_refuses_a_folder_that_is_neither(tmp_path, capsys):
    assert main(["verify", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path}: neither a run directory (config.yaml) nor a "
                                               "data directory (prepare.json)")
