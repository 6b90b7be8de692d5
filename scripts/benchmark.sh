#!/usr/bin/env bash
# 服务 + 压测（scripts/benchmark.py 的薄壳：启动内嵌 Triton，闭环 / 开环 / SLA 搜索，报告写到 outputs/<日期>/<时间>/）。
# 参数原样是 Hydra 覆盖，与构建用同一组（产物选项不符时先构建变体）：
#   bash scripts/benchmark.sh benchmark=quick triton=cpu_small
#   bash scripts/benchmark.sh model=pooled_cnn checkpoint=PATH catalog.path=PATH build_dir=build/pooled_cnn benchmark=quick
# 只服务不压测：python scripts/serve.py（同样的覆盖）。PYTHON 指定解释器。
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
exec "$PY" scripts/benchmark.py "$@"
