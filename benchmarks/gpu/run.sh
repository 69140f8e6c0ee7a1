#!/usr/bin/env bash
# On the GPU machine, from a copy of the repository holding what benchmarks/gpu/prepare.sh made (.carry, .whl):
#   1. the CUDA-only tests (FlexAttention vs the dense mask, fetched memory vs its per-sequence reference, the
#      bank's fused AdamW vs its CPU update, no host sync inside a training step);
#   2. `hiermem bench --suite loop --stage train`: `hiermem train -c paper-160m` itself, anchor vs memory, eager
#      and compiled (tokens/s and MFU from the runs' own metrics.jsonl);
#   3. `hiermem demo --preset demo-gpu --stage train`: the GPU demo preset's trainings.
# Each part stops at its share of a 580 s budget (BUDGET=...), so that the whole fits one 10-minute call;
# results go to $OUT (default runs/gpu-checks): device.txt, tests.log, loop.log, loop.json, profiles.txt (where
# each loop variant's step time goes), demo.log, demo_train_report.json, and runs/ (every training's metrics.jsonl
# and the demo's logs).
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/gpu-checks}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
BUDGET=${BUDGET:-580}
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
# the data names absolute paths of the tree it was made in: work in a copy at that path
MADE_IN=$(cat .carry/made_in)
if [ "$PWD" != "$MADE_IN" ]; then
    mkdir -p "$MADE_IN" && cp -a . "$MADE_IN"/ && cd "$MADE_IN" || exit 1
fi
export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
mkdir -p runs && tar xzf .carry/gpu-data.tgz -C runs || exit 1

left() {  # seconds for a part: its cap, or what is left of the budget (at least 1: timeout 0 would never stop)
    local r=$(( BUDGET - SECONDS )); r=$(( r < $1 ? r : $1 )); echo $(( r < 1 ? 1 : r ))
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
    nproc; free -g | sed -n 2p
} 2>&1 | tee "$OUT/device.txt"
# the quick ones first: the FlexAttention test compiles its kernel (forward and backward)
timeout "$(left 90)" python3 -m pytest -p no:cacheprovider -o addopts="" -q -k "gpu" \
    tests/test_step.py tests/test_bank_optim.py tests/test_fetched.py tests/test_transformer.py 2>&1 | tee "$OUT/tests.log"
timeout "$(left 360)" python3 -m hiermem bench --suite loop --stage train --out runs/bench 2>&1 | tee "$OUT/loop.log"
cp runs/bench/loop.json "$OUT/" 2>/dev/null
for f in runs/bench/loop-runs-paper/*/profile.txt; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done > "$OUT/profiles.txt"
timeout "$(left 600)" python3 -m hiermem demo --preset demo-gpu --stage train --quiet 2>&1 | tee "$OUT/demo.log"
cp runs/demo-gpu/train_report.json "$OUT/demo_train_report.json" 2>/dev/null
# a training the budget stopped writes its checkpoint and last lines after `timeout` returns: wait (15 s at most)
for _ in $(seq 15); do pgrep -f "job_entry|hiermem train" > /dev/null || break; sleep 1; done
# each training's own log and metrics, so that a part stopped by its budget still shows how far it got and how fast
for f in runs/bench/loop-runs-paper/*/metrics.jsonl runs/demo-gpu/runs/*/metrics.jsonl runs/demo-gpu/logs/*.log; do
    [ -f "$f" ] && { d="$OUT/runs/$(dirname "${f#runs/}")"; mkdir -p "$d" && cp "$f" "$d/"; }
done
echo "done in ${SECONDS} s"
