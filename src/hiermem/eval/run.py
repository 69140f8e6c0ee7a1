"""A trained run directory, loaded for evaluation, generation (and later serving).

A run holds everything inference needs besides the data directory: config.yaml (with resolved, absolute data
paths, so the run loads from any working directory), tokenizer.json, tree.npz, anchor.safetensors, bank/ and
run.json (the on-disk format version). A post-hoc run (model.hf) names its base checkpoint in config.yaml;
with a frozen base its anchor.safetensors holds no weights. An unfinished run loads from its last checkpoint: its anchor weights and
the bank generation that checkpoint names. The bank opens read-only, in RAM or (memory.mmap=true) on disk behind
a block cache of memory.cache_bytes.
"""

from __future__ import annotations

from pathlib import Path

from hiermem.config import Config, read_config
from hiermem.data.prepare import DataDir
from hiermem.data.tokenizer import Tokenizer
from hiermem.device import resolve_device
from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.spec import spec_from_config
from hiermem.model.build import build_model
from hiermem.routing.clustering import Clustering, load_clustering
from hiermem.routing.tree import Tree
from hiermem.train.checkpoint import RUN_FORMAT_VERSION, load_state, load_weights, read_run_format


class Run:
    def __init__(self, path: str | Path, device: str = "auto", overrides: list[str] | tuple[str, ...] = ()):
        self.path = Path(path)
        self.format_version = read_run_format(self.path)
        self.cfg: Config = read_config(self.path / "config.yaml", overrides)
        self.tokenizer = Tokenizer.load(self.path / "tokenizer.json")
        if self.tokenizer.vocab_size > self.cfg.model.vocab_size:
            raise HiermemError(f"{self.path}/tokenizer.json: vocabulary larger than the model's (another tokenizer?)")
        self.device = resolve_device(device if device != "auto" else self.cfg.train.device)
        self.model = build_model(self.cfg).to(self.device).eval()  # model.hf: the checkpoint (frozen: as is)
        weights, bank_dir, generation = self.path / "anchor.safetensors", self.path / "bank", None
        if not weights.is_file():  # an unfinished run: its last checkpoint, anchor and bank of the same step
            ckpt = self.path / "checkpoint"
            if self.format_version < 3:  # the checkpoint held a full copy of the bank
                weights, bank_dir = ckpt / "model.safetensors", ckpt / "bank"
            else:
                state = load_state(ckpt)
                weights, generation = ckpt / state["files"]["model"], state["generation"]
        load_weights(self.model, weights)
        self.bank = self.tree = self._data = None
        if self.cfg.uses_memory:
            m = self.cfg.memory
            self.bank = MemoryBank.load(bank_dir, mmap=m.mmap, generation=generation, cache_bytes=m.cache_bytes,
                                        writable=False)
            self.bank.check_compatible(spec_from_config(self.cfg))
            self.tree = Tree.load(self.path / "tree.npz")

    def data(self) -> DataDir:
        """The run's data directory (opened once), refused if tokenised with another tokenizer than the run's."""
        if self._data is None:
            data = DataDir(self.cfg.data_dir)
            if data.meta["tokenizer_fingerprint"] != self.tokenizer.fingerprint():
                raise HiermemError(f"{data.path}: tokenised with another tokenizer than the run {self.path}")
            self._data = data
        return self._data

    def clustering(self) -> Clustering:
        data = self.data()
        c = load_clustering(data, self.cfg, required=True)
        if c.tree.fingerprint() != self.tree.fingerprint():
            raise HiermemError(f"{data.path}/cluster: tree differs from the run's tree.npz (re-clustered since?)")
        return c


__all__ = ["Run", "RUN_FORMAT_VERSION"]
