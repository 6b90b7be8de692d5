"""后处理：引擎输出的语义 ID -> 物品 id，去掉不对应物品的码与重复项，整理成 top-k。只依赖 numpy。

输出（每个请求）：item_ids [K] int64、scores [K] fp32（降序）、semantic_ids [K, 3] int64。
分数为 NaN 或低于 MASKED_SCORE（被目录约束掩掉的 beam）的项也丢弃。
有效物品不足 K 个时，尾部填充：item_ids = -1、semantic_ids = -1、scores = -inf（README 说明）。
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from algorithm.models.catalog import Catalog

FILL_ITEM = -1
FILL_SCORE = -np.inf
# 低于此分数的 beam 是被目录约束掩掉的（引擎用 dtype 最小值的一半作掩码），不是真实候选
MASKED_SCORE = -1e30


class Postprocessor:
    def __init__(self, catalog: Catalog, top_k: int):
        self.catalog = catalog
        self.top_k = int(top_k)

    def __call__(self, recommendations: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """recommendations [B, K, 3], scores [B, K] -> (item_ids [B, k], scores [B, k], semantic_ids [B, k, 3])。"""
        rec = np.asarray(recommendations, dtype=np.int64)
        sc = np.asarray(scores, dtype=np.float32)
        if rec.ndim != 3 or rec.shape[-1] != 3 or sc.shape != rec.shape[:2]:
            raise ValueError(f"引擎输出形状不符：recommendations {list(rec.shape)}，scores {list(sc.shape)}")
        b, k = sc.shape
        items, found = self.catalog.lookup_codes(rec)
        out_items = np.full((b, self.top_k), FILL_ITEM, dtype=np.int64)
        out_scores = np.full((b, self.top_k), FILL_SCORE, dtype=np.float32)
        out_sem = np.full((b, self.top_k, 3), FILL_ITEM, dtype=np.int64)
        for i in range(b):
            order = np.argsort(-sc[i], kind="stable")  # 引擎已降序；这里不信任、再排一次
            seen = set()
            n = 0
            for j in order:
                if not found[i, j] or items[i, j] in seen or not sc[i, j] > MASKED_SCORE:
                    continue
                seen.add(int(items[i, j]))
                out_items[i, n], out_scores[i, n], out_sem[i, n] = items[i, j], sc[i, j], rec[i, j]
                n += 1
                if n == self.top_k:
                    break
        return out_items, out_scores, out_sem
