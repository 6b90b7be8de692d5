"""后处理：引擎输出的语义 ID -> 物品 id，去掉不对应物品的码与重复项，整理成 top-k。只依赖 numpy。

输出（每个请求）：item_ids [K] int64、scores [K] fp32（降序）、semantic_ids [K, 3] int64。
分数为 NaN 或低于 MASKED_SCORE（被目录约束掩掉的 beam）的项也丢弃。
有效物品不足 K 个时，尾部填充：item_ids = -1、semantic_ids = -1、scores = -inf（README 说明）。
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from algorithm.errors import EngineOutputError
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
            raise EngineOutputError(f"引擎输出形状不符：recommendations {list(rec.shape)}，scores {list(sc.shape)}")
        b, k = sc.shape
        items, found = self.catalog.lookup_codes(rec)
        # 按分数降序（引擎已降序；这里不信任、再稳定排序一次）
        order = np.argsort(-sc, axis=1, kind="stable")
        items = np.take_along_axis(items, order, 1)
        found = np.take_along_axis(found, order, 1)
        sc = np.take_along_axis(sc, order, 1)
        rec = np.take_along_axis(rec, order[..., None], 1)
        keep = found & (sc > MASKED_SCORE)  # NaN 比较为 False，也被丢弃
        # 行内去重：同一物品只保留分数最高（位置最靠前）的一次
        rows = np.repeat(np.arange(b), k)
        pos = np.tile(np.arange(k), b)
        flat_items = np.where(keep, items, -1).ravel()
        idx = np.lexsort((pos, flat_items, rows))
        same = np.zeros(b * k, dtype=bool)
        same[idx[1:]] = (rows[idx[1:]] == rows[idx[:-1]]) & (flat_items[idx[1:]] == flat_items[idx[:-1]])
        keep &= ~same.reshape(b, k)
        # 压紧：保留的项按原顺序移到前面，再截取 / 填充到 top_k
        compact = np.argsort(~keep, axis=1, kind="stable")[:, : self.top_k]
        kept = np.take_along_axis(keep, compact, 1)
        n = compact.shape[1]
        out_items = np.full((b, self.top_k), FILL_ITEM, dtype=np.int64)
        out_scores = np.full((b, self.top_k), FILL_SCORE, dtype=np.float32)
        out_sem = np.full((b, self.top_k, 3), FILL_ITEM, dtype=np.int64)
        out_items[:, :n] = np.where(kept, np.take_along_axis(items, compact, 1), FILL_ITEM)
        out_scores[:, :n] = np.where(kept, np.take_along_axis(sc, compact, 1), FILL_SCORE)
        out_sem[:, :n] = np.where(kept[..., None], np.take_along_axis(rec, compact[..., None], 1), FILL_ITEM)
        return out_items, out_scores, out_sem
