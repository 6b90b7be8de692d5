"""合成行为序列（只依赖 numpy）：训练参考模型、门禁采样与压测请求都用它。
单独成模块是为了让压测的发压进程不必导入 torch（每个负载点都要新起几个进程）。"""
from __future__ import annotations

import numpy as np

from algorithm.models.catalog import Catalog


class SyntheticSequences:
    """按主题生成合成历史（item id 序列）与下一个物品。"""

    def __init__(self, catalog: Catalog, seed: int = 0):
        self.catalog = catalog
        self.rng = np.random.default_rng(seed)
        l1 = catalog.semantic_ids[:, 0]
        self.topics = np.unique(l1)
        self.by_topic = {int(t): np.flatnonzero(l1 == t) for t in self.topics}

    def sample(self, batch: int, length: int, random_lengths: bool = True):
        """-> (histories: list[np.ndarray item ids], next_rows: np.ndarray 目录行号 [batch])。"""
        histories, nexts = [], []
        for _ in range(batch):
            user_topics = self.rng.choice(self.topics, size=int(self.rng.integers(1, 4)), replace=False)
            n = int(self.rng.integers(1, length + 1)) if random_lengths else length
            rows = [self.rng.choice(self.by_topic[int(self.rng.choice(user_topics))]) for _ in range(n + 1)]
            histories.append(self.catalog.item_ids[np.asarray(rows[:-1])])
            nexts.append(rows[-1])
        return histories, np.asarray(nexts)
