"""运行器一次运行的内核表（kernels_compiled；int8 一节也用 kernel_runs），与几张 CUDA Graph 在不同流上同时重放的吞吐
（concurrency，只在 GPU 上）。两节都用 throughput 一节建的运行器。"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from algorithm.serving.profile.context import Context
from algorithm.serving.profile.data import to_device
from algorithm.serving.profile.markdown import KERNEL_NOTE

NOT_PACKED = "拼行的程序（engine.pack_rows）：这一节按 [B, L] 的 6 个输入直接调用编译函数，不适用"
NEEDS_CUDA = "要 CUDA：几张图在不同流上同时重放"
REPLAY_ROUNDS = 30


def top_ops(prof, n: int = 25, device: bool = True) -> List[Dict[str, Any]]:
    """profiler 里按自身时间排序的前 n 个内核（device=False 时是 CPU 算子）。"""
    rows = []
    for e in prof.key_averages():
        if device:
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
        else:
            t = e.self_cpu_time_total
        rows.append({"name": e.key, "ms": t / 1e3, "count": e.count})
    rows = [r for r in rows if r["ms"] > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def kernel_length(ctx: Context) -> int:
    """内核表与并发测量用的长度：有 128 的桶就用它，否则最小的桶。"""
    buckets = ctx.meta["seq_buckets"]
    return 128 if 128 in buckets else (buckets or [64])[0]


def kernel_run(ctx: Context, runner, b: int, length: int) -> Dict[str, Any]:
    """一个形状：运行器一次 run 的中位时间，与 profiler 里一次 run 的内核（GPU 上是一次 CUDA Graph 重放的内核）。"""
    feeds = ctx.hist.batch(b, length, seed=5)
    runner.run(feeds)
    walls = [ctx.clock.time(lambda: runner.run(feeds)) for _ in range(ctx.repeats)]
    acts = [torch.profiler.ProfilerActivity.CUDA if ctx.on_gpu else torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        runner.run(feeds)
        ctx.clock.sync()
    every = top_ops(prof, 10 ** 6, device=ctx.on_gpu)
    return {"shape": f"b{b}xL{length}", "device": ctx.device.type, "wall_ms": float(np.median(walls)) * 1e3,
            "busy_ms": sum(r["ms"] for r in every), "launches": sum(r["count"] for r in every), "top": every[:25]}


def kernel_runs(ctx: Context, runner, sizes: Sequence[int]) -> List[Dict[str, Any]]:
    length = kernel_length(ctx)
    return [kernel_run(ctx, runner, b, length) for b in sizes]


def kernels_compiled(ctx: Context) -> Dict[str, Any]:
    """最小与最大 batch 各一次：小 batch 的一次运行里多少是内核、多少是内核之间的空隙（内核个数 × 每个的最短时间），
    决定该去减内核数还是加大 batch。"""
    return {"runs": kernel_runs(ctx, ctx.runner, sorted({min(ctx.batches), max(ctx.batches)})), "note": KERNEL_NOTE}


def capture_graphs(ctx: Context, fn, feeds, n: int):
    """同一编译函数、同一形状的 n 张图，各有自己的静态输入、内存池与捕获流。返回 (图, 要活到重放结束的静态输入)。"""
    graphs, keep = [], []
    for _ in range(n):
        static = to_device(feeds, ctx.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), torch.no_grad():
            fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        # 各自的捕获流：cuBLAS 工作区按 (句柄, 流) 缓存，同一个捕获流上的图共用它，同时重放会互相踩（pytorch/pytorch#193402）
        with torch.cuda.graph(g, stream=torch.cuda.Stream()), torch.no_grad():
            fn(*static)
        # 静态输入要活到重放结束：释放后内存被别的张量复用，重放读到的 id 可能越界（设备端断言会毁掉整个 CUDA 上下文）
        keep.append(static)
        graphs.append(g)
    return graphs, keep


def replay_seconds(graphs, streams, rounds: int) -> float:
    """每条流重放自己的图 rounds 轮（各流同时），总秒数。"""
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(rounds):
        for g, st in zip(graphs, streams):
            with torch.cuda.stream(st):
                g.replay()
    torch.cuda.synchronize()
    return time.perf_counter() - t


def concurrency_row(ctx: Context, b: int, length: int) -> Dict[str, Any]:
    """batch b：1 / 2 / 4 条流同时重放的吞吐，与对 1 条流的倍数。"""
    graphs, keep = capture_graphs(ctx, ctx.runner.fn, ctx.hist.batch(b, length, seed=6), 4)
    streams = [torch.cuda.Stream() for _ in graphs]
    row: Dict[str, Any] = {"batch": b}
    for k in (1, 2, 4):
        sec = replay_seconds(graphs[:k], streams[:k], REPLAY_ROUNDS)
        row[f"k{k}_req_per_s"] = REPLAY_ROUNDS * k * b / sec
        row[f"k{k}_ms_per_round"] = sec / REPLAY_ROUNDS * 1e3
    row["speedup_k2"] = row["k2_req_per_s"] / row["k1_req_per_s"]
    row["speedup_k4"] = row["k4_req_per_s"] / row["k1_req_per_s"]
    del graphs, keep
    return row


def concurrency(ctx: Context) -> Dict[str, Any]:
    """一个进程里几张 CUDA Graph 同时在不同的流上重放：小 batch 时每个内核只有几微秒、占不满 SM。k 条流对 1 条流的倍数，
    就是“一个进程里同时跑几批”（解耦的引擎模型、或多实例 + MPS）最多能拿到多少。"""
    length = kernel_length(ctx)
    sizes = [b for b in ctx.batches if b <= 16] or [min(ctx.batches)]  # 服务时的小批
    return {"length": length, "rows": [concurrency_row(ctx, b, length) for b in sizes],
            "note": (f"同一编译函数、b x L{length}，每条流一张各自的图；k 条流各重放 {REPLAY_ROUNDS} 轮。"
                     "k=1 是现在一个实例的串行重放")}
