"""ServingExporter：用户接口 ServingExporterInterface 的实现，四个方法各自委托给对应阶段的模块。"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

from algorithm.interfaces import ServingExporterInterface
from algorithm.serving.config import ExportConfig, ServingConfig


class ServingExporter(ServingExporterInterface):
    """导出 -> 优化 -> 仓库配置 -> 压测。serving_config 提供各阶段共享的配置（默认 ServingConfig()）。"""

    def __init__(self, serving_config: Optional[ServingConfig] = None):
        self.config = serving_config or ServingConfig()

    def export_onnx(self, model, save_path: str, config: Optional[ExportConfig] = None) -> str:
        from algorithm.serving.export_onnx import export_to_onnx

        return export_to_onnx(model, save_path, config or self.config.export,
                              tie_tolerance=self.config.gates.tie_tolerance)

    def optimize_tensorrt(self, onnx_path: str, engine_path: str, config=None) -> str:
        from algorithm.serving.optimize_trt import build_trt_engine

        return build_trt_engine(onnx_path, engine_path, config or self.config)

    def generate_triton_config(self, model_repository: str, config: Optional[ServingConfig] = None,
                               gpus: Optional[Sequence[int]] = None) -> str:
        from algorithm.serving.triton_config import generate_triton_config

        return generate_triton_config(model_repository, config or self.config, gpus=gpus)

    def benchmark(self, triton_url: str, model_name: str, num_requests: int) -> Dict[str, float]:
        from algorithm.serving.benchmark import run_benchmark

        return run_benchmark(triton_url, model_name, num_requests)
