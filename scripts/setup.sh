#!/usr/bin/env bash
# 在仓库根目录创建 .venv 并安装本包（CPU 版 PyTorch）。可重复运行，已装好时几秒结束。
# GPU 用户：先设置 UGT_TORCH_SPEC（例如 "torch==2.11.0" 配合对应 CUDA 的 index）再运行，或自行安装后 pip install -e .
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_SPEC=${UGT_TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
# 先装固定版本的 torch（本机磁盘上的 CPU 版），避免不带版本的 torch 拉下几 GB 的 CUDA 版
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[dev,deploy]"
# checkov 的依赖钉得很死（networkx<2.7、packaging<24），与 torch 装在一起会降级 torch 的依赖：单独一个虚拟环境
if [ ! -x .venv/checkov/bin/python ]; then
  "$PY" -m venv .venv/checkov
fi
.venv/checkov/bin/python -m pip install -q "checkov==3.3.30"
.venv/bin/python -c "import torch, onnxruntime, tritonclient, pytriton; print('环境就绪：torch', torch.__version__, '| onnxruntime', onnxruntime.__version__)"
