"""UGT 推理服务：契约 -> 导出 -> 优化 -> 仓库 -> 服务 -> 压测。

公开名称（用户请求中的）：ServingExporter、ExportConfig、TritonConfig、export_to_onnx、
build_trt_engine、generate_triton_config、run_benchmark。按需导入（导入本包不加载 torch）。
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "ServingExporter": "algorithm.serving.exporter",
    "ExportConfig": "algorithm.serving.config",
    "TritonConfig": "algorithm.serving.config",
    "ServingConfig": "algorithm.serving.config",
    "export_to_onnx": "algorithm.serving.export_onnx",
    "build_trt_engine": "algorithm.serving.optimize_trt",
    "generate_triton_config": "algorithm.serving.triton_config",
    "run_benchmark": "algorithm.serving.benchmark",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'algorithm.serving' has no attribute {name!r}")
