"""tensorrt 引擎的构建与托管：optimize_trt.build_trt_engine（用户的名字）构建计划文件，
Triton 的 tensorrt_plan 平台原生托管（实例列出计划文件里的全部优化 profile）。需要 TensorRT 10+ 与 GPU。"""
from __future__ import annotations

import os
from typing import Callable, List

from algorithm.models.catalog import Catalog
from algorithm.serving.config import ServingConfig
from algorithm.serving.engines.base import BuiltEngine, EngineHosting

Log = Callable[[str], None]
NEEDS_ONNX = True


def hosting(config: ServingConfig) -> EngineHosting:
    return EngineHosting("tensorrt_plan", "model.plan")


def instance_profiles(config: ServingConfig) -> List[str]:
    from algorithm.serving.optimize_trt import trt_profiles

    return [str(i) for i in range(len(trt_profiles(config)))]


def build(config: ServingConfig, model, catalog: Catalog, onnx_path: str, engine_dir: str, log: Log) -> BuiltEngine:
    from algorithm.serving.optimize_trt import TensorRTRunner, build_trt_engine, trt_profiles

    artifact = build_trt_engine(onnx_path, os.path.join(engine_dir, f"{config.model.name}.{config.export.precision}.plan"),
                                config, catalog=catalog)
    return BuiltEngine(artifact, TensorRTRunner(artifact, config.contract(), trt_profiles(config)))
