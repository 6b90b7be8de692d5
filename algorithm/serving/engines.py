"""引擎运行器：onnxruntime（CPU）与 torch（PyTorch，GPU 上编译 + CUDA Graph）。

每个运行器：run(feeds: {六个输入 [B, L]}) -> (recommendations [B, K, 3] int64, scores [B, K] fp32)。
调用方（triton_models.EngineModel）已按契约校验过输入。
"""
from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np

from algorithm.interfaces import EngineContract
from algorithm.serving.errors import ConfigError

Outputs = Tuple[np.ndarray, np.ndarray]


class OnnxRuntimeRunner:
    """ONNX Runtime CPU 会话。"""

    def __init__(self, onnx_path: str, contract: EngineContract, num_threads: int = 0):
        from algorithm.serving.export_onnx import ort_session

        self.contract = contract
        self.session = ort_session(onnx_path, num_threads)
        self.output_names = list(contract.output_names)

    def run(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        rec, scores = self.session.run(self.output_names, {n: feeds[n] for n in self.contract.input_names})
        return rec.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)


def load_runner(kind: str, path: str, contract: EngineContract, device: str = "cpu", device_id: int = 0,
                params: Optional[Mapping[str, str]] = None):
    """按引擎类型创建运行器。"""
    params = params or {}
    if kind == "onnxruntime":
        return OnnxRuntimeRunner(path, contract, int(params.get("num_threads", 0) or 0))
    if kind == "torch":
        from algorithm.serving.torch_engine import TorchRunner

        return TorchRunner.from_params(path, contract, device, device_id, params)
    raise ConfigError(f"python 运行器不支持 engine_kind={kind!r}；可选 onnxruntime / torch "
                      "（tensorrt 由 Triton 的 tensorrt_plan 平台原生托管）")

