"""`hiermem export RUN OUT`: a run's anchor as a transformers model, its tokenizer, and the memory beside it.

OUT/
  config.json, model.safetensors, generation_config.json     the anchor (AutoModelForCausalLM.from_pretrained)
  tokenizer.json, tokenizer_config.json                       the run's tokenizer.json, byte for byte
  modeling_hiermem.py                                         only when no stock architecture matches (below)
  hiermem/export.json                                         what was exported, from which run
  hiermem/config.yaml                                         the run's config (routing, memory shape, storage)
  hiermem/tree.npz, hiermem/bank/, hiermem/knn_*.npy         memory runs: tree, bank, knn router's index

Architecture: an anchor without QK-norm whose d_model is a multiple of n_heads is exactly a stock Llama
(LlamaForCausalLM: pre-norm RMSNorm blocks, SwiGLU, rotate-half RoPE, no biases, explicit head_dim). Any other
anchor (the default: QK-norm over the full q and k projections) has no stock architecture and is exported as
`hiermem` with its modeling code (model/hf/modeling_hiermem.py, copied into OUT), which
`AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)` loads; hiermem.hf.MemoryModel loads the
same classes from hiermem itself, without remote code.

Generation: generation_config.json names the end-of-document token as eos and pad, and no BOS is added (hiermem
trains and generates without one), so transformers' greedy `generate` gives hiermem's greedy tokens and stops
where `hiermem generate` does. The tokenizer splits a literal "<|endoftext|>" in text into ordinary tokens,
as hiermem does (split_special_tokens), and pads on the left for batched generation. hiermem never adds
special tokens when encoding: its own BPE has no post-processor, but a user's tokenizer.json (data.tokenizer)
that has one needs add_special_tokens=False to encode as hiermem does.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from hiermem.config import ModelConfig, save_config
from hiermem.data.tokenizer import EOS
from hiermem.errors import HiermemError
from hiermem.eval.evaluate import open_run
from hiermem.model.hf import modeling_hiermem
from hiermem.model.hf.modeling_hiermem import HiermemConfig, HiermemForCausalLM
from hiermem.io_utils import atomic_dir, atomic_write_json
from hiermem.model.transformer import Transformer
from hiermem.routing.doc_index import KNN_BLOCK_DOCS

EXPORT_DIR = "hiermem"  # inside OUT: everything besides the transformers model
EXPORT_FORMAT, EXPORT_VERSION = "hiermem-export", 1


def is_stock_llama(cfg: ModelConfig) -> bool:
    """Whether the anchor is exactly a LlamaForCausalLM (which refuses d_model % n_heads != 0)."""
    return not cfg.qk_norm and cfg.d_model % cfg.n_heads == 0


def hf_config(cfg: ModelConfig, eos_id: int) -> LlamaConfig:
    """The transformers config of an anchor: Llama's fields, plus qk_norm for the hiermem architecture."""
    fields = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
        head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_base)},
        attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id)
    if is_stock_llama(cfg):
        return LlamaConfig(architectures=["LlamaForCausalLM"], **fields)
    return HiermemConfig(qk_norm=cfg.qk_norm, architectures=["HiermemForCausalLM"],
                         auto_map={"AutoConfig": "modeling_hiermem.HiermemConfig",
                                   "AutoModelForCausalLM": "modeling_hiermem.HiermemForCausalLM"}, **fields)


def generation_config(eos_id: int) -> GenerationConfig:
    """Greedy by default; the end-of-document token ends generation and pads finished rows."""
    return GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, bos_token_id=None, do_sample=False)


def hf_name(key: str) -> str:
    """A native anchor weight's name in transformers' Llama layout."""
    if key in ("norm.weight", "lm_head.weight"):
        return "model.norm.weight" if key == "norm.weight" else key
    for old, new in (("tok_emb.", "model.embed_tokens."), ("blocks.", "model.layers."),
                     (".attn_norm.", ".input_layernorm."), (".ffn_norm.", ".post_attention_layernorm."),
                     (".attn.", ".self_attn."), (".ffn.", ".mlp.")):
        key = key.replace(old, new)
    return key


def anchor_to_hf(model: Transformer, eos_id: int) -> PreTrainedModel:
    """The native anchor as a transformers causal LM with the same weights (fp32, eval mode)."""
    config = hf_config(model.cfg, eos_id)
    hf = (LlamaForCausalLM if is_stock_llama(model.cfg) else HiermemForCausalLM)(config)
    state = {hf_name(k): v.detach().float().cpu() for k, v in model.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]:
        raise AssertionError(f"anchor -> transformers names: missing {missing}, unexpected {unexpected}")
    hf.generation_config = generation_config(eos_id)
    return hf.eval()


def save_anchor(model: Transformer, eos_id: int, out: Path) -> dict:
    """The anchor as a transformers model folder (config, weights, generation config, and the modeling code
    when the architecture is not stock). Returns what export.json records about it."""
    hf = anchor_to_hf(model, eos_id)
    hf.save_pretrained(out)
    stock = is_stock_llama(model.cfg)
    if not stock:
        shutil.copyfile(modeling_hiermem.__file__, out / "modeling_hiermem.py")
    return {"architecture": type(hf).__name__, "trust_remote_code": not stock}


def save_tokenizer(tokenizer_json: Path, out: Path, max_len: int, eos: str = EOS) -> None:
    """tokenizer_config.json for AutoTokenizer, and the run's tokenizer.json itself (same fingerprint).
    eos: the run's end-of-document token (a checkpoint's own when its tokenizer has no "<|endoftext|>")."""
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=eos, pad_token=eos,
                                  split_special_tokens=True, padding_side="left", model_max_length=max_len)
    tok.save_pretrained(out)
    shutil.copyfile(tokenizer_json, out / "tokenizer.json")


KNN_FILES = ("knn_emb.npy", "knn_paths.npy")  # the knn router's index in an export


def write_knn_index(clustering, is_val, side: Path) -> None:
    """The knn router's index: the training documents' embeddings and paths (the documents eval/inference.py
    indexes), written as KNN_FILES into side, KNN_BLOCK_DOCS documents at a time (an export opens them
    memory-mapped)."""
    emb, paths = clustering.doc_emb(), clustering.doc_paths
    n = len(is_val) - int(np.count_nonzero(is_val))
    out_emb = np.lib.format.open_memmap(side / KNN_FILES[0], "w+", emb.dtype, (n, emb.shape[1]))
    out_paths = np.lib.format.open_memmap(side / KNN_FILES[1], "w+", paths.dtype, (n, paths.shape[1]))
    at = 0
    for a in range(0, len(emb), KNN_BLOCK_DOCS):
        keep = ~np.asarray(is_val[a : a + KNN_BLOCK_DOCS], bool)
        m = int(keep.sum())
        out_emb[at : at + m] = np.asarray(emb[a : a + KNN_BLOCK_DOCS])[keep]
        out_paths[at : at + m] = np.asarray(paths[a : a + KNN_BLOCK_DOCS])[keep]
        at += m
    for arr in (out_emb, out_paths):
        arr.flush()  # atomic_dir fsyncs the folder's files before its rename
    del out_emb, out_paths


def export_run(run_dir: str | Path, out: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """Write the export of run_dir into the new folder out (atomically: complete or absent). Returns export.json."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HiermemError(f"{out}: already exists and is not an empty folder (export into a new folder)")
    run = open_run(str(run_dir), overrides, device="cpu")
    if run.bank is not None and run.bank.spec.kind != "ffn":  # the transformers side adds FFN memories only
        raise HiermemError(f"{run_dir}: memory.kind={run.bank.spec.kind}: export supports ffn memory only")
    meta = {"format": EXPORT_FORMAT, "format_version": EXPORT_VERSION, "run": str(run.path.resolve()),
            "memory": run.bank is not None, "eos_id": run.tokenizer.eos_id}
    # before writing anything: the clustering checks the data directory (tokenizer, tree) in one-line errors
    clustering, is_val = (run.clustering(), run.data().is_val()) if run.bank is not None else (None, None)
    with atomic_dir(out) as tmp:
        meta.update(save_anchor(run.model, run.tokenizer.eos_id, tmp))
        save_tokenizer(run.path / "tokenizer.json", tmp, run.cfg.model.max_seq_len, run.tokenizer.eos_token)
        side = tmp / EXPORT_DIR
        side.mkdir()
        save_config(run.cfg, side / "config.yaml")  # the run's config, with the overrides given here
        if run.bank is not None:  # the tree, the bank at its current generation (weights only), the knn index
            run.tree.save(side / "tree.npz")
            run.bank.save(side / "bank")
            write_knn_index(clustering, is_val, side)
        atomic_write_json(side / "export.json", meta)
    return meta


__all__ = ["EXPORT_DIR", "anchor_to_hf", "export_run", "generation_config", "hf_config", "hf_name",
           "is_stock_llama", "save_anchor", "save_tokenizer"]
