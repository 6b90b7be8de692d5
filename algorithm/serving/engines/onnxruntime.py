"""onnxruntime 引擎的构建与托管：fp32 直接用验证过的 ONNX；fp16 用 ONNX Runtime 的 float16 转换器
（输入输出类型不变，打分路径的算子留在 fp32）；int8 用静态量化（QDQ，MatMul/Gemm 按通道，用采样历史校准）。
托管：内嵌服务器用 python 运行器（runtime/engines/onnxruntime.py）；engine.native=true 时为 Triton 的 onnxruntime_onnx。"""
from __future__ import annotations

import os
from typing import Callable

from algorithm.models.catalog import Catalog
from algorithm.serving.config import ServingConfig
from algorithm.serving.engines.base import BuiltEngine, EngineHosting
from algorithm.serving.gates import sample_feeds

Log = Callable[[str], None]
NEEDS_ONNX = True
# 留在 fp32 的算子：softmax 类与 TopK 决定排序，LayerNorm 数值敏感
FP32_OPS = ["LogSoftmax", "Softmax", "TopK", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Erf"]


def hosting(config: ServingConfig) -> EngineHosting:
    return EngineHosting("onnxruntime_onnx", "model.onnx") if config.engine.native else EngineHosting("", "model.onnx")


def build(config: ServingConfig, model, catalog: Catalog, onnx_path: str, engine_dir: str, log: Log) -> BuiltEngine:
    from algorithm.serving.runtime.engines.onnxruntime import OnnxRuntimeRunner

    precision, name = config.export.precision, config.model.name
    if precision == "fp32":
        artifact = onnx_path
    elif precision == "fp16":
        artifact = convert_fp16(onnx_path, os.path.join(engine_dir, f"{name}.fp16.onnx"))
    else:
        artifact = quantize_int8(config, catalog, onnx_path, os.path.join(engine_dir, f"{name}.int8.onnx"), log)
    contract = config.contract()
    runner = OnnxRuntimeRunner(artifact, contract, config.engine.num_threads)
    baseline = None if precision == "fp32" else OnnxRuntimeRunner(onnx_path, contract, config.engine.num_threads)
    return BuiltEngine(artifact, runner, baseline)


def convert_fp16(onnx_path: str, out_path: str) -> str:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(onnx_path)
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    onnx.save_model(fp16, out_path)
    return out_path


def quantize_int8(config: ServingConfig, catalog: Catalog, onnx_path: str, out_path: str, log: Log) -> str:
    """静态 int8（QDQ）：激活用采样历史校准，权重按通道对称量化；只量化带权重的 MatMul/Gemm（见 int8_weight_matmuls）。"""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    feeds = list(sample_feeds(config, catalog, config.engine.calibration_batches * 4, seed=777, batch=4))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    nodes = int8_weight_matmuls(onnx_path, config.model.codebook_sizes)
    log(f"      int8 校准：{len(feeds)} 批采样历史；量化 {len(nodes)} 个权重矩阵乘（打分头与注意力留在 fp32）")
    quantize_static(onnx_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"], nodes_to_quantize=nodes,
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out_path


def int8_weight_matmuls(onnx_path: str, codebook_sizes=None) -> list:
    """要量化的 MatMul/Gemm：第二个输入是权重（initializer），且不是打分头。注意力里两个激活相乘的 MatMul 不量化。

    打分头按图的结构认：输出（经过至多两个 Add / Cast / Reshape 之类的逐元素算子）流进 LogSoftmax 的矩阵乘。
    以前按“输出维等于某个码本大小”认，FFN 的宽度恰好等于码本大小时（如 dim_feedforward 1024 = V1）会把 FFN 误当打分头。
    codebook_sizes 保留参数以兼容旧的调用，不再使用。"""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    weights = {i.name for i in model.graph.initializer}
    consumers = {}
    for n in model.graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    passthrough = {"Add", "Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Slice", "Gather"}

    def feeds_log_softmax(name: str, depth: int = 0) -> bool:
        for c in consumers.get(name, []):
            if c.op_type == "LogSoftmax":
                return True
            if depth < 3 and c.op_type in passthrough and any(feeds_log_softmax(o, depth + 1) for o in c.output):
                return True
        return False

    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights and not feeds_log_softmax(n.output[0])]
