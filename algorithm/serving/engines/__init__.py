"""构建期的引擎注册表：engine.kind -> 一个模块（NEEDS_ONNX、hosting(config)、build(...)，tensorrt 还有
instance_profiles）。运行时的一半在 algorithm/serving/runtime/engines/ 的同名模块里。

build_engine_artifact：按配置产生引擎文件，再运行精度门禁（gates.run_gates），再调用可选的 after_gates（build.py 用它做 8 位的速度检查）。
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import os
from typing import Any, Callable, Dict, Optional, Tuple

from algorithm.errors import ConfigError
from algorithm.models.catalog import Catalog
from algorithm.serving.config import ENGINES, ServingConfig
from algorithm.serving.engines.base import BuiltEngine, EngineHosting  # noqa: F401

Log = Callable[[str], None]


def resolve_kind(kind: str) -> str:
    """engine.kind=auto（Hydra 的默认组）-> 看得到 GPU 时 torch，否则 onnxruntime（内嵌默认，CPU）。"""
    if kind != "auto":
        return kind
    try:
        import torch
    except ImportError:
        return "onnxruntime"
    return "torch" if torch.cuda.is_available() else "onnxruntime"


def resolve_auto(config: ServingConfig) -> ServingConfig:
    """把 engine.kind=auto 换成这台机器上的具体引擎（返回新的配置，不修改传入的）。构建与压测的入口先调用它。
    precision=fp8 而这台机器不支持时在这里就抛 UnsupportedPrecisionError。"""
    if config.export.precision == "fp8" and config.engine.kind == "torch":
        # 在训练检查点、导出之前就拒绝（ugt_base 在 CPU 上训练要很久，之后才报错没有意义）
        from algorithm.serving.runtime.engines.torch import resolve_device

        engine_module("torch").check_fp8_device(resolve_device(config.engine.device))
    if config.engine.kind != "auto":
        return config
    kind = resolve_kind("auto")
    if config.export.precision == "fp8" and kind != "torch":
        from algorithm.errors import UnsupportedPrecisionError

        raise UnsupportedPrecisionError(
            "precision=fp8 在这台机器上不能构建：PyTorch 看不到 GPU，engine=auto 选了 onnxruntime（CPU），"
            "而 fp8 只有 torch 引擎在 NVIDIA Hopper（sm_90+，如 H100 / H200）上支持。这台机器上请用 precision=fp32 "
            "或 int8（onnxruntime 的静态 int8 在 CPU 上可用）；有 Hopper GPU 时用 engine=torch precision=fp8")
    # 拼行是 torch 引擎的选项（conf/engine/auto.yaml 与 torch.yaml 默认开）：auto 选了别的引擎时它不适用，关掉
    pack_rows = config.engine.pack_rows and kind == "torch"
    return dataclasses.replace(config, engine=dataclasses.replace(config.engine, kind=kind, pack_rows=pack_rows))


def engine_module(kind: str):
    kind = resolve_kind(kind)
    if kind not in ENGINES or kind == "auto":
        raise ConfigError(f"engine.kind = {kind!r} 不合法；可选 {list(ENGINES)}")
    return importlib.import_module(f"algorithm.serving.engines.{kind}")


def hosting(config: ServingConfig) -> EngineHosting:
    return engine_module(config.engine.kind).hosting(config)


def build_engine_artifact(config: ServingConfig, model, catalog: Catalog, onnx_path: str, engine_dir: str,
                          log: Log, after_gates: Optional[Callable[[Any], Dict[str, Any]]] = None
                          ) -> Tuple[str, Dict[str, Any]]:
    """按配置产生引擎文件，运行门禁；after_gates(运行器) 返回的报告并进结果。返回 (产物路径, 报告)。"""
    from algorithm.serving.gates import run_gates

    os.makedirs(engine_dir, exist_ok=True)
    built: BuiltEngine = engine_module(config.engine.kind).build(config, model, catalog, onnx_path, engine_dir, log)
    runner = built.runner
    reference = model
    on_gpu = config.engine.kind == "tensorrt" or (getattr(runner, "device", None) is not None
                                                  and runner.device.type == "cuda")
    if on_gpu and any(True for _ in model.parameters()):  # ONNX 来源的参考（OnnxModel）没有参数，留在 CPU
        reference = copy.deepcopy(model).to("cuda")  # fp32 参考放在同一块 GPU 上（更快，仍是 fp32）
    log(f"      门禁：{config.gates.num_samples} 条采样历史，对比 fp32 PyTorch")
    reports: Dict[str, Any] = dict(built.reports)
    reports["gates"] = run_gates(config, catalog, reference, runner, config.gates, config.export.precision,
                                 baseline=built.baseline)
    g = reports["gates"]
    g["speedup_vs_reference"] = g["reference_seconds"] / max(g["candidate_seconds"], 1e-9)
    speed = f"；同样的批上比 fp32 ONNX 快 {g['speedup_vs_fp32_engine']:.2f} 倍" if "speedup_vs_fp32_engine" in g else ""
    log(f"      门禁通过：{g['summary']}{speed}")
    if after_gates is not None:  # 例如 build.py 的速度检查（speed_check.check）：它要门禁通过的运行器
        reports.update(after_gates(runner) or {})
    return built.artifact, reports
