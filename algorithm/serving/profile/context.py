"""各节共用的状态：命令行参数、仓库的事实、设备与计时，load 之后的模型，throughput 之后的运行器，以及算一次就复用的缓存。"""
from __future__ import annotations

import argparse
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from algorithm.serving.profile.data import Histories
from algorithm.serving.profile.hardware import PEAK_FP16_TFLOPS, PEAK_FP32_TFLOPS
from algorithm.serving.profile.repository import load_repository, runner_class
from algorithm.serving.profile.timing import Clock


@dataclass
class Context:
    args: argparse.Namespace
    meta: Dict[str, Any]  # repository.load_repository 的结果
    cfg: Any  # UGTConfig
    device: Any  # torch.device
    batches: List[int]
    repeats: int
    compile_mode: str
    clock: Clock
    runner_cls: type
    # load 一节之后
    gm: Any = None  # .pt2 的模块
    model: Any = None  # 由它的权重重建的 eager UGTModel
    dtype: Any = None
    packed: bool = False  # engine.pack_rows 的程序
    hist: Optional[Histories] = None
    # throughput 一节建的运行器（后面几节复用）
    runner: Any = None
    stage_ok: bool = False
    cache: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def create(cls, args: argparse.Namespace) -> "Context":
        import torch

        from algorithm.models.config import UGTConfig

        meta = load_repository(args.repo)
        device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type != "cuda":
            print("没有 CUDA：计时用 perf_counter（CUDA 事件、torch.cuda.synchronize、CUDA Graph 与 GPU 内核列表跳过）",
                  flush=True)
        batches = [int(b) for b in args.batches.split(",")] if args.batches else ([2, 4] if args.quick else [8, 16, 64])
        # --quick（CPU 检查）默认不编译：CPU 上 Inductor 编译 fp32 与 int8 各要 30-60 s；要测编译路径就显式给 --compile-mode
        compile_mode = args.compile_mode or ("none" if args.quick else meta["compile_mode"])
        return cls(args=args, meta=meta, cfg=UGTConfig.from_dict(dict(meta["model"])), device=device, batches=batches,
                   repeats=1 if args.quick else 3, compile_mode=compile_mode, clock=Clock(device),
                   runner_cls=runner_class(args.runner))

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    @property
    def quick(self) -> bool:
        return bool(self.args.quick)

    @property
    def peak_tflops(self) -> float:
        """MFU 的分母：GPU 上 fp16 稠密峰值，CPU 上（只检查代码）fp32 的。"""
        return PEAK_FP16_TFLOPS if self.on_gpu else PEAK_FP32_TFLOPS

    @property
    def graphs_on(self) -> bool:
        """仓库开着 CUDA Graph 且在 GPU 上。"""
        return bool(self.meta["cuda_graphs"] and self.on_gpu)

    def runner_params(self):
        """运行器构造函数接受的参数名（旧版运行器没有 transform 等参数）。"""
        return inspect.signature(self.runner_cls.__init__).parameters

    def attach_histories(self) -> None:
        m = self.meta
        self.hist = Histories(m["catalog"], m["length_median"], m["length_sigma"], m["max_seq_length"])

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """算一次、各节复用（长度分布、规划的桶、抽样的历史、门禁的参考输出……）。"""
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]
