"""长度与 batch 的取整规则：前处理（原生后端按桶填充）、引擎运行器（按长度分组、CUDA Graph 按桶捕获）、
离线吞吐都用这里的同一份规则。"""
from __future__ import annotations

from typing import Sequence


def round_up(n: int, buckets: Sequence[int], limit: int = 0) -> int:
    """n 向上取整到不小于它的最小桶（再截到 limit）；没有这样的桶时返回 n（或 limit 与最大桶中较小者，若更大）。"""
    for b in buckets:
        if b >= n:
            return min(b, limit) if limit else b
    if not buckets:
        return n
    return max(n, min(limit, max(buckets)) if limit else n)


def length_class(n: int, seq_buckets: Sequence[int], limit: int) -> int:
    """请求按长度分组的组：有长度桶时为桶；没有时按 2 的幂分级（16, 32, 64, ...），
    这样一个长历史不会把整批短历史填充到它的长度。"""
    if seq_buckets:
        return round_up(n, seq_buckets, limit)
    return max(16, 1 << (int(n) - 1).bit_length())
