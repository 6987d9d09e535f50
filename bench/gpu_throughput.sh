#!/usr/bin/env bash
# Issue 8 on one GPU: `hitq bench` (a: predecessor's method, b: hitq's queue + worker path) in one process.
# Needs .carry/bench-data (the sampled tables, rendered images and reference-results.json; made on a CPU by
#   hitq bench --data DATASET --write-subset .carry/bench-data && cp REFERENCE .carry/bench-data/reference-results.json)
# and .carry/shared/models/qwen3-vl-8b-instruct-noweights; where SQLAlchemy/Alembic are missing, wheels in .whl/.
# Usage: bench/gpu_throughput.sh NAME [hitq bench options...]   -> $OUT/NAME.json
set -euo pipefail
if ! python3 -c "import sqlalchemy, alembic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
name=$1; shift
exec python3 -m hitq.cli.main bench --data .carry/bench-data --model .carry/shared/models/qwen3-vl-8b-instruct-noweights \
  --reference .carry/bench-data/reference-results.json --out "${OUT:-/tmp}/$name.json" "$@"
