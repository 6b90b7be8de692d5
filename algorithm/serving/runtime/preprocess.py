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

from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from algorithm.interfaces import BEHAVIOR_INPUT, HISTORY_INPUT, UNKNOWN_COUNT_OUTPUT, ContractError, EngineContract
from algorithm.models.catalog import Catalog
from algorithm.serving.runtime.buckets import round_up


class PreprocessError(ContractError):
    """请求不合法：消息写明输入名、期望与实际。"""


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
        length = pad_to or round_up(longest, self.seq_buckets, self.contract.max_seq_length)
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

    def encode_requests(self, requests: Sequence[Dict[str, Optional[np.ndarray]]]
                        ) -> List[Union[Dict[str, np.ndarray], Exception]]:
        """一次 execute 的全部请求 -> 每个请求的引擎输入（或只属于该请求的错误）。

        向量化：所有请求的所有历史拼成一个数组，只查一次目录、做一次行为类型检查，再按行拆回。
        结果与逐个 clean + pack 完全相同（tests/serving/runtime/test_preprocess.py 对比）。
        """
        out: List[Union[Dict[str, np.ndarray], Exception]] = [None] * len(requests)  # type: ignore[list-item]
        rows: List[Tuple[int, np.ndarray, Optional[np.ndarray]]] = []  # (请求下标, 历史行, 行为类型行)
        for i, req in enumerate(requests):
            try:
                items = req.get(HISTORY_INPUT)
                if items is None:
                    given = sorted(k for k, v in req.items() if v is not None) or "无"
                    raise PreprocessError(f"缺少输入 {HISTORY_INPUT}（必需，INT64，形状 [batch, n]，旧 -> 新的物品 id）；"
                                          f"请求中的输入：{given}")
                behaviors = req.get(BEHAVIOR_INPUT)
                if items.ndim != 2:
                    raise PreprocessError(f"{HISTORY_INPUT}: 应为 [batch, n]，得到形状 {list(items.shape)}")
                if items.dtype != np.int64:
                    raise PreprocessError(f"{HISTORY_INPUT}: dtype 应为 int64，得到 {items.dtype.name}")
                if items.shape[1] == 0:
                    raise PreprocessError(f"[0] {HISTORY_INPUT}: 历史为空；至少需要 1 个物品")
                if items.shape[1] > self.max_history_items:
                    raise PreprocessError(f"[0] {HISTORY_INPUT}: 历史有 {items.shape[1]} 项，超过上限 "
                                          f"{self.max_history_items}")
                if behaviors is not None:
                    if behaviors.ndim != 2 or behaviors.dtype != np.int64:
                        raise PreprocessError(f"{BEHAVIOR_INPUT}: 应为 int64 [batch, n]，得到 {behaviors.dtype.name} "
                                              f"{list(behaviors.shape)}")
                    if behaviors.shape != items.shape:
                        raise PreprocessError(f"[0] {BEHAVIOR_INPUT}: 长度 {behaviors.shape[1]} 应与 {HISTORY_INPUT} "
                                              f"的 {items.shape[1]} 相同")
                for r in range(items.shape[0]):
                    rows.append((i, items[r], None if behaviors is None else behaviors[r]))
            except PreprocessError as e:
                out[i] = e
        if not rows:
            return out
        lengths = np.fromiter((len(r[1]) for r in rows), dtype=np.int64, count=len(rows))
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        flat_items = np.concatenate([r[1] for r in rows])
        flat_types = np.concatenate([np.zeros(len(r[1]), np.int64) if r[2] is None else r[2] for r in rows])
        sem, found = self.catalog.lookup_items(flat_items)
        bad_type = (flat_types < 0) | (flat_types >= self.contract.num_token_types)
        unknown = np.add.reduceat((~found).astype(np.int64), starts)
        bad_rows = np.add.reduceat(bad_type.astype(np.int64), starts) > 0
        keep_len = np.add.reduceat(found.astype(np.int64), starts)
        per_request: Dict[int, list] = {}
        for j, (i, _, _) in enumerate(rows):
            if isinstance(out[i], Exception):
                continue
            row_in_req = len(per_request.get(i, []))
            where = f"[{row_in_req}] "
            s0, n = int(starts[j]), int(lengths[j])
            if bad_rows[j]:
                k = int(np.argmax(bad_type[s0:s0 + n]))
                out[i] = PreprocessError(f"{where}{BEHAVIOR_INPUT}[{k}] = {flat_types[s0 + k]}，应在 "
                                         f"[0, {self.contract.num_token_types}) 内")
                continue
            if unknown[j] and self.policy == "error":
                k = int(np.argmax(~found[s0:s0 + n]))
                out[i] = PreprocessError(f"{where}{HISTORY_INPUT}[{k}] = {flat_items[s0 + k]} 不在目录中"
                                         "（unknown_item_policy=error）")
                continue
            if keep_len[j] == 0:
                out[i] = PreprocessError(f"{where}{HISTORY_INPUT}: {int(unknown[j])} 个物品都不在目录中，没有可用的历史")
                continue
            ok = found[s0:s0 + n]
            keep = self.contract.max_seq_length
            row_sem = sem[s0:s0 + n][ok][-keep:] if unknown[j] else sem[s0:s0 + n][-keep:]
            row_types = flat_types[s0:s0 + n][ok][-keep:] if unknown[j] else flat_types[s0:s0 + n][-keep:]
            per_request.setdefault(i, []).append((row_sem, row_types, int(unknown[j])))
        for i, req_rows in per_request.items():
            if isinstance(out[i], Exception):
                continue
            feeds = self.pack([(s, t) for s, t, _ in req_rows])
            feeds[UNKNOWN_COUNT_OUTPUT] = np.asarray([u for _, _, u in req_rows], dtype=np.int64).reshape(-1, 1)
            out[i] = feeds
        return out
