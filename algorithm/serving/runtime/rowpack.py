"""拼行（engine.pack_rows）：一次 execute 的全部历史首尾相接拼进宽 W 的行，交给拼行的 torch 程序
（UGTModel.forward_packed）一次运行。只依赖 numpy。

为什么：按长度分组时，一次 execute 的十几个请求落在 2-4 个长度桶里，每组一次图重放、各自填充到桶长；小 batch 的图
大半是几百个小内核的固定开销（H100 上 b8xL128 一次 2.2 ms），编码器算的 token 是需要的 2.1-2.2 倍
（bucket_plan.execute_padding）。拼行后每次 execute 一次启动；编码器只多算行尾的空位，解码器的交叉注意力把每条
历史的记忆取回成 [N, W]（按 request_index，填充处屏蔽）。

布局：W = 最长历史所在的长度桶；按长度从长到短、放进第一个放得下的行（first-fit decreasing）。
segments[r, c] = 该位置所属历史的编号 + 1（mask 为 0 的位置与空位为 0）；request_index[i, j] = 历史 i 的第 j 个
位置在 R*W 里的下标（-1 = 填充）。
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from algorithm.interfaces import EngineContract
from algorithm.serving.runtime.batching import MASK, Group, RequestBatch, collect, split_rows
from algorithm.serving.runtime.buckets import round_up

SEGMENTS = "segments"
REQUEST_INDEX = "request_index"


def is_packed_program(program, contract: EngineContract) -> bool:
    """torch.export 的程序是不是拼行的（UGTModel.forward_packed）：它比契约多一个输入。运行器与剖析脚本都这样认，不另设开关。"""
    return len(program.graph_signature.user_inputs) == len(contract.input_names) + 1


def input_names(contract: EngineContract) -> Tuple[str, ...]:
    """拼行程序的 7 个输入，按导出的顺序：5 个 token 输入（契约顺序，去掉 mask）+ segments + request_index。"""
    return tuple(n for n in contract.input_names if n != MASK) + (SEGMENTS, REQUEST_INDEX)


def buffer_specs(contract: EngineContract, rows: int, width: int, histories: int) -> Dict[str, Tuple[tuple, np.dtype]]:
    """各输入的 (形状, dtype)：token 输入与 segments [rows, width]，request_index [histories, width]。"""
    specs = {s.name: ((rows, width), np.dtype(s.dtype)) for s in contract.inputs if s.name != MASK}
    specs[SEGMENTS] = ((rows, width), np.dtype(np.int32))
    specs[REQUEST_INDEX] = ((histories, width), np.dtype(np.int64))
    return specs


def alloc(contract: EngineContract, rows: int, width: int, histories: int) -> Dict[str, np.ndarray]:
    """零初始化的输入（0 是每个 token 输入的合法值；空位由 fill 写成 segments 0、request_index -1）。"""
    return {n: np.zeros(shape, dtype) for n, (shape, dtype) in buffer_specs(contract, rows, width, histories).items()}


@dataclass
class RowPlan:
    """每条历史（RequestBatch 里按请求、行展开的顺序）放在第 row 行的 offset 处，占 lengths 个位置；
    src 为它在拼接数组里的起点。width 为行宽，rows 为用到的行数。"""

    width: int
    rows: int
    row: np.ndarray
    offset: np.ndarray
    lengths: np.ndarray
    src: np.ndarray

    @property
    def histories(self) -> int:
        return int(len(self.lengths))


def row_lengths(batch: RequestBatch) -> Tuple[np.ndarray, np.ndarray]:
    """每条历史要拼的长度（最后一个有效位置 + 1：行尾的填充不拼，中间 mask 为 0 的位置照拼、由 segments 屏蔽）
    与它在拼接数组里的起点。collect 已保证每行至少一个有效位置。"""
    mask = batch.flat[MASK]
    row_w = np.repeat(batch.widths, batch.rows)
    starts = np.cumsum(row_w) - row_w
    col = np.arange(mask.size) - np.repeat(starts, row_w)
    last = np.maximum.reduceat(np.where(mask > 0, col + 1, 0), starts)
    return last.astype(np.int64), starts.astype(np.int64)


def first_fit_decreasing(lengths: np.ndarray, width: int) -> Tuple[np.ndarray, np.ndarray, int]:
    """长度各为 lengths（都 <= width）的段拼进宽 width 的行：从长到短，每段放进第一个剩余空间够的行，否则开新行。
    返回 (每段的行号, 行内起点, 用到的行数)。段数 <= 64，循环的代价可以忽略。bucket_plan.execute_padding 的估算也用它。"""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    free = np.zeros(n, dtype=np.int64)
    row = np.empty(n, dtype=np.int64)
    offset = np.empty(n, dtype=np.int64)
    used = 0
    for i in np.argsort(-lengths, kind="stable"):
        fits = np.flatnonzero(free[:used] >= lengths[i])
        j = int(fits[0]) if fits.size else used
        if j == used:
            free[used] = width
            used += 1
        row[i], offset[i] = j, width - free[j]
        free[j] -= lengths[i]
    return row, offset, used


def plan(batch: RequestBatch, seq_buckets: Sequence[int], limit: int) -> RowPlan:
    """宽 = 最长历史所在的长度桶，全部历史 first-fit decreasing 拼进这个宽度的行。"""
    lengths, src = row_lengths(batch)
    width = round_up(int(lengths.max()), seq_buckets, limit)
    row, offset, used = first_fit_decreasing(lengths, width)
    return RowPlan(width, used, row, offset, lengths, src)


def fill(batch: RequestBatch, p: RowPlan, buffers: Dict[str, np.ndarray]) -> None:
    """按 p 把历史写进 buffers（alloc 的形状，行数 >= p.rows、宽 = p.width、历史数 >= p.histories）。
    每个输入一次向量化的 scatter；segments 与 request_index 先整块清成 0 / -1（空位与多出的历史行）。"""
    width = buffers[SEGMENTS].shape[1]
    if width != p.width:
        raise ValueError(f"暂存区宽 {width} 与拼行计划的宽 {p.width} 不同")
    ls = p.lengths
    base = np.arange(int(ls.sum())) - np.repeat(np.cumsum(ls) - ls, ls)
    src = np.repeat(p.src, ls) + base
    dst = np.repeat(p.row * width + p.offset, ls) + base
    hist = np.repeat(np.arange(len(ls)), ls)
    valid = batch.flat[MASK][src] > 0
    for name, buf in buffers.items():
        if name not in (SEGMENTS, REQUEST_INDEX):
            buf.reshape(-1)[dst] = batch.flat[name][src]
    seg = buffers[SEGMENTS]
    seg.fill(0)
    seg.reshape(-1)[dst] = np.where(valid, hist + 1, 0)
    ri = buffers[REQUEST_INDEX]
    ri.fill(-1)
    ri.reshape(-1)[hist * width + base] = np.where(valid, dst, -1)


def split(batch: RequestBatch, p: RowPlan) -> List[Tuple[int, int, int]]:
    """(原请求下标, 起始历史, 历史数)：输出的第 i 行是第 i 条历史（RequestBatch 的展开顺序）。"""
    return split_rows(batch, Group(np.arange(len(batch.index)), batch.total_rows, p.width))


def pack_requests(contract: EngineContract, requests: Sequence[Dict[str, np.ndarray]], seq_buckets: Sequence[int],
                  rows: int = 0, histories: int = 0) -> Dict[str, np.ndarray]:
    """不经运行器把几个请求（各 {输入名: [b, L]}）拼成拼行程序的一组输入；行数 / 历史数可以多于需要。
    导出、CUDA Graph 捕获与剖析用（服务时由运行器把它们写进页锁定的暂存区）。"""
    batch, errors = collect(requests, contract)
    if errors or batch is None:
        raise ValueError(f"输入不合法：{errors}")
    p = plan(batch, seq_buckets, contract.max_seq_length)
    bufs = alloc(contract, max(rows, p.rows), p.width, max(histories, p.histories))
    fill(batch, p, bufs)
    return bufs


def example_inputs(contract: EngineContract, lengths: Sequence[int], width: int, rng: np.random.Generator,
                   rows: int = 0, histories: int = 0) -> Dict[str, np.ndarray]:
    """随机历史（各长 lengths，都 <= width）拼成宽 width 的一组合法输入（导出与 CUDA Graph 捕获用）。"""
    feeds = [contract.random_inputs(1, int(n), rng) for n in lengths]
    return pack_requests(contract, feeds, (width,), rows, histories)


__all__ = ["REQUEST_INDEX", "SEGMENTS", "RowPlan", "alloc", "buffer_specs", "example_inputs", "fill",
           "first_fit_decreasing", "input_names", "is_packed_program", "pack_requests", "plan", "row_lengths", "split"]
