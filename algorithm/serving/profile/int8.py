"""int8 各节（throughput_int8_<方式>）：服务时量化（torchao）再编译的运行器的离线吞吐与门禁；编译失败时依次退到
eager + CUDA Graph、再退到 eager。门禁阈值与构建相同（GateConfig.int8_*）。"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from algorithm.serving.config import GateConfig
from algorithm.serving.profile.context import Context
from algorithm.serving.profile.hardware import PEAK_INT8_TOPS
from algorithm.serving.profile.kernels import kernel_runs
from algorithm.serving.profile.throughput import gates, make_runner, offline

INT8_GATE = {"overlap": GateConfig().int8_min_overlap, "top1": GateConfig().int8_min_top1_agreement}
Left = Callable[[], float]  # 预算还剩的秒数（Report.left）
RETRY_MIN_S = 30  # 前一种方式失败后，预算不到这么多秒就不再试下一种（GPU 上）
KERNELS_MIN_S = 15  # 内核表只在预算还够时做


def torchao_missing() -> Optional[str]:
    """torchao 不能导入时的原因（缺失或与 torch 版本不符），能导入时 None。"""
    try:
        import torchao  # noqa: F401
    except Exception as e:
        return f"torchao 不能导入：{type(e).__name__}: {e}"
    return None


def int8_base(ctx: Context) -> Tuple[str, str]:
    """int8 的底本 .pt2 与它的精度：与构建相同（engines/torch.int8_base_precision：GPU 上 bf16，因为 fp16 在 torchao
    缩放之前溢出）；仓库的 .pt2 精度不同时，由重建的 eager 模型按底本精度重新导出到临时目录（只导出一次）。"""
    from algorithm.serving.engines.torch import export_program, int8_base_precision

    want = ctx.args.int8_base if ctx.args.int8_base != "auto" else int8_base_precision(ctx.device.type)
    if ctx.meta["precision"] == want:
        return ctx.meta["engine_file"], want

    def export() -> str:
        # 门禁一批 64 条等：batch 上界放宽到 4096
        path = os.path.join(tempfile.mkdtemp(prefix="int8_base_"), f"{want}.pt2")
        return export_program(ctx.model, path, want, 4096, ctx.meta["max_seq_length"])
    return ctx.cached("int8_base", export), want


def ways(ctx: Context) -> List[Tuple[str, bool]]:
    """按顺序尝试的 (编译模式, CUDA Graph)：仓库的设置，编译失败时 eager（仍可 CUDA Graph），再不用图。"""
    graphs = ctx.meta["cuda_graphs"]
    out = [(ctx.compile_mode, graphs)]
    if ctx.compile_mode != "none":
        out.append(("none", graphs))
    if graphs and ctx.on_gpu:
        out.append(("none", False))
    return out


def _note(ctx: Context, qmode: str, base: str, mode: str) -> str:
    pad = "（CUDA 上把小行数补到 17：torch._int_mm 的限制）" if ctx.on_gpu and qmode == "dynamic" else ""
    return (f"服务时量化：{base} 底本的 .pt2 加载、移到 {ctx.device.type} 后 quantize_int8(mode={qmode!r}){pad}，"
            f"再 torch.compile（{mode}）。MFU 仍以 {ctx.peak_tflops:g} TFLOP/s 为分母（H100 int8 稠密峰值 "
            f"{PEAK_INT8_TOPS:g} TOPS）。")


@dataclass
class Int8Run:
    """一种量化方式的一节：底本、开始时间与已失败的尝试。"""
    qmode: str
    base_path: str
    base: str
    t0: float
    attempts: List[Dict[str, Any]] = field(default_factory=list)


def attempt(ctx: Context, rep_left: Left, run: Int8Run, mode: str, graphs: bool) -> Dict[str, Any]:
    """一种方式：量化的运行器、离线吞吐、门禁（与阈值比）、int8 矩阵乘各走了哪条路、最小 batch 的内核表。"""
    from algorithm.serving.runtime.engines.torch_int8 import INT_MM_PATHS, quantize_int8

    qmode, base = run.qmode, run.base
    paths_before = dict(INT_MM_PATHS)
    runner, how = make_runner(ctx, mode, graphs, lambda m: quantize_int8(m, qmode), path=run.base_path)
    on = graphs and ctx.on_gpu
    res = offline(ctx, runner, ctx.meta["seq_buckets"],
                  f"int8 {qmode}（{how}；compile {mode}，CUDA Graph {'开' if on else '关'}）", ctx.peak_tflops)
    res["gates"] = g = gates(ctx, runner)
    g["passed"] = bool(g["overlap"] >= INT8_GATE["overlap"] and g["top1_agreement"] >= INT8_GATE["top1"])
    g["thresholds"] = INT8_GATE
    res.update(attempts=run.attempts, seconds_incl_compile=time.time() - run.t0, peak_int8_tops=PEAK_INT8_TOPS,
               base=base, int8_mode=qmode, compile_mode=mode, cuda_graphs=bool(on),
               # dynamic 的 int8 矩阵乘各走了哪条路（预热、捕获与不用图时的调用；回退多说明没用上 int8 张量核）
               int_mm_paths={k: v - paths_before[k] for k, v in INT_MM_PATHS.items()})
    # 最小 batch 的内核表：与 kernels_compiled 的 fp16 表对照内核个数与时间（int8 慢在哪里）；预算不够就不做
    if rep_left() > KERNELS_MIN_S:
        try:
            res["kernels"] = kernel_runs(ctx, runner, [min(ctx.batches)])
        except Exception as e:  # noqa: BLE001
            res["kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    res["note"] = _note(ctx, qmode, base, mode)
    return res


def _record_failure(ctx: Context, run: Int8Run, mode: str, graphs: bool, e: Exception) -> None:
    attempts, qmode = run.attempts, run.qmode
    attempts.append({"compile_mode": mode, "cuda_graphs": graphs, "error": f"{type(e).__name__}: {str(e)[:500]}"})
    print(f"  int8 {qmode}（compile {mode}，graphs {graphs}）失败：{type(e).__name__}: {str(e)[:200]}", flush=True)
    if ctx.on_gpu:
        try:  # 捕获失败等错误之后上下文可能已坏：同步再失败也只记下，下一种方式照样试
            torch.cuda.synchronize()
        except Exception as e2:  # noqa: BLE001
            attempts[-1]["sync_error"] = f"{type(e2).__name__}: {str(e2)[:200]}"


def int8_section(ctx: Context, rep_left: Left, qmode: str) -> Dict[str, Any]:
    """依次尝试 ways()，第一个成功的给出数字（attempts 记下之前失败的）；都失败时抛出 RuntimeError。"""
    t0 = time.time()
    run = Int8Run(qmode, *int8_base(ctx), t0=t0)
    for mode, graphs in ways(ctx):
        if run.attempts and ctx.on_gpu and rep_left() < RETRY_MIN_S:
            run.attempts.append({"compile_mode": mode, "skipped": f"预算只剩 {rep_left():.0f}s"})
            continue
        try:
            return attempt(ctx, rep_left, run, mode, graphs)
        except Exception as e:
            _record_failure(ctx, run, mode, graphs, e)
    raise RuntimeError(f"int8 {qmode} 的所有方式都失败：{run.attempts}")
