"""Post-hoc memories on a transformers checkpoint through `hiermem train model.hf=PATH` (model/hf/causal_lm.py,
model/build.py and the Trainer's two hooks): the bank trains on a frozen base that stays bit-identical, an exported
native anchor trains exactly as the native frozen run does, the run evaluates and generates like a native one,
and bad input is refused in one line."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from hiermem.cli import main
from hiermem.config import load_config
from hiermem.errors import HiermemError
from hiermem.eval.generation import generate_ids
from hiermem.eval.run import Run
from hiermem.memory.fetch import fetch
from hiermem.hf.export import save_anchor, save_tokenizer
from hiermem.model.hf.causal_lm import CausalLM
from hiermem.train.loop import Trainer, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads


def data_dir(overrides):
    return next(o.split("=", 1)[1] for o in overrides if o.startswith("data.dir="))


def checkpoint(folder, family, tokenizer_json):
    """A tiny random transformers checkpoint with the data's tokenizer (so its ids are the data's)."""
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=576, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    else:
        model = GPT2LMHeadModel(GPT2Config(vocab_size=576, n_embd=48, n_layer=2, n_head=4, n_positions=64,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    model.save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return folder


def losses(run_dir):
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def posthoc(longtail_data, run_dir, hf, *overrides):
    return load_config("tiny", [*longtail_data, f"model.hf={hf}", "train.mode=frozen", f"train.run_dir={run_dir}",
                                "memory.lr=3e-2", *overrides])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_short_posthoc_run_lowers_the_loss_and_leaves_the_base_bit_identical(longtail_data, tmp_path, family):
    hf = checkpoint(tmp_path / "ckpt", family, f"{data_dir(longtail_data)}/tokenizer.json")
    files = {p.name: p.read_bytes() for p in hf.iterdir()}
    base = {k: v.clone() for k, v in CausalLM.load(load_config("tiny", [f"model.hf={hf}"]).model, True)
            .hf.state_dict().items()}
    trainer = Trainer(posthoc(longtail_data, tmp_path / "run", hf, "train.max_steps=12"), progress=False)
    assert trainer.cfg.model.d_model == 48 and trainer.cfg.model.n_layers == 2  # the checkpoint's shape
    trainer.run()
    seen = losses(tmp_path / "run")
    assert np.mean(seen[-3:]) < seen[0] - 0.05
    after = trainer.model.hf.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)
    assert {p.name: p.read_bytes() for p in hf.iterdir()} == files  # the checkpoint folder is untouched
    assert trainer.model.state_dict() == {}  # the run keeps the bank only; its base is model.hf

    run = Run(tmp_path / "run", device="cpu")  # evaluates and generates like a native run
    assert isinstance(run.model, CausalLM)
    paths = torch.from_numpy(np.asarray(run.clustering().doc_paths[:2], dtype=np.int64))
    memory = fetch(run.bank, paths, None, device=torch.device("cpu")).memory
    prompts = [run.tokenizer.encode("The capital of"), run.tokenizer.encode("Population")]
    cached = generate_ids(run.model, prompts, memory=memory, max_new_tokens=6, eos_id=run.tokenizer.eos_id)
    fresh = generate_ids(run.model, prompts, memory=memory, max_new_tokens=6, eos_id=run.tokenizer.eos_id,
                         use_cache=False)
    assert cached == fresh
    with torch.no_grad():  # the memory reaches the checkpoint's MLPs
        ids = torch.tensor([prompts[0]])
        assert not torch.equal(run.model(ids, memory=memory.rows(slice(0, 1)))[0], run.model(ids)[0])


def test_an_exported_anchor_trains_post_hoc_as_the_native_frozen_run(longtail_data, tmp_path):
    """Same data, seed, bank init and document mask: the two paths compute the same steps."""
    anchor = tmp_path / "anchor"
    train(load_config("tiny", [*longtail_data, "train.max_steps=6", f"train.run_dir={anchor}"]), progress=False)
    native_run = Run(anchor, device="cpu")
    out = tmp_path / "export"
    out.mkdir()
    save_anchor(native_run.model, native_run.tokenizer.eos_id, out)
    save_tokenizer(anchor / "tokenizer.json", out, 64)
    steps = ["train.max_steps=6", "train.seed=3"]
    native = Trainer(load_config("tiny", [*longtail_data, "train.mode=frozen", f"train.init_from={anchor}",
                                          f"train.run_dir={tmp_path / 'native'}", *steps]), progress=False)
    native.run()
    post = Trainer(posthoc(longtail_data, tmp_path / "posthoc", out, "memory.lr=1e-2", *steps), progress=False)
    post.run()
    np.testing.assert_allclose(losses(tmp_path / "posthoc"), losses(tmp_path / "native"), rtol=1e-4)
    for key in native.bank.parts():
        np.testing.assert_allclose(post.bank.read_part(key, "w"), native.bank.read_part(key, "w"), atol=1e-5)


def test_cotrain_fine_tunes_the_base_and_the_run_reloads_it(longtail_data, tmp_path):
    hf = checkpoint(tmp_path / "ckpt", "llama", f"{data_dir(longtail_data)}/tokenizer.json")
    trainer = Trainer(posthoc(longtail_data, tmp_path / "run", hf, "train.mode=cotrain", "train.max_steps=3"),
                      progress=False)
    before = trainer.model.hf.model.embed_tokens.weight.clone()
    trainer.run()
    assert not torch.equal(trainer.model.hf.model.embed_tokens.weight, before)
    run = Run(tmp_path / "run", device="cpu")
    assert torch.equal(run.model.hf.model.embed_tokens.weight, trainer.model.hf.model.embed_tokens.weight)


def test_bad_input_is_one_line_and_exit_code_2(longtail_data, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(HiermemError, match="not a transformers checkpoint"):
        Trainer(posthoc(longtail_data, tmp_path / "a", tmp_path / "empty"), progress=False)
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(HiermemError, match="is not supported"):
        Trainer(posthoc(longtail_data, tmp_path / "b", odd), progress=False)
    other = checkpoint(tmp_path / "other", "llama", f"{data_dir(longtail_data)}/tokenizer.json")
    tok = json.loads((other / "tokenizer.json").read_text())
    tok["model"]["vocab"] = {k + "x" if v == 7 else k: v for k, v in tok["model"]["vocab"].items()}
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(HiermemError, match="tokenised with another tokenizer"):
        Trainer(posthoc(longtail_data, tmp_path / "c", other), progress=False)
    with pytest.raises(HiermemError, match="train.mode frozen or cotrain"):
        Trainer(posthoc(longtail_data, tmp_path / "d", other, "train.mode=scratch"), progress=False)
    capsys.readouterr()
    code = main(["train", "--quiet", *longtail_data, f"model.hf={tmp_path / 'empty'}", "train.mode=frozen",
                 f"train.run_dir={tmp_path / 'e'}"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "not a transformers checkpoint" in err


def test_params_reports_the_checkpoint_shape_not_the_presets(tmp_path, capsys):
    from hiermem.memory.spec import parameter_report
    from hiermem.model.hf.causal_lm import checkpoint_shape

    tok = tmp_path / "tok.json"
    tok.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}')
    hf = checkpoint(tmp_path / "ckpt", "llama", tok)
    cfg = load_config("tiny", [f"model.hf={hf}", "train.mode=frozen"])
    cfg.model = checkpoint_shape(cfg.model)[0]
    expected = parameter_report(cfg)
    assert main(["params", "-c", "tiny", f"model.hf={hf}", "train.mode=frozen"]) in (0, None)
    printed = {k.strip(): int(v.replace(",", "")) for k, v in
               (line.split(":") for line in capsys.readouterr().out.strip().splitlines())}
    assert printed == expected
    assert expected != parameter_report(load_config("tiny", ["model.vocab_size=576", "train.mode=frozen"]))
    assert cfg.model.d_model == 48 and cfg.model.vocab_size == 576  # the checkpoint's, not tiny's
