"""One rank of a test job (tests/test_parallel.py starts two, with torchrun's environment variables set by hand):
train with the config overrides in argv up to --stop-at, then save this rank's bank shard (the ids of the blocks
it holds and their weights, its resident bytes, how many blocks per level the shard plan gives it), which blocks
it may update and which of those it shares, into --dump/rank<r>.npz. --die-at N: rank 1 exits hard just before
step N (a rank that dies). --signal-at N: rank 1 alone sends itself SIGTERM just before step N."""

import argparse
import os
import signal
import sys

import numpy as np
import torch

from hiermem.config import load_config
from hiermem.errors import HiermemError
from hiermem.train.loop import Trainer
from hiermem.train.parallel import close_world
from hiermem.train.stop import Stopped


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stop-at", type=int, default=None)
    ap.add_argument("--dump", default=None)
    ap.add_argument("--die-at", type=int, default=None)
    ap.add_argument("--signal-at", type=int, default=None)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    try:
        trainer = Trainer(load_config("tiny", args.overrides), resume=args.resume, progress=False)
        if args.die_at is not None:
            advance = trainer.advance

            def dying(indices):
                if trainer.step == args.die_at and trainer.world.rank == 1:
                    os._exit(3)
                return advance(indices)

            trainer.advance = dying
        if args.signal_at is not None:
            advance_ = trainer.advance

            def signalled(indices):
                if trainer.step == args.signal_at and trainer.world.rank == 1:
                    os.kill(os.getpid(), signal.SIGTERM)  # only this rank is told to stop
                return advance_(indices)

            trainer.advance = signalled
        trainer.run(stop_at=args.stop_at)
    except Stopped as e:  # a clean stop, as the CLI reports it
        close_world(trainer.world)
        print(str(e), file=sys.stderr, flush=True)
        return e.exit_code
    except HiermemError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if args.dump:
        bank, plan = trainer.bank, trainer.shards[0]
        arrays = {f"w.{k}": bank.read_blocks(k, torch.from_numpy(bank.held(k))).numpy() for k in bank.parts()}
        arrays.update({f"held.{k}": bank.held(k) for k in bank.parts()})
        arrays.update({f"mine.{k}": trainer.reducer.mine[k] for k in bank.parts()})
        arrays.update({f"shared.{k}": trainer.reducer.shared[k] for k in bank.parts()})
        arrays.update({f"planned.{key}": sum(trainer.world.rank in r for r in plan.sharers(level).values())
                       for key, level, _, _ in bank.spec.level_parts()})
        arrays["resident_bytes"] = bank.resident_bytes()
        np.savez(os.path.join(args.dump, f"rank{trainer.world.rank}.npz"), **arrays)
    close_world(trainer.world)  # as hiermem train does
    return 0


if __name__ == "__main__":
    sys.exit(main())
