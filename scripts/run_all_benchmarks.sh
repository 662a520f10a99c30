#!/usr/bin/env bash
# Every benchmark behind the closing notes, one after the other (they share 2 cores).
# Each writes JSON under bench_out/; scripts/bench_report.py turns them into docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
LLMC=.venv-llmc/bin/python
# hfprune runs (dense/magnitude already in bench_out/oneshot.json when --append is used)
$PY scripts/bench_oneshot.py --append --forward-ref --output bench_out/oneshot.json \
    --runs wanda-50,wanda-2of4,sparsegpt-50,sparsegpt-2of4
$LLMC scripts/bench_llmcompressor.py --forward-ref --runs wanda-50,wanda-2of4,sparsegpt-50,sparsegpt-2of4
$PY scripts/bench_oneshot.py --append --forward-ref --output bench_out/oneshot.json \
    --runs wanda-70,wanda-owl-70,sparsegpt-50-int4
$PY scripts/bench_structured.py --max-windows 8 --variants obs,wanda,wanda-lstsq,flap,obs-mlp-only,obs-whole-group,fluctuation-lstsq,obs-bias,obs-nonuniform
$PY scripts/bench_size.py
$PY scripts/bench_architectures.py   # every causal-LM model type (tiny random models)
