from hiermem.config import ModelConfig
from hiermem.memory.spec import BankSpec
from hiermem.train.flops import flops_per_token, peak_flops


def test_flop_model_matches_the_paper_160m_shape():
    cfg = ModelConfig(vocab_size=50432, n_layers=35, d_model=512, n_heads=12, head_dim=32, d_ff=2048,
                      max_seq_len=2048)
    spec = BankSpec(d=512, n_layers=35, ranks=(256, 64, 16), branching=16)
    f = flops_per_token(cfg, 2048, spec)
    assert f["memory"] == 6 * 18_063_360  # 6 x the paper's fetched parameters of its (256, 64, 16, 0) memory
    # by hand: 35 layers x (4·512·384 + 3·512·2048) + 50432·512 matmul weights; attention 35·2048·384
    matmul = 35 * (4 * 512 * 384 + 3 * 512 * 2048) + 50432 * 512
    assert f["anchor"] == 6 * matmul + 6 * 35 * 2048 * 384
    assert 0.9 < f["flop_bound_ratio"] < 0.92
    assert flops_per_token(cfg, 2048, None)["memory"] == 0.0


def test_peaks_known_only_for_named_accelerators():
    assert peak_flops("NVIDIA H200") == 989.4e12 and peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("CPU (x86_64, 1 threads)") is None
