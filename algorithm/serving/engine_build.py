"""引擎产物（按 engine.kind 与 export.precision）与精度门禁。

- onnxruntime/fp32：直接用验证过的 ONNX；
- onnxruntime/fp16：ONNX Runtime 自带的 float16 转换器（输入输出保持原类型；打分路径的算子留在 fp32）；
- onnxruntime/int8：ONNX Runtime 的静态量化（QDQ，MatMul/Gemm 按通道，用采样历史校准）；
- torch：algorithm/serving/torch_engine.py（torch.export 得到 .pt2，服务时编译 + CUDA Graph）；
- tensorrt：algorithm/serving/optimize_trt.py（需要 TensorRT）。
之后，门禁在采样的历史上把候选引擎与 fp32 PyTorch 比较（top-k 重合、top-1 一致、分数误差），
不通过就抛 AccuracyError 并停止构建。
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Iterator, Tuple

import numpy as np

from algorithm.models.catalog import Catalog
from algorithm.serving.accuracy import compare_topk
from algorithm.serving.config import GateConfig, ServingConfig
from algorithm.serving.errors import AccuracyError

Log = Callable[[str], None]
# 留在 fp32 的算子：softmax 类与 TopK 决定排序，LayerNorm 数值敏感
FP32_OPS = ["LogSoftmax", "Softmax", "TopK", "LayerNormalization", "ReduceMean", "Pow", "Sqrt", "Div", "Erf"]


def sample_feeds(config: ServingConfig, catalog: Catalog, num: int, seed: int, batch: int = 16,
                 max_len: int = 0, pad_to: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """从合成行为序列采样历史（长度服从压测同样的对数正态分布，截断到 max_len，缺省 max_seq_length），
    经前处理得到引擎输入；pad_to > 0 时每批右侧填充到这个长度（TensorRT 校准要求固定形状）。"""
    from algorithm.models.train import SyntheticSequences
    from algorithm.serving.benchmark import sample_lengths
    from algorithm.serving.preprocess import Preprocessor

    data = SyntheticSequences(catalog, seed)
    pre = Preprocessor(catalog, config.model.contract())
    max_len = min(max_len or config.export.max_seq_length, config.export.max_seq_length)
    if pad_to and pad_to < max_len:
        raise ValueError(f"pad_to={pad_to} 小于 max_len={max_len}")
    lengths = sample_lengths(config.benchmark, num, max_len, seed)  # 与压测同一个长度分布
    for start in range(0, num, batch):
        histories = [data.sample(1, int(n), random_lengths=False)[0][0] for n in lengths[start:start + batch]]
        yield pre.encode_batch(histories, pad_to=pad_to or None)


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


def int8_weight_matmuls(onnx_path: str, codebook_sizes) -> list:
    """要量化的 MatMul/Gemm：第二个输入是权重（initializer），且不是输出码本 logits 的打分头
    （输出维等于某个码本大小）。注意力里两个激活相乘的 MatMul 不量化。"""
    import onnx

    model = onnx.load(onnx_path, load_external_data=False)
    weights = {i.name: list(i.dims) for i in model.graph.initializer}
    heads = set(int(v) for v in codebook_sizes)
    return [n.name for n in model.graph.node
            if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights and weights[n.input[1]][-1] not in heads]


def run_gates(config: ServingConfig, catalog: Catalog, model, runner, gates: GateConfig,
              precision: str, baseline=None) -> Dict[str, Any]:
    """候选引擎 vs fp32 PyTorch：返回报告；不通过抛 AccuracyError。
    baseline（例如 fp32 的 ONNX 运行器）给出时，在同样的批上计时，报告候选相对它的加速比。"""
    from algorithm.serving.export_onnx import torch_reference

    contract = config.model.contract()
    refs, cands = [], []
    t_ref = t_cand = t_base = 0.0
    for feeds in sample_feeds(config, catalog, gates.num_samples, seed=4242):
        t0 = time.time()
        refs.append(torch_reference(model, feeds, contract))
        t1 = time.time()
        cands.append(runner.run(feeds))
        t2 = time.time()
        if baseline is not None:
            baseline.run(feeds)
        t_ref += t1 - t0
        t_cand += t2 - t1
        t_base += time.time() - t2
    cmp = compare_topk(np.concatenate([r[0] for r in refs]), np.concatenate([r[1] for r in refs]),
                       np.concatenate([c[0] for c in cands]), np.concatenate([c[1] for c in cands]),
                       gates.tie_tolerance if precision == "fp32"
                       else max(gates.tie_tolerance, gates.low_precision_tie_tolerance))
    if precision == "fp32":
        checks = {"overlap": (cmp.overlap, ">=", gates.fp32_min_overlap)}
    else:
        checks = {"overlap": (cmp.overlap, ">=", gates.min_overlap),
                  "top1_agreement": (cmp.top1_agreement, ">=", gates.min_top1_agreement),
                  "score_mae": (cmp.score_mae, "<=", gates.max_score_mae)}
    failed = [f"{k} {v:.4f}（要求 {op} {th}）" for k, (v, op, th) in checks.items()
              if (v < th if op == ">=" else v > th)]
    report = {"precision": precision, "samples": cmp.rows, **cmp.to_dict(),
              "thresholds": {k: f"{op} {th}" for k, (v, op, th) in checks.items()},
              "reference_seconds": t_ref, "candidate_seconds": t_cand, "passed": not failed,
              **({"fp32_engine_seconds": t_base, "speedup_vs_fp32_engine": t_base / max(t_cand, 1e-9)}
                 if baseline is not None else {}),
              "summary": f"top-{contract.top_k} 重合 {cmp.overlap:.4f}，top-1 一致 {cmp.top1_agreement:.3f}，"
                         f"分数 MAE {cmp.score_mae:.2e}，{cmp.rows} 条历史"}
    if failed:
        raise AccuracyError(f"精度门禁未通过（{precision}）：" + "；".join(failed) + f"。{report['summary']}", report)
    return report


def build_engine_artifact(config: ServingConfig, model, catalog: Catalog, onnx_path: str, engine_dir: str,
                          log: Log) -> Tuple[str, Dict[str, Any]]:
    """按配置产生引擎文件，运行门禁。返回 (产物路径, 报告)。"""
    from algorithm.serving.engines import OnnxRuntimeRunner

    os.makedirs(engine_dir, exist_ok=True)
    kind, precision = config.engine.kind, config.export.precision
    name = config.model.name
    reports: Dict[str, Any] = {}
    contract = config.model.contract()
    baseline = None  # onnxruntime 低精度时的 fp32 ONNX 运行器（计时对照）
    if kind == "onnxruntime":
        if precision == "fp32":
            artifact = onnx_path
        elif precision == "fp16":
            artifact = convert_fp16(onnx_path, os.path.join(engine_dir, f"{name}.fp16.onnx"))
        else:
            artifact = quantize_int8(config, catalog, onnx_path, os.path.join(engine_dir, f"{name}.int8.onnx"), log)
        runner = OnnxRuntimeRunner(artifact, contract, config.engine.num_threads)
        baseline = None if precision == "fp32" else OnnxRuntimeRunner(onnx_path, contract, config.engine.num_threads)
    elif kind == "torch":
        from algorithm.serving.torch_engine import TorchRunner, export_torch_program

        artifact = export_torch_program(model, os.path.join(engine_dir, f"{name}.pt2"), config)
        runner = TorchRunner.from_config(artifact, contract, config)
    else:
        from algorithm.serving.optimize_trt import TensorRTRunner, build_trt_engine, trt_profiles

        artifact = build_trt_engine(onnx_path, os.path.join(engine_dir, f"{name}.{precision}.plan"), config,
                                    catalog=catalog)
        runner = TensorRTRunner(artifact, contract, trt_profiles(config))
    reference = model
    on_gpu = kind == "tensorrt" or (getattr(runner, "device", None) is not None and runner.device.type == "cuda")
    if on_gpu:
        import copy

        reference = copy.deepcopy(model).to("cuda")  # fp32 参考放在同一块 GPU 上（更快，仍是 fp32）
    log(f"      门禁：{config.gates.num_samples} 条采样历史，对比 fp32 PyTorch")
    reports["gates"] = run_gates(config, catalog, reference, runner, config.gates, precision,
                                 baseline=baseline)
    if kind == "torch":
        reports["torch_engine"] = {"load_seconds": runner.load_seconds, "capture_seconds": runner.capture_seconds,
                                   "cuda_graphs": len(runner.graphs), "compile_mode": config.engine.compile_mode}
    reports["gates"]["speedup_vs_reference"] = (reports["gates"]["reference_seconds"]
                                                / max(reports["gates"]["candidate_seconds"], 1e-9))
    g = reports["gates"]
    speed = f"；同样的批上比 fp32 ONNX 快 {g['speedup_vs_fp32_engine']:.2f} 倍" if "speedup_vs_fp32_engine" in g else ""
    log(f"      门禁通过：{g['summary']}{speed}")
    return artifact, reports

