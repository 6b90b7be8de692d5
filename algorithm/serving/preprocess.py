"""前处理：原始历史（item id，从旧到新，可选行为类型）-> 引擎的六个输入。只依赖 numpy。

规则（README 同步说明）：
- 未知物品 id（不在目录中，或为负）：policy=skip 时跳过并计数（计数随响应返回），
  policy=error 时拒绝整个请求；跳过后历史为空也拒绝。越界 id 永远到不了引擎。
- 超过 max_seq_length 的历史：保留最近的 max_seq_length 个物品（截断，不报错）。
- 位置：保留下来的物品从旧到新编号 0..n-1；行为类型缺省为 0，须在 [0, num_token_types) 内。
- 右侧填充到 seq_buckets 中不小于 n 的最小桶（没有桶时不填充），mask 1 = 有效、0 = 填充。
  模型对填充不变，所以填充只影响形状（同一桶的请求可以在原生后端里拼成一批，CUDA Graph 按桶捕获）。
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from algorithm.interfaces import ContractError, EngineContract
from algorithm.models.catalog import Catalog


class PreprocessError(ContractError):
    """请求不合法：消息写明输入名、期望与实际。"""


def bucket_length(n: int, buckets: Sequence[int], limit: int) -> int:
    """n 向上取整到桶；超过最大桶时用 limit（max_seq_length）。"""
    for b in buckets:
        if b >= n:
            return min(b, limit)
    return max(n, min(limit, max(buckets) if buckets else n))


class Preprocessor:
    """把一个请求的原始历史变成引擎输入。catalog 与 contract 在构造时给定，实例可复用。"""

    def __init__(self, catalog: Catalog, contract: EngineContract, unknown_item_policy: str = "skip",
                 max_history_items: int = 100_000, seq_buckets: Sequence[int] = ()):
        if tuple(catalog.codebook_sizes) != tuple(contract.codebook_sizes):
            raise ContractError(f"目录码本大小 {catalog.codebook_sizes} 与引擎契约 {contract.codebook_sizes} 不一致")
        if unknown_item_policy not in ("skip", "error"):
            raise ContractError(f"unknown_item_policy 应为 skip 或 error，得到 {unknown_item_policy!r}")
        self.catalog = catalog
        self.contract = contract
        self.policy = unknown_item_policy
        self.max_history_items = int(max_history_items)
        self.seq_buckets = tuple(sorted(int(b) for b in seq_buckets))

    def _check_1d(self, name: str, arr: np.ndarray, where: str) -> np.ndarray:
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[0] == 1:
            arr = arr[0]
        if arr.ndim != 1:
            raise PreprocessError(f"{where}{name}: 应为一维历史 [n]（或 [1, n]），得到形状 {list(arr.shape)}")
        if arr.dtype != np.int64:
            raise PreprocessError(f"{where}{name}: dtype 应为 int64，得到 {arr.dtype.name}")
        return arr

    def clean(self, item_ids, behavior_types=None, where: str = "") -> Tuple[np.ndarray, np.ndarray, np.ndarray, int]:
        """校验、查目录、截断 -> (semantic_ids [n, 3], token_types [n], 保留的 item ids [n], 未知数)。"""
        items = self._check_1d("history_item_ids", item_ids, where)
        if items.size == 0:
            raise PreprocessError(f"{where}history_item_ids: 历史为空；至少需要 1 个物品")
        if items.size > self.max_history_items:
            raise PreprocessError(f"{where}history_item_ids: 历史有 {items.size} 项，超过上限 {self.max_history_items}")
        if behavior_types is None:
            types = np.zeros_like(items)
        else:
            types = self._check_1d("history_behavior_types", behavior_types, where)
            if types.shape != items.shape:
                raise PreprocessError(f"{where}history_behavior_types: 长度 {types.size} 应与 history_item_ids 的 {items.size} 相同")
            bad = (types < 0) | (types >= self.contract.num_token_types)
            if bad.any():
                i = int(np.argmax(bad))
                raise PreprocessError(f"{where}history_behavior_types[{i}] = {types[i]}，应在 "
                                      f"[0, {self.contract.num_token_types}) 内")
        sem, found = self.catalog.lookup_items(items)
        unknown = int((~found).sum())
        if unknown and self.policy == "error":
            i = int(np.argmax(~found))
            raise PreprocessError(f"{where}history_item_ids[{i}] = {items[i]} 不在目录中（unknown_item_policy=error）")
        if unknown:
            sem, types, items = sem[found], types[found], items[found]
        if items.size == 0:
            raise PreprocessError(f"{where}history_item_ids: {unknown} 个物品都不在目录中，没有可用的历史")
        keep = self.contract.max_seq_length
        return sem[-keep:], types[-keep:], items[-keep:], unknown

    def encode_batch(self, histories: List[np.ndarray], behaviors: Optional[List[Optional[np.ndarray]]] = None,
                     pad_to: Optional[int] = None) -> Dict[str, np.ndarray]:
        """多条历史 -> 一批引擎输入 [B, L]（右侧填充到最长者，再按桶向上取整）。"""
        cleaned = [self.clean(h, None if behaviors is None else behaviors[i], where=f"[{i}] ")
                   for i, h in enumerate(histories)]
        return self.pack([(c[0], c[1]) for c in cleaned], pad_to)

    def pack(self, rows: List[Tuple[np.ndarray, np.ndarray]], pad_to: Optional[int] = None) -> Dict[str, np.ndarray]:
        """[(semantic_ids [n,3], token_types [n])...] -> 填充后的引擎输入。"""
        longest = max(r[0].shape[0] for r in rows)
        length = pad_to or bucket_length(longest, self.seq_buckets, self.contract.max_seq_length)
        b = len(rows)
        sem = np.zeros((b, length, 3), dtype=np.int64)
        types = np.zeros((b, length), dtype=np.int64)
        mask = np.zeros((b, length), dtype=np.float32)
        for i, (s, t) in enumerate(rows):
            n = s.shape[0]
            sem[i, :n], types[i, :n], mask[i, :n] = s, t, 1.0
        positions = np.where(mask > 0, np.arange(length, dtype=np.int64)[None, :], 0)
        return {"encoder_l1_ids": sem[..., 0], "encoder_l2_ids": sem[..., 1], "encoder_l3_ids": sem[..., 2],
                "encoder_positions": positions, "encoder_token_types": types, "encoder_mask": mask}

    def encode_one(self, item_ids, behavior_types=None) -> Tuple[Dict[str, np.ndarray], int]:
        """一个请求 -> (引擎输入 [1, L], 跳过的未知物品数)。"""
        sem, types, _, unknown = self.clean(item_ids, behavior_types)
        return self.pack([(sem, types)]), unknown
