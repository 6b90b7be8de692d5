"""计时：GPU 上用 CUDA 事件（不打断异步执行），CPU 上用 perf_counter（同步执行，直接就是耗时）。"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, List, Optional, Tuple


class Clock:
    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    def time(self, fn) -> float:
        """fn() 一次的秒数。"""
        a = self.mark()
        fn()
        return self.seconds(a, self.mark())


class StageTimer:
    """with timer("名字"): ... —— 记录阶段的起止标记，并在 profiler 里打上同名区间；clock 为 None 时不计时。"""

    def __init__(self, clock: Optional[Clock]):
        self.clock = clock
        self.marks: List[Tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.clock is None:
            yield
            return
        import torch

        with torch.profiler.record_function(name):
            a = self.clock.mark()
            yield
            self.marks.append((name, a, self.clock.mark()))

    def seconds(self) -> Dict[str, float]:
        """阶段名 -> 秒数（同名的阶段相加）。"""
        out: Dict[str, float] = {}
        for name, a, b in self.marks:
            out[name] = out.get(name, 0.0) + self.clock.seconds(a, b)
        return out
