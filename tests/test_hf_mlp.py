"""model/hf/mlp.py: fetched memory in transformers causal LMs, one tiny random model per supported family, built from
its config class and saved with save_pretrained (no hub). Zero memory: bit-identical logits; memory: the same
logits (and memory gradients) as the explicitly widened MLP."""

import pytest
import torch
from transformers import (Gemma2Config, Gemma3TextConfig, GPT2Config, GPTNeoXConfig, LlamaConfig, MistralConfig,
                          Qwen2Config, Qwen3Config)

from hiermem.errors import HiermemError
from hiermem.model.hf.load import load_model
from hiermem.model.hf.mlp import MemoryHooks, decoder_mlps
from hiermem.model.hf.modeling_hiermem import HiermemConfig, HiermemForCausalLM
from hiermem.model.fetched import DOWN, GATE, UP, FetchedMemory, MemoryPart

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.torch_threads

D, FF, V, R = 32, 48, 97, 6
GATED = dict(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64, initializer_range=0.2)
CONFIGS = {
    "llama": lambda: LlamaConfig(**GATED),
    "mistral": lambda: MistralConfig(**GATED),
    "qwen2": lambda: Qwen2Config(**GATED),
    "qwen3": lambda: Qwen3Config(head_dim=16, **GATED),
    "gemma2": lambda: Gemma2Config(head_dim=16, query_pre_attn_scalar=16, **GATED),
    "gemma3_text": lambda: Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, **GATED),
    "hiermem": lambda: HiermemConfig(head_dim=8, qk_norm=True, **GATED),  # attention width 16 != d
    "gpt_neox": lambda: GPTNeoXConfig(vocab_size=V, hidden_size=D, intermediate_size=FF, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=64, initializer_range=0.2),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=D, n_inner=FF, n_layer=2, n_head=2, n_positions=64,
                               initializer_range=0.2),
}
# the MLP's projections: (gate, up, down); GPT-2's Conv1D stores weights as [in, out]
PROJ = {"gpt_neox": (None, "dense_h_to_4h", "dense_4h_to_h"), "gpt2": (None, "c_fc", "c_proj")}


def proj_names(model_type):
    return PROJ.get(model_type, ("gate_proj", "up_proj", "down_proj"))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(model_type, folder): a tiny random model saved with save_pretrained, as a user's checkpoint would be."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    build = HiermemForCausalLM if isinstance(config, HiermemConfig) else AutoModelForCausalLM.from_config
    build(config).save_pretrained(folder)
    return request.param, folder


def random_neurons(n_layers, batch=2, seed=1, zero_down=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(batch, n_layers, 3, R, D, generator=g) * 0.3
    if zero_down:
        w[:, :, DOWN] = 0
    return w


def tokens(batch=2, length=9, seed=2):
    return torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(seed))


def widened(model_type, folder, neurons):
    """The plain model with every layer's MLP widened by one sequence's neurons [n_layers, 3, R, d] (zero
    neurons where the memory does not reach): the reference the hooks must reproduce."""
    model = load_model(folder)
    config = model.config
    if model_type == "gpt2":
        config.n_inner = FF + R
    else:
        config.intermediate_size = FF + R
    wide = type(model)(config).eval()
    state = model.state_dict()
    gate, up, down = proj_names(model_type)
    conv = model_type == "gpt2"
    for i, mlp in enumerate(decoder_mlps(model)):
        prefix = next(k for k, m in model.named_modules() if m is mlp)
        n = neurons[i]
        if gate is not None:
            state[f"{prefix}.{gate}.weight"] = torch.cat([mlp.get_submodule(gate).weight, n[GATE]])
        w_in, w_out = mlp.get_submodule(up).weight, mlp.get_submodule(down).weight
        state[f"{prefix}.{up}.weight"] = torch.cat([w_in, n[UP].T], 1) if conv else torch.cat([w_in, n[UP]])
        state[f"{prefix}.{down}.weight"] = torch.cat([w_out, n[DOWN]], 0) if conv else torch.cat([w_out, n[DOWN].T], 1)
        if mlp.get_submodule(up).bias is not None:  # a memory neuron has no bias
            state[f"{prefix}.{up}.bias"] = torch.cat([mlp.get_submodule(up).bias, torch.zeros(R)])
    wide.load_state_dict(state)
    return wide


def test_every_family_is_declared_and_others_are_refused(tmp_path):
    from transformers import OPTConfig

    assert set(CONFIGS) == {"llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "hiermem", "gpt_neox",
                            "gpt2"}
    OPTConfig(hidden_size=D, num_hidden_layers=1, ffn_dim=FF, num_attention_heads=2, vocab_size=V,
              word_embed_proj_dim=D).save_pretrained(tmp_path)
    with pytest.raises(HiermemError) as e:
        load_model(tmp_path)
    assert str(e.value) == (f"{tmp_path}: architecture ? (model_type 'opt') is not supported; supported model "
                            "types: gemma2, gemma3_text, gpt2, gpt_neox, hiermem, llama, mistral, qwen2, qwen3")
    config_only = tmp_path / "llama"
    LlamaConfig(**GATED).save_pretrained(config_only)
    with pytest.raises(HiermemError) as e:
        load_model(config_only)
    assert str(e.value) == f"{config_only}: no weights (model.safetensors or pytorch_model.bin)"


@pytest.mark.parametrize("make", ["missing", "file", "no_config", "bad_json"])
def test_a_folder_that_is_not_a_checkpoint_gets_one_line(tmp_path, make):
    path = tmp_path / "ckpt"
    expected = {"missing": f"{path}: not a folder (expected a transformers checkpoint folder)",
                "file": f"{path}: not a folder (expected a transformers checkpoint folder)",
                "no_config": f"{path}: not a transformers checkpoint (no config.json)"}
    if make == "file":
        path.write_text("x")
    elif make in ("no_config", "bad_json"):
        path.mkdir()
        if make == "bad_json":
            (path / "config.json").write_text("{not json")
    with pytest.raises(HiermemError) as e:
        load_model(path)
    if make == "bad_json":
        assert str(e.value).startswith(f"{path}/config.json: cannot be read (") and "\n" not in str(e.value)
    else:
        assert str(e.value) == expected[make]


def test_zero_memory_is_bit_identical_to_the_plain_model(saved):
    model_type, folder = saved
    model = load_model(folder)
    ids = tokens()
    with torch.no_grad():
        plain = model(ids).logits
        hooks = MemoryHooks(model)
        with hooks.using(FetchedMemory.per_sequence(random_neurons(2, zero_down=True))):
            zero = model(ids).logits
        with hooks.using(None):
            none = model(ids).logits
        hooks.remove()
        after = model(ids).logits
    assert torch.equal(zero, plain) and torch.equal(none, plain) and torch.equal(after, plain)


@pytest.mark.parametrize("first_layer", [0, 1])
def test_memory_equals_the_explicitly_widened_mlp(saved, first_layer):
    """All layers, and a layer range (layer 1 only): each sequence's logits are those of the model whose MLPs
    carry that sequence's neurons as extra hidden units."""
    model_type, folder = saved
    model = load_model(folder)
    n_mem = 2 - first_layer
    neurons = random_neurons(n_mem)
    ids = tokens()
    hooks = MemoryHooks(model)
    with torch.no_grad(), hooks.using(FetchedMemory.per_sequence(neurons, first_layer=first_layer)):
        got = model(ids).logits
    for b in range(len(ids)):
        full = torch.cat([torch.zeros(first_layer, 3, R, D), neurons[b]])  # zero neurons change nothing
        with torch.no_grad():
            want = widened(model_type, folder, full)(ids[b:b + 1]).logits[0]
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-5)
    with torch.no_grad():
        assert not torch.allclose(got, model(ids).logits, atol=1e-3)  # the memory does change the output


def test_memory_gradients_equal_the_widened_mlps_gradients(saved):
    """What post-hoc training needs: the gradient reaching each fetched block (shared by both rows here) is the
    sum of the widened models' gradients on their extra rows."""
    model_type, folder = saved
    model = load_model(folder)
    g = torch.Generator().manual_seed(3)
    block = (torch.randn(1, 2, 3, R, D, generator=g) * 0.3).requires_grad_()
    memory = FetchedMemory([MemoryPart(block, torch.tensor([0, 0]), 0, "level0")], R)
    ids = tokens()
    hooks = MemoryHooks(model)
    with hooks.using(memory):
        model(ids).logits.float().square().mean().backward()
    gate, up, down = proj_names(model_type)
    conv = model_type == "gpt2"
    want = torch.zeros_like(block[0])
    for b in range(len(ids)):
        wide = widened(model_type, folder, block[0].detach())
        (wide(ids[b:b + 1]).logits.float().square().mean() / len(ids)).backward()
        for i, mlp in enumerate(decoder_mlps(wide)):
            if gate is not None:
                want[i, GATE] += mlp.get_submodule(gate).weight.grad[FF:]
            g_in, g_out = mlp.get_submodule(up).weight.grad, mlp.get_submodule(down).weight.grad
            want[i, UP] += g_in[:, FF:].T if conv else g_in[FF:]
            want[i, DOWN] += g_out[FF:] if conv else g_out[:, FF:].T
    torch.testing.assert_close(block.grad[0], want, rtol=1e-4, atol=1e-6)
    if gate is None:  # plain MLPs never read the GATE rows
        assert torch.equal(block.grad[0, :, GATE], torch.zeros_like(block.grad[0, :, GATE]))


def test_a_memory_that_does_not_fit_the_model_is_refused(saved):
    model_type, folder = saved
    hooks = MemoryHooks(load_model(folder))
    with pytest.raises(HiermemError, match=r"^memory reaches layers 1\.\.2, the model has 2$"):
        with hooks.using(FetchedMemory.per_sequence(random_neurons(2), first_layer=1)):
            pass
    narrow = FetchedMemory.per_sequence(torch.zeros(1, 2, 3, R, D + 1))
    with pytest.raises(HiermemError, match=rf"^memory has width d={D + 1}, the model's hidden size is {D}$"):
        with hooks.using(narrow):
            pass
