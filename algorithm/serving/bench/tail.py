"""尾部统计：分位数、P99 的置信区间（次序统计量，精确二项分布）与重复测量的中位数 / 范围。

为什么要区间：每点 300 个请求时 P99 只是第 3 慢的那个请求，一次停顿就决定 SLA 结果。
次序统计量给出不依赖分布的区间：样本里第 l 与第 u 个（从小到大）以 >= 95% 的概率夹住真实分位数。
样本太少时上界不存在（记为 None），SLA 搜索把它当作“不能证明达标”。
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional

import numpy as np

PERCENTILES = (50, 90, 95, 99, 99.9)


def percentiles(x: np.ndarray) -> Dict[str, Optional[float]]:
    if x.size == 0:
        return {f"p{p:g}": None for p in PERCENTILES} | {"mean": None, "max": None}
    return {f"p{p:g}": float(np.percentile(x, p)) for p in PERCENTILES} | {"mean": float(x.mean()),
                                                                              "max": float(x.max())}


def _binom_cdf(n: int, p: float) -> np.ndarray:
    k = np.arange(n + 1)
    lg = np.vectorize(math.lgamma)
    logpmf = lg(n + 1) - lg(k + 1) - lg(n - k + 1) + k * math.log(p) + (n - k) * math.log1p(-p)
    return np.cumsum(np.exp(logpmf - logpmf.max())) / np.exp(logpmf - logpmf.max()).sum()


def quantile_ci(x: np.ndarray, q: float = 0.99, confidence: float = 0.95) -> Dict[str, Any]:
    """q 分位数的双侧 confidence 置信区间（次序统计量）：{"low", "high", "n", "beyond"}。

    B = 不超过真实分位数的样本数 ~ Binomial(n, q)。下界取第 l 小，使 P(B >= l) >= 1 - a/2；
    上界取第 u 小，使 P(B < u) >= 1 - a/2。样本不够时对应的界为 None。beyond = 估计值以上的样本数。
    """
    n = int(x.size)
    if n == 0:
        return {"low": None, "high": None, "n": 0, "beyond": 0, "confidence": confidence}
    xs = np.sort(x)
    a = (1 - confidence) / 2
    cdf = _binom_cdf(n, q)
    k_lo = int(np.searchsorted(cdf, a, side="right")) - 1  # 满足 cdf(k) <= a 的最大 k
    k_hi = int(np.searchsorted(cdf, 1 - a, side="left"))  # 满足 cdf(k) >= 1 - a 的最小 k
    low = float(xs[k_lo]) if k_lo >= 0 else None
    high = float(xs[k_hi]) if k_hi < n else None
    return {"low": low, "high": high, "n": n, "beyond": int(round(n * (1 - q))), "confidence": confidence}


def min_samples_for_upper_bound(q: float = 0.99, confidence: float = 0.95) -> int:
    """q 分位数的上置信界存在所需的最少样本数：1 - q^n >= 1 - a/2。"""
    a = (1 - confidence) / 2
    return int(math.ceil(math.log(a) / math.log(q)))


def spread(values: Iterable[Optional[float]]) -> Dict[str, Any]:
    """重复测量的一个数字：中位数、最小、最大与全部取值（None 表示那次没有这个数）。"""
    vals = [v for v in values]
    real = [float(v) for v in vals if v is not None]
    if not real:
        return {"median": None, "min": None, "max": None, "values": vals}
    return {"median": float(np.median(real)), "min": min(real), "max": max(real), "values": vals}


def fmt_spread(s: Dict[str, Any], digits: int = 1, scale: float = 1.0) -> str:
    """“中位数 [最小–最大]”；scale 乘在每个数上（例如比例 -> 百分数）。"""
    if not s or s.get("median") is None:
        return "-"
    if s["min"] == s["max"]:
        return f"{s['median'] * scale:.{digits}f}"
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}]"


__all__ = ["PERCENTILES", "percentiles", "quantile_ci", "min_samples_for_upper_bound", "spread", "fmt_spread"]
