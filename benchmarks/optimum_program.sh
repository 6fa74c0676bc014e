#!/usr/bin/env bash
# optimum-executorch's own 8da4w program of the demo model: what benchmarks/vs_optimum.py races ours against.
#
#   benchmarks/optimum_program.sh [VENV] [OUTPUT_DIR]     (defaults /work/venv-optimum /work/optimum-demo)
#
# Run from the repository root, in this project's environment (it reads the demo model's HF directory,
# spinquant/models.py demo_hf_dir, made from its GGUF file). optimum-executorch 1.1.0, the newest on PyPI,
# pins transformers 5.0.0rc1, so it lives in a venv of its own outside the repository, beside the same
# torch 2.13.0 and executorch 1.5.1 as ours: its program then runs in our runtime unchanged. Takes about
# 12 minutes on 2 cores. Writes OUTPUT_DIR/model.pte and OUTPUT_DIR/export_info.json (the command, the
# venv's versions, the export's seconds), which vs_optimum.py prints beside its numbers.
set -euo pipefail

VENV=${1:-/work/venv-optimum}
OUT=${2:-/work/optimum-demo}
HF_DIR=$(python -c "from spinquant.models import demo_hf_dir; print(demo_hf_dir('smollm2-135m'))")

if [ ! -x "$VENV/bin/optimum-cli" ]; then
  python -m venv "$VENV"
  # torch first and alone, so that executorch's requirement finds it installed and pulls no CUDA wheels.
  # Without a local CPU wheel, set TORCH_INDEX=https://download.pytorch.org/whl/cpu.
  "$VENV/bin/pip" install torch==2.13.0 ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
  "$VENV/bin/pip" install executorch==1.5.1 optimum-executorch==1.1.0
fi

# --max_seq_len 2048: the KV cache of our default export (optimum's default is the model's 8192 positions).
EXPORT=(optimum-cli export executorch --model "$HF_DIR" --task text-generation --recipe xnnpack
        --use_custom_sdpa --use_custom_kv_cache --qlinear 8da4w --qlinear_group_size 32 --qembedding 8w
        --max_seq_len 2048 --output_dir "$OUT")
mkdir -p "$OUT"
START=$SECONDS
"$VENV/bin/${EXPORT[0]}" "${EXPORT[@]:1}"
"$VENV/bin/python" - "$OUT/export_info.json" "$((SECONDS - START))" "${EXPORT[*]}" <<'PY'
import json, sys
from importlib.metadata import version

path, seconds, command = sys.argv[1], int(sys.argv[2]), sys.argv[3]
versions = {p: version(p) for p in ("optimum-executorch", "optimum", "executorch", "torch", "torchao", "transformers")}
json.dump(dict(command=command, versions=versions, export_seconds=seconds), open(path, "w"), indent=1)
PY
echo "wrote $OUT/model.pte in $((SECONDS - START)) s"
