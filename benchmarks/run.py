"""`make bench`: training-step throughput of the anchor alone vs the anchor with memory (gather and grouped
paths), measured in one run; prints a table and writes bench.json + bench.png (see hiermem/bench.py)."""

import argparse

from hiermem.bench import SHAPES, run_bench


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--quick", action="store_true", help="fewer steps (and a smaller shape on CPU)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--shape", default=None, choices=sorted(SHAPES), help="default: gpu on CUDA, else cpu")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    ap.add_argument("--branching", type=int, default=None, help="bank branching (default: largest that fits)")
    ap.add_argument("--compile", dest="compile", action="store_true", default=None,
                    help="also time torch.compile'd blocks (default on CUDA)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--budget", type=float, default=None, help="seconds; skip compiled variants past it")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds, best kept (default 2 on CPU)")
    ap.add_argument("--no-parity", dest="parity", action="store_false")
    a = ap.parse_args()
    run_bench(out=a.out, quick=a.quick, device=a.device, steps=a.steps, warmup=a.warmup, compile=a.compile,
              shape=a.shape, branching=a.branching, budget_s=a.budget, parity=a.parity,
              rounds=a.rounds)


if __name__ == "__main__":
    main()
