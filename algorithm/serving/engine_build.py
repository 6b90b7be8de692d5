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


def sample_feeds(config: ServingConfig, catalog: Catalog, num: int, seed: int, batch: int = 16) -> Iterator[Dict[str, np.ndarray]]:
    """从合成行为序列采样历史（长度服从压测同样的对数正态分布），经前处理得到引擎输入。"""
    from algorithm.models.train import SyntheticSequences
    from algorithm.serving.preprocess import Preprocessor

    data = SyntheticSequences(catalog, seed)
    pre = Preprocessor(catalog, config.model.contract())
    rng = np.random.default_rng(seed)
    max_len = config.export.max_seq_length
    done = 0
    while done < num:
        b = min(batch, num - done)
        lengths = np.clip(rng.lognormal(np.log(config.benchmark.length_median), config.benchmark.length_sigma, b),
                          1, max_len).astype(int)
        histories = [data.sample(1, int(n), random_lengths=False)[0][0] for n in lengths]
        yield pre.encode_batch(histories)
        done += b


def convert_fp16(onnx_path: str, out_path: str) -> str:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(onnx_path)
    fp16 = convert_float_to_float16(model, keep_io_types=True, op_block_list=FP32_OPS)
    onnx.save_model(fp16, out_path)
    return out_path


def quantize_int8(config: ServingConfig, catalog: Catalog, onnx_path: str, out_path: str, log: Log) -> str:
    """静态 int8（QDQ）：激活用采样历史校准，权重按通道对称量化；只量化 MatMul/Gemm。"""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    feeds = list(sample_feeds(config, catalog, config.engine.calibration_batches * 4, seed=777, batch=4))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    log(f"      int8 校准：{len(feeds)} 批采样历史")
    quantize_static(onnx_path, out_path, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    op_types_to_quantize=["MatMul", "Gemm"], calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True})
    return out_path


def run_gates(config: ServingConfig, catalog: Catalog, model, runner, gates: GateConfig,
              precision: str) -> Dict[str, Any]:
    """候选引擎 vs fp32 PyTorch：返回报告；不通过抛 AccuracyError。"""
    from algorithm.serving.export_onnx import torch_reference

    contract = config.model.contract()
    refs, cands = [], []
    t_ref = t_cand = 0.0
    for feeds in sample_feeds(config, catalog, gates.num_samples, seed=4242):
        t0 = time.time()
        refs.append(torch_reference(model, feeds, contract))
        t1 = time.time()
        cands.append(runner.run(feeds))
        t_ref += t1 - t0
        t_cand += time.time() - t1
    cmp = compare_topk(np.concatenate([r[0] for r in refs]), np.concatenate([r[1] for r in refs]),
                       np.concatenate([c[0] for c in cands]), np.concatenate([c[1] for c in cands]),
                       gates.tie_tolerance)
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
    if kind == "onnxruntime":
        if precision == "fp32":
            artifact = onnx_path
        elif precision == "fp16":
            artifact = convert_fp16(onnx_path, os.path.join(engine_dir, f"{name}.fp16.onnx"))
        else:
            artifact = quantize_int8(config, catalog, onnx_path, os.path.join(engine_dir, f"{name}.int8.onnx"), log)
        runner = OnnxRuntimeRunner(artifact, contract, config.engine.num_threads)
    elif kind == "torch":
        from algorithm.serving.torch_engine import TorchRunner, export_torch_program

        artifact = export_torch_program(model, os.path.join(engine_dir, f"{name}.pt2"), config)
        runner = TorchRunner.from_config(artifact, contract, config)
    else:
        from algorithm.serving.optimize_trt import build_trt_engine

        artifact = build_trt_engine(onnx_path, os.path.join(engine_dir, f"{name}.{precision}.plan"), config,
                                    catalog=catalog)
        reports["gates"] = {"passed": False, "summary": "TensorRT 引擎的门禁需在有 TensorRT 的机器上运行 "
                                                        "scripts/build.py；本次未运行"}
        return artifact, reports
    reference = model
    if kind == "torch" and getattr(runner, "device", None) is not None and runner.device.type == "cuda":
        import copy

        reference = copy.deepcopy(model).to(runner.device)  # fp32 参考放在同一块 GPU 上（更快，仍是 fp32）
    log(f"      门禁：{config.gates.num_samples} 条采样历史，对比 fp32 PyTorch")
    reports["gates"] = run_gates(config, catalog, reference, runner, config.gates, precision)
    if kind == "torch":
        reports["torch_engine"] = {"load_seconds": runner.load_seconds, "capture_seconds": runner.capture_seconds,
                                   "cuda_graphs": len(runner.graphs), "compile_mode": config.engine.compile_mode}
    reports["gates"]["speedup_vs_reference"] = (reports["gates"]["reference_seconds"]
                                                / max(reports["gates"]["candidate_seconds"], 1e-9))
    log(f"      门禁通过：{reports['gates']['summary']}")
    return artifact, reports

