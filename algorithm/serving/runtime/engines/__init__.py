"""运行时的引擎注册表：engine.kind -> 运行器的加载函数。

构建期的一半（导出、量化、门禁、Triton 托管方式）在 algorithm/serving/engines/ 里，同名模块一一对应；
新增一种引擎 = 这里一个运行器模块 + 那里一个构建模块 + config.ENGINES 里一个名字。
tensorrt 由 Triton 的 tensorrt_plan 平台原生托管，没有 python 运行器。
"""
from __future__ import annotations

from typing import Callable, Dict

from algorithm.errors import ConfigError
from algorithm.interfaces import EngineContract


def _onnxruntime(path: str, contract: EngineContract, spec, device_id: int, lanes: int = 1):
    from algorithm.serving.runtime.engines.onnxruntime import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, contract, spec.num_threads)


def _torch(path: str, contract: EngineContract, spec, device_id: int, lanes: int = 1):
    from algorithm.serving.runtime.engines.torch import TorchRunner

    return TorchRunner.from_spec(path, contract, spec, device_id, lanes=lanes)


RUNNERS: Dict[str, Callable] = {"onnxruntime": _onnxruntime, "torch": _torch}


def load_runner(path: str, contract: EngineContract, spec, device_id: int = 0, lanes: int = 1):
    """按 spec.engine_kind 创建运行器（spec 为 runtime.params.RuntimeSpec）；lanes：流水线里同时在途的批数
    （torch 运行器据此给每个桶几套页锁定暂存区；onnxruntime 在 submit 里同步算完，用不到）。"""
    if spec.engine_kind not in RUNNERS:
        raise ConfigError(f"python 运行器不支持 engine.kind={spec.engine_kind!r}；可选 {sorted(RUNNERS)} "
                          "（tensorrt 由 Triton 的 tensorrt_plan 平台原生托管）")
    return RUNNERS[spec.engine_kind](path, contract, spec, device_id, lanes=lanes)
