#!/usr/bin/env bash
# Issue 3 on a GPU: a 50-query run (25 text/html incl. the largest SC _swap tables, 25 mix/html)
# through `hitq work --gpu 0` with the Qwen3-VL-8B architecture and random bf16 weights.
# The text run's budget (300k tokens) is far above what one card holds, so the giant tables hit
# a real CUDA OOM and the ladder retries them smaller. Needs: .carry/gpu3/{model,data} (see
# bench/README.md) and, where SQLAlchemy/Alembic are missing, their wheels in .whl/.
set -euo pipefail
if ! python3 -c "import sqlalchemy, alembic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HITQ_DB="sqlite:///${OUT:-/tmp}/gpu-run.db"
hitq() { python3 -m hitq.cli.main "$@"; }
M=.carry/gpu3/model D=.carry/gpu3/data
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
hitq enqueue --data $D --model $M --modality text --format html --ids 1-23,2966,3019 --max-input-tokens 300000 \
  --max-new-tokens 16 --format-retries 0 --engine-opt random_weights=true --run text_html_8b
hitq enqueue --data $D --model $M --modality mix --format html --ids 100-124 --max-new-tokens 16 --format-retries 0 \
  --engine-opt random_weights=true --run mix_html_8b
hitq work --gpu 0 --drain --batch-size 2 --lease-seconds 600 2>&1 | tee ${OUT:-/tmp}/work.log | grep -v "batch of" || true
hitq status
hitq export --run text_html_8b --out ${OUT:-/tmp}/text_html_8b
hitq export --run mix_html_8b --out ${OUT:-/tmp}/mix_html_8b
