"""train/step.py: the one training step (shared by `hiermem train` and `hiermem bench`)."""

import math

import pytest
import torch

from hiermem.bench.train_throughput import build_step, shape_config, synthetic_batch
from hiermem.memory.fetch import block_grads, fetch
from hiermem.train.step import generic_draw

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def tiny_step(section: str, **values):
    """The train suite's tiny memory shape, with cfg.<section>.<key> = value for each keyword."""
    cfg = shape_config("tiny", "scratch", "cpu")
    for key, value in values.items():
        setattr(getattr(cfg, section), key, value)
    return cfg, build_step(cfg, CPU)


def test_the_gradient_norm_covers_the_anchor_and_the_fetched_blocks():
    """Reference by hand: one forward/backward, the squared norms of every anchor gradient and every
    per-block gradient summed, then every gradient scaled by clip / (norm + 1e-6)."""
    cfg = shape_config("tiny", "scratch", "cpu")
    cfg.train.grad_clip = 1e-3  # far below the norm: clipping is active (the norm is taken before it)
    step = build_step(cfg, CPU)
    batch = synthetic_batch(cfg, 0, doc_len=5)

    ref = build_step(cfg, CPU)  # same seed: the same model and bank
    f = fetch(ref.bank, batch["paths"], generic_draw(cfg, 0, len(batch["paths"])), requires_grad=True)
    _, loss = ref.model(batch["input_ids"], batch["targets"], batch["positions"], batch["segment_ids"], f.memory)
    loss.backward()
    bg = block_grads(f, CPU)
    sq = sum(float(p.grad.double().pow(2).sum()) for p in ref.model.parameters())
    sq += sum(float(g.double().pow(2).sum()) for g in bg.grads.values())

    out = step(batch, 0)
    assert float(out["loss"]) == pytest.approx(float(loss.detach()), rel=1e-6)
    assert float(out["grad_norm"]) == pytest.approx(math.sqrt(sq), rel=1e-5)
    assert out["blocks_updated"] == [len(bg.ids[f"level{lv}"]) for lv in range(3)]


def test_below_the_clip_threshold_gradients_are_untouched():
    """With grad_clip above the norm, the step equals the same step with clipping off, bit for bit."""
    results = []
    for clip in (1e9, 0.0):
        cfg, step = tiny_step("train", grad_clip=clip)
        for i in range(2):
            out = step(synthetic_batch(cfg, i, doc_len=5), i)
        results.append((float(out["loss"]), {k: step.bank.part(k).clone() for k in step.bank.parts()},
                        [p.detach().clone() for p in step.model.parameters()]))
    (l1, b1, w1), (l2, b2, w2) = results
    assert l1 == l2
    assert all(torch.equal(b1[k], b2[k]) for k in b1)
    assert all(torch.equal(a, b) for a, b in zip(w1, w2))


def test_micro_batches_equal_one_batch():
    outs = []
    for accum in (1, 4):
        cfg, step = tiny_step("train", grad_accum=accum)
        outs.append(step(synthetic_batch(cfg, 0, doc_len=3), 0))
    assert float(outs[1]["loss"]) == pytest.approx(float(outs[0]["loss"]), rel=1e-6)
    assert float(outs[1]["grad_norm"]) == pytest.approx(float(outs[0]["grad_norm"]), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["anchor", "scratch"])
def test_train_compile_gives_the_eager_losses(mode):
    """train.compile=true compiles every block (the memory branch traces without a graph break)."""
    losses = {}
    for compiled in (False, True):
        cfg = shape_config("tiny", mode, "cpu", compile=compiled)
        step = build_step(cfg, CPU)
        losses[compiled] = [float(step(synthetic_batch(cfg, i, doc_len=5), i)["loss"]) for i in range(3)]
    assert losses[True] == pytest.approx(losses[False], abs=1e-5)


def test_flex_attention_training_is_refused_off_cuda():
    from hiermem.errors import HiermemError

    cfg = shape_config("tiny", "anchor", "cpu")
    cfg.model.attention = "flex"
    with pytest.raises(HiermemError, match="model.attention=flex trains on CUDA only"):
        build_step(cfg, CPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode, doc_len, nonfinite", [("anchor", 0, "stop"), ("scratch", 0, "stop"),
                                                       ("scratch", 5, "skip")])
def test_a_training_step_on_the_gpu_never_waits_for_the_device(mode, doc_len, nonfinite):
    """No host synchronisation inside a step (the loop reads its numbers every train.log_every steps): under
    CUDA's sync debug mode "error" any synchronising call (a blocking copy to or from the device, .item(), a
    data-dependent shape) raises. Whole-document rows and packed ones, the bank's fetch and fused lazy AdamW,
    a maskable step."""
    cfg = shape_config("tiny", mode, "cuda")
    cfg.train.nonfinite = nonfinite
    step = build_step(cfg, torch.device("cuda"))
    step(synthetic_batch(cfg, 0, doc_len), 0)  # the first step creates the optimizers' state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = step(synthetic_batch(cfg, 1, doc_len), 1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(torch.isfinite(out["loss"]))
