#!/usr/bin/env bash
# 导出 + 优化 + 生成 ensemble 仓库（scripts/build.py 的薄壳，参数原样是 Hydra 覆盖）：
#   bash scripts/export.sh                                     # 参考模型 ugt_tiny -> build/model_repository
#   bash scripts/export.sh model=pooled_cnn checkpoint=PATH catalog.path=PATH precision=fp16 engine=torch
# PYTHON 指定解释器（默认 .venv/bin/python，没有时用 python3）。
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" scripts/build.py "$@"
