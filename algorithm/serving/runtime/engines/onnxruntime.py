"""onnxruntime 运行器（CPU）：内嵌默认与 CI 服务的引擎。"""
from __future__ import annotations

import time
from typing import List, Mapping, Optional, Tuple

import numpy as np

from algorithm.errors import MissingDependencyError
from algorithm.interfaces import EngineContract
from algorithm.serving.runtime.engines.base import EngineRunner, Outputs, Staged, Timing


def ort_session(onnx_path: str, num_threads: int = 0, providers: Optional[List[str]] = None):
    """创建 ONNX Runtime 会话（CPU 默认）。"""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise MissingDependencyError("需要 onnxruntime：pip install onnxruntime") from e
    opts = ort.SessionOptions()
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # 服务进程里与前/后处理、其它实例共享 CPU：关闭线程自旋，空闲时让出核
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(onnx_path, sess_options=opts, providers=providers or ["CPUExecutionProvider"])


class OnnxRuntimeRunner(EngineRunner):
    """ONNX Runtime CPU 会话。没有桶：每组填充到组内最长者（与逐请求合并时的形状相同），在 launch 里同步算完。"""

    def __init__(self, onnx_path: str, contract: EngineContract, num_threads: int = 0):
        self.contract = contract
        self.session = ort_session(onnx_path, num_threads)
        self.output_names = list(contract.output_names)

    def compute(self, staged: List[Staged]) -> Tuple[List[Outputs], Timing]:
        t0 = time.perf_counter()
        outs = [self.run(s.feeds) for s in staged]
        return outs, {"device_ms": (time.perf_counter() - t0) * 1e3, "copy_back_ms": 0.0}

    def run(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        """直接运行一批（没有桶，不必先拷进暂存区）。"""
        rec, scores = self.session.run(self.output_names, {n: feeds[n] for n in self.contract.input_names})
        return rec.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)
