"""物品目录：item id <-> 唯一的三级语义 ID (l1, l2, l3)。只依赖 numpy。

文件格式（.npz，np.savez 写出，np.load(allow_pickle=False) 读入）：
  item_ids        int64 [N]     物品 id，非负、互不相同
  semantic_ids    int64 [N, 3]  每个物品的 (l1, l2, l3)，三元组互不相同
  codebook_sizes  int64 [3]     各级码本大小，语义 ID 须在 [0, size) 内
真实目录按同样格式保存即可，加载走同一段代码（load_catalog）。
合成目录由 synthetic_catalog(num_items, seed) 生成：一级码是少数“主题”，
便于生成有结构的合成行为序列（train.py）。
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np

from algorithm.errors import CatalogError  # noqa: F401  (定义在 algorithm/errors.py，这里照旧可导入)

FORMAT_KEYS = ("item_ids", "semantic_ids", "codebook_sizes")


@dataclass(frozen=True)
class Catalog:
    """已校验的目录，提供双向的向量化查找（排序 + searchsorted，O(log N)）。"""

    item_ids: np.ndarray  # int64 [N]
    semantic_ids: np.ndarray  # int64 [N, 3]
    codebook_sizes: Tuple[int, int, int]

    def __post_init__(self) -> None:
        ids = np.ascontiguousarray(self.item_ids, dtype=np.int64)
        sem = np.ascontiguousarray(self.semantic_ids, dtype=np.int64)
        sizes = tuple(int(s) for s in self.codebook_sizes)
        if ids.ndim != 1 or sem.shape != (ids.shape[0], 3):
            raise CatalogError(f"目录形状不符：item_ids {ids.shape}，semantic_ids {sem.shape}（应为 [N] 与 [N, 3]）")
        if ids.size == 0:
            raise CatalogError("目录为空")
        if (ids < 0).any():
            raise CatalogError(f"item_ids 应非负；第 {int(np.argmax(ids < 0))} 项为 {ids[ids < 0][0]}")
        for level, size in enumerate(sizes):
            col = sem[:, level]
            bad = (col < 0) | (col >= size)
            if bad.any():
                i = int(np.argmax(bad))
                raise CatalogError(f"第 {i} 个物品（id {ids[i]}）的 l{level + 1} = {col[i]} 超出 [0, {size})")
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if dup.size:
            raise CatalogError(f"item_ids 有重复：{sorted_ids[dup[0]]}")
        keys = self._keys(sem, sizes)
        key_order = np.argsort(keys, kind="stable")
        sorted_keys = keys[key_order]
        dup = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1])
        if dup.size:
            a, b = key_order[dup[0]], key_order[dup[0] + 1]
            raise CatalogError(f"语义 ID 三元组重复：物品 {ids[a]} 与 {ids[b]} 都是 {sem[a].tolist()}")
        object.__setattr__(self, "item_ids", ids)
        object.__setattr__(self, "semantic_ids", sem)
        object.__setattr__(self, "codebook_sizes", sizes)
        object.__setattr__(self, "_id_sorted", sorted_ids)
        object.__setattr__(self, "_id_order", order)
        object.__setattr__(self, "_key_sorted", sorted_keys)
        object.__setattr__(self, "_key_order", key_order)

    @staticmethod
    def _keys(sem: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
        return (sem[..., 0] * sizes[1] + sem[..., 1]) * sizes[2] + sem[..., 2]

    def __len__(self) -> int:
        return int(self.item_ids.shape[0])

    def lookup_items(self, item_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """item id -> (semantic_ids [..., 3], found [...] bool)。未找到的位置语义 ID 为 0。"""
        q = np.asarray(item_ids, dtype=np.int64)
        pos = np.searchsorted(self._id_sorted, q)
        pos_c = np.minimum(pos, len(self) - 1)
        found = self._id_sorted[pos_c] == q
        sem = self.semantic_ids[self._id_order[pos_c]]
        sem = np.where(found[..., None], sem, 0)
        return sem, found

    def lookup_codes(self, semantic_ids: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """语义 ID [..., 3] -> (item_ids [...], found [...])。不对应物品的码为 -1。"""
        sem = np.asarray(semantic_ids, dtype=np.int64)
        in_range = np.ones(sem.shape[:-1], dtype=bool)
        for level, size in enumerate(self.codebook_sizes):
            in_range &= (sem[..., level] >= 0) & (sem[..., level] < size)
        keys = self._keys(np.where(in_range[..., None], sem, 0), self.codebook_sizes)
        pos = np.minimum(np.searchsorted(self._key_sorted, keys), len(self) - 1)
        found = in_range & (self._key_sorted[pos] == keys)
        items = np.where(found, self.item_ids[self._key_order[pos]], -1)
        return items, found

    def save(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, item_ids=self.item_ids, semantic_ids=self.semantic_ids,
                 codebook_sizes=np.asarray(self.codebook_sizes, dtype=np.int64))
        os.replace(tmp, path)
        return path


def load_catalog(path: str) -> Catalog:
    """读取并校验目录文件（格式见模块说明）。"""
    if not os.path.isfile(path):
        raise CatalogError(f"目录文件不存在：{path}")
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in FORMAT_KEYS if k not in data.files]
        if missing:
            raise CatalogError(f"{path} 缺少字段 {missing}；格式需要 {list(FORMAT_KEYS)}")
        sizes = data["codebook_sizes"]
        if sizes.shape != (3,):
            raise CatalogError(f"{path}: codebook_sizes 应为 3 个整数，得到形状 {sizes.shape}")
        return Catalog(data["item_ids"], data["semantic_ids"], tuple(int(s) for s in sizes))


def synthetic_catalog(num_items: int, codebook_sizes: Sequence[int], seed: int = 0,
                      num_topics: int = 64) -> Catalog:
    """带种子的合成目录：一级码取自 num_topics 个主题，二、三级码随机，三元组唯一；
    item id 为稀疏的非负整数（不是 0..N-1，以便覆盖 id 映射）。"""
    v1, v2, v3 = (int(s) for s in codebook_sizes)
    if num_items > v1 * v2 * v3:
        raise CatalogError(f"num_items {num_items} 超过语义 ID 空间 {v1 * v2 * v3}")
    rng = np.random.default_rng(seed)
    topics = rng.choice(v1, size=min(num_topics, v1), replace=False)
    chosen: dict = {}
    while len(chosen) < num_items:
        n = (num_items - len(chosen)) * 2
        sem = np.stack([rng.choice(topics, n), rng.integers(0, v2, n), rng.integers(0, v3, n)], axis=1)
        for row in sem:
            key = (int(row[0]), int(row[1]), int(row[2]))
            if key not in chosen:
                chosen[key] = len(chosen)
                if len(chosen) == num_items:
                    break
    sem = np.array(list(chosen.keys()), dtype=np.int64)
    item_ids = rng.choice(num_items * 10, size=num_items, replace=False).astype(np.int64) + 1
    return Catalog(item_ids, sem, (v1, v2, v3))
