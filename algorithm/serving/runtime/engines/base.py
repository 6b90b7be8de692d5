"""运行器接口：EngineModel、门禁与离线吞吐只经这里的方法使用运行器。

必须实现的只有 compute（同步算完几组）；可选的能力（按代价合并长度组、拼行、不等 GPU 就返回的启动、各桶的计时）
都有默认实现，运行器按需覆盖。暂存区以 Staged 句柄交回运行器：运行器从句柄认出它属于哪张图、哪一套页锁定区。
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from algorithm.interfaces import EngineContract

Outputs = Tuple[np.ndarray, np.ndarray]
Timing = Dict[str, float]


class Staged:
    """一组请求的暂存区句柄。feeds：按契约输入名的 [B, L] 数组，给 batching.fill / rowpack.fill 写；
    slot：运行器自己的记号（例如 CUDA Graph 与那一套页锁定区），None = 没有对应的图、按 feeds 的形状运行。"""

    __slots__ = ("feeds", "slot")

    def __init__(self, feeds: Dict[str, np.ndarray], slot: Any = None):
        self.feeds, self.slot = feeds, slot

    @property
    def shape(self) -> Tuple[int, int]:
        """(行数, 宽)：运行时的实际形状（有图时是桶的形状，含填充）。"""
        return tuple(next(iter(self.feeds.values())).shape[:2])  # type: ignore[return-value]


class EngineRunner:
    """运行器的基类。子类给出 contract，实现 compute；其余方法是可选能力的默认实现。"""

    contract: EngineContract
    #: 拼行的程序（一次 execute 的全部历史拼成一组）：True 时 EngineModel 用 stage_packed，否则按长度分组用 staging
    packs_rows: bool = False

    def cost(self, rows: int, length: int) -> Optional[float]:
        """一组 [rows, length] 的代价（秒），给按长度分组时合并相邻组用；None = 不知道（不按代价合并）。"""
        return None

    def staging(self, rows: int, length: int) -> Staged:
        """一组请求的暂存区；默认新建零数组（填充处的 id 与 mask 为 0 都合法）。"""
        return Staged({s.name: np.zeros((rows, length), dtype=s.dtype) for s in self.contract.inputs})

    def stage_packed(self, batch) -> Tuple[Any, Staged]:
        """拼行的运行器：把整批写进一个暂存区，返回 (runtime.rowpack.RowPlan, 暂存区)。"""
        raise NotImplementedError(f"{type(self).__name__} 不是拼行的运行器（packs_rows=False）")

    def compute(self, staged: List[Staged]) -> Tuple[List[Outputs], Timing]:
        """同步算完各组：各组的 (recommendations [B, K, 3], scores [B, K]) 与计时（毫秒，键 device_ms 等）。"""
        raise NotImplementedError(f"{type(self).__name__} 没有实现 compute")

    def launch(self, staged: List[Staged]) -> Any:
        """启动各组、可以不等它们做完（流水线借此在 GPU 忙时准备下一批）；返回值交给 finish。默认同步算完。"""
        return self.compute(staged)

    def finish(self, pending: Any) -> Tuple[List[Outputs], Timing]:
        """等 launch 启动的那一次做完，取回各组输出与计时。"""
        return pending

    def run_many(self, staged: List[Staged]) -> Tuple[List[Outputs], Timing]:
        return self.finish(self.launch(staged))

    def run(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        """一批 [B, L]（门禁、离线吞吐、测试）：经服务时同一条暂存 / 启动路径。"""
        b, length = feeds["encoder_mask"].shape
        st = self.staging(b, length)
        for name in self.contract.input_names:
            st.feeds[name][:b, :length] = feeds[name]
        outs, _ = self.run_many([st])
        rec, scores = outs[0]
        return rec[:b], scores[:b]

    def bucket_seconds(self) -> Dict[str, float]:
        """各桶一次运行的实测时间（秒）；没有桶的运行器为空。"""
        return {}


__all__ = ["EngineRunner", "Outputs", "Staged", "Timing"]
