"""推荐结果的精度比较：top-k 集合重合、top-1 一致、分数误差。只依赖 numpy。

并列处理：beam search 的第 k 名附近若分数几乎相同（差 <= tie_tolerance），
不同实现可能取到不同的并列项；这类差异不算错误（exact_overlap 仍如实报告）。
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict

import numpy as np


@dataclass
class TopKComparison:
    rows: int
    overlap: float  # 允许并列交换后的平均 top-k 集合重合率
    exact_overlap: float  # 不考虑并列的平均重合率
    min_overlap: float  # 最差一行（允许并列）
    top1_agreement: float  # 允许并列
    exact_top1_agreement: float
    score_mae: float  # 对两边都有的三元组，分数平均绝对误差
    score_max_abs: float

    def to_dict(self) -> Dict[str, float]:
        return asdict(self)


def compare_topk(ref_rec: np.ndarray, ref_scores: np.ndarray, rec: np.ndarray, scores: np.ndarray,
                 tie_tolerance: float = 1e-4) -> TopKComparison:
    """比较两组引擎输出（[B, K, 3] 与 [B, K]）。"""
    ref_rec, rec = np.asarray(ref_rec), np.asarray(rec)
    ref_scores, scores = np.asarray(ref_scores, np.float64), np.asarray(scores, np.float64)
    b, k = ref_scores.shape
    overlaps, exact, top1, strict_top1, errs = [], [], [], [], []
    for i in range(b):
        ref = {tuple(t): s for t, s in zip(ref_rec[i].tolist(), ref_scores[i])}
        got = {tuple(t): s for t, s in zip(rec[i].tolist(), scores[i])}
        common = ref.keys() & got.keys()
        exact.append(len(common) / k)
        # 参考里缺失的项若分数与参考第 k 名相差 <= tie_tolerance，视为并列交换
        kth = ref_scores[i].min()
        tied_missing = sum(1 for t in ref.keys() - got.keys() if ref[t] - kth <= tie_tolerance)
        tied_extra = sum(1 for t in got.keys() - ref.keys() if abs(got[t] - kth) <= tie_tolerance)
        overlaps.append((len(common) + min(tied_missing, tied_extra)) / k)
        ref_top = tuple(ref_rec[i, int(np.argmax(ref_scores[i]))])
        got_top = tuple(rec[i, int(np.argmax(scores[i]))])
        strict_top1.append(ref_top == got_top)
        # 候选的第一名在参考里与参考第一名并列（分数差 <= tie_tolerance）也算一致
        top1.append(ref_top == got_top or (got_top in ref and ref_scores[i].max() - ref[got_top] <= tie_tolerance))
        errs.extend(abs(ref[t] - got[t]) for t in common)
    errs_arr = np.asarray(errs) if errs else np.asarray([np.inf])
    return TopKComparison(rows=b, overlap=float(np.mean(overlaps)), exact_overlap=float(np.mean(exact)),
                          min_overlap=float(np.min(overlaps)), top1_agreement=float(np.mean(top1)),
                          exact_top1_agreement=float(np.mean(strict_top1)),
                          score_mae=float(errs_arr.mean()), score_max_abs=float(errs_arr.max()))
