"""精度门禁：候选引擎对 fp32 PyTorch，在按压测长度分布采样的历史上比较 top-k 重合、top-1 一致、分数误差；
不通过就抛 AccuracyError 并停止构建。"""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator

import numpy as np

from algorithm.errors import AccuracyError
from algorithm.models.catalog import Catalog
from algorithm.serving.accuracy import compare_topk
from algorithm.serving.config import GateConfig, ServingConfig


def sample_feeds(config: ServingConfig, catalog: Catalog, num: int, seed: int, batch: int = 16,
                 max_len: int = 0, pad_to: int = 0) -> Iterator[Dict[str, np.ndarray]]:
    """从合成行为序列采样历史（长度服从压测同样的对数正态分布，截断到 max_len，缺省 max_seq_length），
    经前处理得到引擎输入；pad_to > 0 时每批右侧填充到这个长度（TensorRT 校准要求固定形状）。"""
    from algorithm.models.sequences import SyntheticSequences
    from algorithm.serving.runtime.preprocess import Preprocessor
    from algorithm.serving.workload import sample_lengths

    data = SyntheticSequences(catalog, seed)
    pre = Preprocessor(catalog, config.contract())
    max_len = min(max_len or config.export.max_seq_length, config.export.max_seq_length)
    if pad_to and pad_to < max_len:
        raise ValueError(f"pad_to={pad_to} 小于 max_len={max_len}")
    lengths = sample_lengths(config.benchmark, num, max_len, seed)  # 与压测同一个长度分布
    for start in range(0, num, batch):
        histories = [data.sample(1, int(n), random_lengths=False)[0][0] for n in lengths[start:start + batch]]
        yield pre.encode_batch(histories, pad_to=pad_to or None)


def run_gates(config: ServingConfig, catalog: Catalog, model, runner, gates: GateConfig,
              precision: str, baseline=None) -> Dict[str, Any]:
    """候选引擎 vs fp32 PyTorch：返回报告；不通过抛 AccuracyError。
    baseline（例如 fp32 的 ONNX 运行器）给出时，在同样的批上计时，报告候选相对它的加速比。"""
    from algorithm.serving.export_onnx import torch_reference

    contract = config.contract()
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
        int8 = precision in ("int8", "fp8")  # 8 位的门槛（GateConfig.int8_*）
        checks = {"overlap": (cmp.overlap, ">=", gates.int8_min_overlap if int8 else gates.min_overlap),
                  "top1_agreement": (cmp.top1_agreement, ">=",
                                     gates.int8_min_top1_agreement if int8 else gates.min_top1_agreement),
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
