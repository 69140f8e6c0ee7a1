import numpy as np
import pytest
import torch

from hiermem.errors import HiermemError
from hiermem.memory.bank import MemoryBank
from hiermem.memory.fetch import BlockGrads, block_grads, fetch
from hiermem.memory.optim import LazyAdamW
from hiermem.memory.spec import BankSpec

SPEC = BankSpec(d=4, n_layers=2, ranks=(2, 3), branching=2)  # level0: 2 nodes, level1: 4 nodes, + generic
HYPER = dict(betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


def fetched_rows(memory):
    """Each row's neurons [B, n_mem_layers, 3, R, d], differentiable in the fetch's distinct blocks."""
    layers = memory.per_layer(memory.first_layer + memory.n_layers)[memory.first_layer:]
    return torch.stack([layer.expand_traceable() for layer in layers], dim=1)


def grads_for(bank, paths, use_generic=None, seed=0):
    """Backward of a random linear loss on the fetched weights -> per-block gradients."""
    f = fetch(bank, np.asarray(paths, np.int64), use_generic, requires_grad=True)
    rows = fetched_rows(f.memory)
    coeff = torch.randn(rows.shape, generator=torch.Generator().manual_seed(seed))
    (rows * coeff).sum().backward()
    return block_grads(f, bank.device)


def snapshot(bank, opt):
    return {k: (bank.read_part(k), bank.read_part(k, "m"), bank.read_part(k, "v"), opt.steps[k].copy())
            for k in bank.parts()}


def test_untouched_blocks_stay_bit_identical():
    bank = MemoryBank.create(SPEC, seed=0)
    opt = LazyAdamW(bank, lr=1e-2, **HYPER)
    opt.step(grads_for(bank, [[0, 0], [1, 3]], torch.tensor([False, True]), seed=1))  # non-zero m, v around
    before = snapshot(bank, opt)
    updated = opt.step(grads_for(bank, [[0, 1], [0, 2]], seed=2))
    assert updated == [1, 2]
    touched = {"level0": {0}, "level1": {1, 2}, "generic": set()}
    for k, (w, m, v, s) in before.items():
        for i in range(w.shape[0]):
            same = [torch.equal(w[i], bank.part(k)[i]), torch.equal(m[i], bank.read_part(k, "m")[i]),
                    torch.equal(v[i], bank.read_part(k, "v")[i]), s[i] == opt.steps[k][i]]
            assert same == [i not in touched[k]] * 4, (k, i, same)


def test_gradient_of_a_shared_block_is_the_sum_over_sequences():
    bank = MemoryBank.create(SPEC, seed=0)
    f = fetch(bank, np.array([[1, 2], [1, 0], [0, 2]]), torch.tensor([False, False, True]), requires_grad=True)
    rows = fetched_rows(f.memory)
    coeff = torch.randn(rows.shape)
    (rows * coeff).sum().backward()
    bg = block_grads(f, bank.device)
    assert bg.ids["level0"].tolist() == [1] and bg.ids["level1"].tolist() == [0, 2]
    torch.testing.assert_close(bg.grads["level0"][0], coeff[0, :, :, 0:2] + coeff[1, :, :, 0:2], rtol=0, atol=0)
    torch.testing.assert_close(bg.grads["level1"][1], coeff[0, :, :, 2:5], rtol=0, atol=0)
    torch.testing.assert_close(bg.grads["generic"][0], coeff[2], rtol=0, atol=0)
    want = sum(float(g.pow(2).sum()) for g in bg.grads.values())
    assert float(bg.norm_sq()) == pytest.approx(want)
    bg.scale_(0.5)
    assert float(bg.norm_sq()) == pytest.approx(want / 4)


def test_matches_torch_adamw_per_block_with_lazy_step_counts():
    """Each block as its own parameter of torch.optim.AdamW(fused=True), stepped only when fetched: the same
    kernel with the same per-block step counts, so bit-identical."""
    bank = MemoryBank.create(SPEC, seed=1)
    opt = LazyAdamW(bank, lr=1e-2, **HYPER)
    # block level1/0 is fetched at steps 1 and 3 only: its count must be 2 (lazy), not 3
    batches = [([[0, 0], [0, 1]], None), ([[1, 2], [1, 3]], torch.tensor([False, True])), ([[0, 0], [1, 3]], None)]
    lrs = [1e-2, 5e-3, 2e-2]
    tracked = {("level0", 0), ("level1", 0), ("level1", 3), ("generic", 0)}
    ref = {}
    for (k, i) in tracked:
        p = torch.nn.Parameter(bank.part(k)[i].clone())
        ref[(k, i)] = (p, torch.optim.AdamW([p], lr=1e-2, **HYPER, fused=True))
    for step, ((paths, use), lr) in enumerate(zip(batches, lrs)):
        bg = grads_for(bank, paths, use, seed=10 + step)
        for (k, i), (p, ref_opt) in ref.items():
            hit = (bg.ids.get(k, torch.empty(0, dtype=torch.long)) == i).nonzero()
            if len(hit):
                p.grad = bg.grads[k][int(hit[0])].clone()
                ref_opt.param_groups[0]["lr"] = lr
                ref_opt.step()
        opt.step(bg, lr)
    # level1/3 was in a generic row at step 2, so only step 3 touched it
    assert opt.steps["level1"][0] == 2 and opt.steps["level1"][3] == 1 and opt.steps["level0"][0] == 2
    assert opt.steps["generic"][0] == 1
    for (k, i), (p, ref_opt) in ref.items():
        st = ref_opt.state[p]
        assert int(st["step"]) == opt.steps[k][i]
        assert torch.equal(bank.part(k)[i], p.detach()), (k, i)
        assert torch.equal(bank.read_part(k, "m")[i], st["exp_avg"]) and torch.equal(bank.read_part(k, "v")[i],
                                                                                     st["exp_avg_sq"]), (k, i)


def test_masked_steps_equal_leaving_them_out():
    """A step masked by its skip flag (train.nonfinite=skip), read only on the device: the run equals, bit for
    bit, the run that never took those steps (weights, moments, step counts), and a masked step changes nothing."""
    banks = {masked: MemoryBank.create(SPEC, seed=2) for masked in (True, False)}
    opts = {masked: LazyAdamW(banks[masked], lr=1e-2, **HYPER) for masked in banks}
    for s in range(6):
        g = np.random.default_rng(s)
        paths = np.stack([g.integers(0, 2, 3), g.integers(0, 4, 3)], axis=1)
        use, bad = torch.from_numpy(g.random(3) < 0.3), s in (2, 4)
        before = snapshot(banks[True], opts[True])
        opts[True].step(grads_for(banks[True], paths, use, seed=s), lr=1e-2 / (1 + s % 3), skip=torch.tensor(bad))
        if bad:
            after = snapshot(banks[True], opts[True])
            assert all(torch.equal(a, b) for k in before for a, b in zip(before[k][:3], after[k][:3]))
        else:
            opts[False].step(grads_for(banks[False], paths, use, seed=s), lr=1e-2 / (1 + s % 3))
    opts[True].settle()
    _assert_same(banks[True], opts[True], banks[False], opts[False])
    assert opts[True].steps["level0"].sum() > 0


def _run(bank, opt, seeds):
    for s in seeds:
        g = np.random.default_rng(s)
        paths = np.stack([g.integers(0, 2, 3), g.integers(0, 4, 3)], axis=1)
        opt.step(grads_for(bank, paths, torch.from_numpy(g.random(3) < 0.3), seed=s), lr=1e-2 / (1 + s % 3))


def _assert_same(a_bank, a_opt, b_bank, b_opt):
    for k in a_bank.parts():
        for field in "wmv":
            assert torch.equal(a_bank.read_part(k, field), b_bank.read_part(k, field)), (k, field)
        np.testing.assert_array_equal(a_opt.steps[k], b_opt.steps[k])


def test_save_load_then_continue_equals_continuing(tmp_path):
    bank = MemoryBank.create(SPEC, seed=2)
    opt = LazyAdamW(bank, lr=1e-2, **HYPER)
    _run(bank, opt, [1, 2])
    bank.save(tmp_path / "ckpt")  # the weights and their moments
    opt.save(tmp_path / "adam.npz")  # the step counts
    for mmap in (False, True):
        bank2 = MemoryBank.load(tmp_path / "ckpt", mmap=mmap, cache_bytes=3000)
        opt2 = LazyAdamW(bank2, lr=1e-2, **HYPER)
        opt2.load(tmp_path / "adam.npz")
        _assert_same(bank, opt, bank2, opt2)
        _run(bank2, opt2, [3, 4])
    _run(bank, opt, [3, 4])
    _assert_same(bank, opt, bank2, opt2)

    other = MemoryBank.create(BankSpec(d=4, n_layers=2, ranks=(2, 4), branching=3), seed=0)
    with pytest.raises(HiermemError, match=r"adam.npz: level0 has 2 step counts, the bank has 3 blocks"):
        LazyAdamW(other, lr=1e-2).load(tmp_path / "adam.npz")
    with pytest.raises(HiermemError, match=r"nowhere.npz: missing"):
        LazyAdamW(bank, lr=1e-2).load(tmp_path / "nowhere.npz")
    no_generic = MemoryBank.create(BankSpec(d=4, n_layers=2, ranks=(2, 3), branching=2, generic=False), seed=0)
    with pytest.raises(HiermemError, match=r"holds step counts for parts \['generic', 'level0', 'level1'\]"):
        LazyAdamW(no_generic, lr=1e-2).load(tmp_path / "adam.npz")


def test_a_bank_on_disk_trains_like_one_in_ram_and_reloads_with_its_moments(tmp_path):
    d = tmp_path / "bank"
    disk = MemoryBank.create(SPEC, seed=3, dir=d, cache_bytes=2500)  # about three records: evicts all the time
    ram = MemoryBank.create(SPEC, seed=3)
    disk_opt, ram_opt = LazyAdamW(disk, lr=1e-2, **HYPER), LazyAdamW(ram, lr=1e-2, **HYPER)
    _run(disk, disk_opt, [5, 6])
    _run(ram, ram_opt, [5, 6])
    assert disk.io_stats()["evictions"] > 0 and disk.io_stats()["peak_bytes"] <= 2500
    _assert_same(disk, disk_opt, ram, ram_opt)
    disk.save()
    disk_opt.save(tmp_path / "adam.npz")
    del disk, disk_opt

    back = MemoryBank.load(d, verify="all")
    back_opt = LazyAdamW(back, lr=1e-2, **HYPER)  # the bank brings its moments
    back_opt.load(tmp_path / "adam.npz")
    _assert_same(back, back_opt, ram, ram_opt)
    _run(back, back_opt, [7])
    _run(ram, ram_opt, [7])
    _assert_same(back, back_opt, ram, ram_opt)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bank_on_the_gpu_takes_the_fused_kernel_and_equals_the_cpu_update():
    """A bank on CUDA: torch's fused kernel on views of its blocks, per-block steps and a masked step, within
    float32 rounding of the same update on the CPU."""
    cpu, gpu = MemoryBank.create(SPEC, seed=3), MemoryBank.create(SPEC, seed=3).to("cuda")
    opts = [LazyAdamW(cpu, lr=1e-2, **HYPER), LazyAdamW(gpu, lr=1e-2, **HYPER)]
    for s in range(4):
        g = np.random.default_rng(s)
        paths = np.stack([g.integers(0, 2, 3), g.integers(0, 4, 3)], axis=1)
        grads = grads_for(cpu, paths, seed=s)
        for bank, opt in zip((cpu, gpu), opts):
            moved = BlockGrads(grads.ids, {k: t.to(bank.device) for k, t in grads.grads.items()})
            opt.step(moved, lr=1e-2, skip=torch.tensor(s == 2, device=bank.device))
    for k in SPEC.part_keys():
        for field in "wmv":
            torch.testing.assert_close(gpu.read_part(k, field).cpu(), cpu.read_part(k, field), rtol=1e-5, atol=1e-7)
