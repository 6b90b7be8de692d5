"""请求的分布：历史长度（对数正态，截断到 [1, max_len]）与按主题抽取的真实目录物品。

压测的请求生成、精度门禁与 int8 校准的采样、离线吞吐、长度桶的规划都用这一份分布，
所以“门禁看到的历史”与“压测发出的历史”同分布。
"""
from __future__ import annotations

import math
from typing import List

import numpy as np


def lognormal_lengths(median: float, sigma: float, n: int, max_len: int, seed: int) -> np.ndarray:
    """历史长度：对数正态（中位数 median，形状 sigma），四舍五入后截断到 [1, max_len]。全项目只有这一个公式。"""
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(math.log(median), sigma, n)), 1, max_len).astype(int)


def sample_lengths(cfg, n: int, max_len: int, seed: int) -> np.ndarray:
    """cfg 有 length_median 与 length_sigma（BenchmarkConfig）。"""
    return lognormal_lengths(cfg.length_median, cfg.length_sigma, n, max_len, seed)


def make_histories(catalog_path: str, cfg, n: int, max_len: int, seed: int) -> List[np.ndarray]:
    """n 条原始历史（目录中的真实物品，按主题抽取，与训练数据 models/sequences.py 同分布：每个用户 1-3 个主题，
    每个物品先等概率选一个主题、再在主题内均匀抽）。按条向量化：压测每个点要生成上万条，逐物品抽样太慢。"""
    from algorithm.models.catalog import load_catalog

    catalog = load_catalog(catalog_path)
    rng = np.random.default_rng(seed)
    l1 = catalog.semantic_ids[:, 0]
    topics = np.unique(l1)
    members = [np.flatnonzero(l1 == t) for t in topics]
    sizes = np.array([len(m) for m in members])
    out = []
    for k in sample_lengths(cfg, n, max_len, seed):
        user = rng.choice(len(topics), size=int(rng.integers(1, 4)), replace=False)
        pick = user[rng.integers(0, len(user), int(k))]
        out.append(catalog.item_ids[_rows(members, pick, rng.integers(0, sizes[pick]))])
    return out


def _rows(members, pick: np.ndarray, offset: np.ndarray) -> np.ndarray:
    rows = np.empty(len(pick), dtype=np.int64)
    for t in np.unique(pick):
        sel = pick == t
        rows[sel] = members[t][offset[sel]]
    return rows
