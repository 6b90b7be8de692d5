"""剖析用的输入：按压测的长度分布抽样的历史，编码成引擎的六个输入，放到设备上。"""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np

INPUT_NAMES = ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "encoder_positions", "encoder_token_types",
               "encoder_mask")


class Histories:
    """目录里的真实物品组成的历史，编码方式与前处理相同（位置 0..n-1、行为类型 0、右侧填充）。"""

    def __init__(self, catalog_path: str, median: float, sigma: float, max_len: int):
        from algorithm.models.catalog import load_catalog

        self.catalog = load_catalog(catalog_path)
        self.order = np.argsort(self.catalog.item_ids)
        self.median, self.sigma, self.max_len = median, sigma, max_len

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """item id -> 目录行号。"""
        return self.order[np.searchsorted(self.catalog.item_ids, ids, sorter=self.order)]

    def sample(self, n: int, seed: int) -> List[np.ndarray]:
        """n 条历史，长度按默认分布（同一种子得到同一组）。"""
        from algorithm.models.train import SyntheticSequences
        from algorithm.serving.bucket_plan import default_lengths

        data = SyntheticSequences(self.catalog, seed)
        return [data.sample(1, int(k), random_lengths=False)[0][0]
                for k in default_lengths(self.median, self.sigma, self.max_len, n, seed)]

    def batch(self, b: int, length: int, seed: int) -> Dict[str, np.ndarray]:
        """b 条按默认分布抽的历史，编码成正好 [b, length]（短的补齐、长的截断）：按形状计时、捕获图用。"""
        feeds = self.encode(self.sample(b, seed)[:b], pad_to=length)
        return {k: v[:, :length] for k, v in feeds.items()}

    def encode(self, histories: Sequence[np.ndarray], pad_to: int = 0) -> Dict[str, np.ndarray]:
        length = max(pad_to, max(len(h) for h in histories))
        b = len(histories)
        sem = np.zeros((b, length, 3), np.int64)
        mask = np.zeros((b, length), np.float32)
        for i, h in enumerate(histories):
            sem[i, :len(h)] = self.catalog.semantic_ids[self.rows(np.asarray(h))]
            mask[i, :len(h)] = 1.0
        pos = np.where(mask > 0, np.arange(length)[None, :], 0)
        return {"encoder_l1_ids": sem[..., 0], "encoder_l2_ids": sem[..., 1], "encoder_l3_ids": sem[..., 2],
                "encoder_positions": pos, "encoder_token_types": np.zeros((b, length), np.int64),
                "encoder_mask": mask}


def to_device(feeds, device):
    """六个输入（按契约的顺序）-> 设备上的张量元组。"""
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in INPUT_NAMES)


def pt2_args(feeds, contract, packed: bool, device):
    """.pt2 的参数：拼行的程序先把 [B, L] 的一批拼成行（宽 = 最长者，不按桶）。"""
    if not packed:
        return to_device(feeds, device)
    import torch

    from algorithm.serving.runtime import rowpack

    bufs = rowpack.pack_requests(contract, [feeds], ())
    return tuple(torch.from_numpy(bufs[n]).to(device) for n in rowpack.input_names(contract))
