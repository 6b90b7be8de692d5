"""引擎一跳的输入打包：python 运行器托管引擎时，前处理把引擎的 6 个输入拼成一个 int64 张量交给引擎，引擎再拆回。

为什么：python backend 每个请求的交接成本随张量个数涨（本机探针：6 个输入张量每个请求 0.138 ms、1 个 0.088 ms，
benchmarks/README.md 的 CPU 一节）；H100 上 c=64 时引擎每次 execute 有 3.7 ms 花在交接上（第 6 台）。
原生后端（onnxruntime_onnx / tensorrt_plan）的 6 个输入是引擎本身的契约，那时不打包（triton_config.runtime_spec）。

布局：[行, 6 x L]，按 contract.inputs 的顺序各占 L 列；encoder_mask（float32，只取 0 / 1）存成 int64，拆回时转回 float32。
前处理另在最后加一列交出的时刻（[行, 6 x L + 1]，CLOCK_MONOTONIC 微秒，各行相同）：引擎据此量出请求在它前面排了多久
（runtime/shedding.py）。宽度是 6 的倍数时没有这一列（直接发给引擎的请求、旧的前处理）。
拆回之后照常整批校验（越界 id 到不了 GPU），所以打包不放松任何检查。只依赖 numpy（前处理进程不导入 torch）。
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import numpy as np

from algorithm.interfaces import ContractError, EngineContract

PACKED_INPUT = "encoder_packed"


def pack(feeds: Mapping[str, np.ndarray], contract: EngineContract, stamp_us: Optional[int] = None) -> np.ndarray:
    """{引擎输入名: [行, L]} -> [行, 6 x L] int64；给了 stamp_us 时再加一列时刻。"""
    cols = [np.asarray(feeds[s.name]).astype(np.int64, copy=False) for s in contract.inputs]
    if stamp_us is not None:
        cols.append(np.full((cols[0].shape[0], 1), stamp_us, np.int64))
    return np.concatenate(cols, axis=1)


def stamp(x: np.ndarray, contract: EngineContract) -> Optional[int]:
    """打包输入里前处理写下的时刻（微秒）；没有这一列时 None。"""
    if isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[0] and x.shape[1] % len(contract.inputs) == 1:
        return int(x[0, -1])
    return None


def unpack(x: np.ndarray, contract: EngineContract) -> Dict[str, np.ndarray]:
    """pack 的逆：[行, 6 x L(+1)] -> {引擎输入名: [行, L]}（整数输入是视图，mask 转回 float32；时刻列不在其中）。
    形状不对时 ContractError。"""
    k = len(contract.inputs)
    if (not isinstance(x, np.ndarray) or x.ndim != 2 or x.dtype != np.int64 or x.shape[1] < k
            or x.shape[1] % k not in (0, 1)):
        got = f"{x.dtype.name} {list(x.shape)}" if isinstance(x, np.ndarray) else type(x).__name__
        raise ContractError(f"{PACKED_INPUT}: 应为 int64 [batch, {k} x L]（按 {[s.name for s in contract.inputs]} "
                            f"的顺序拼接，可另加一列时刻），得到 {got}")
    n = x.shape[1] // k
    out = {}
    for j, spec in enumerate(contract.inputs):
        col = x[:, j * n:(j + 1) * n]
        out[spec.name] = col if np.dtype(spec.dtype) == np.int64 else col.astype(spec.dtype)
    return out


def seq_length(feeds: Mapping[str, np.ndarray], contract: EngineContract) -> int:
    """一个请求的引擎输入（打包的或 6 个）的历史长度 L。"""
    if PACKED_INPUT in feeds:
        return feeds[PACKED_INPUT].shape[1] // len(contract.inputs)
    return feeds["encoder_mask"].shape[1]


def warmup_bytes(contract: EngineContract, seq_len: int) -> bytes:
    """引擎预热样本的打包形式：id 全 0、mask 全 1（引擎拒绝没有有效位置的行）。"""
    feeds = {s.name: np.zeros((1, seq_len), np.int64) for s in contract.inputs}
    feeds["encoder_mask"] = np.ones((1, seq_len), np.float32)
    return pack(feeds, contract).tobytes()


__all__ = ["PACKED_INPUT", "pack", "seq_length", "stamp", "unpack", "warmup_bytes"]
