#!/usr/bin/env bash
# On the CPU machine, from the repository root, after `make venv`: what benchmarks/gpu/run.sh needs on a GPU
# machine that has torch but neither the encoders, faiss nor a network. Writes
#   .carry/gpu-data.tgz   the loop suite's data (paper-160m shape) and the demo-gpu preset's corpus and data,
#                         prepared and clustered here (MiniLM on the CPU, ~3 minutes in all); ~25 MB
#   .carry/made_in        the absolute path of this tree: the data records paths under it
#   .whl/                 the wheels of the pure-Python packages such a machine lacks (omegaconf)
set -euo pipefail
BIN=${BIN:-.venv/bin}
"$BIN/hiermem" bench --suite loop --stage data --out runs/bench
"$BIN/hiermem" demo --preset demo-gpu --stage data --quiet
mkdir -p .carry .whl
# the loop's corpus and tokenizer.json stay here: training reads only the data directory
tar czf .carry/gpu-data.tgz -C runs bench/loop-data-paper/data bench/loop-data-paper/data.json \
    demo-gpu/corpus demo-gpu/data
pwd > .carry/made_in
"$BIN/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl omegaconf==2.4.0
ls -la .carry .whl
