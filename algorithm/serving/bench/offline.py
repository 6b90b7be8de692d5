"""引擎离线吞吐：在本进程里直接运行仓库中的引擎（与服务同一个 EngineModel：同样的校验、分组、暂存与启动），
请求按配置的长度分布抽样；某 batch 的吞吐 = b / 一次 execute（b 个请求）的中位时间。另有两批同时在途（流水线）的
吞吐（pipelined）与每批同一长度组的旧定义（grouped）。
与服务吞吐之比就是服务开销；“服务中的一批”的 GPU 时间（自定义指标）可以与这里同 batch 的时间对照。"""
from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Sequence

import numpy as np

from algorithm.serving.config import BenchmarkConfig
from algorithm.serving.runtime.packed import seq_length
from algorithm.serving.workload import make_histories


def grouped_seconds(groups: Dict[int, list], b: int, repeats: int, run: Callable[[list], Any],
                    prepare: Callable[[list], Any] = lambda x: x) -> Dict[int, float]:
    """每个长度组轮转取 b 个、运行 repeats + 1 次（第一次是预热：惰性编译 / 捕获 CUDA Graph），返回各组一次运行的
    中位秒数。prepare（例如把历史编码成输入）在计时之外。这里与引擎剖析（profile/throughput.py）的离线吞吐共用。"""
    per: Dict[int, float] = {}
    for k, items in sorted(groups.items()):
        times = []
        for r in range(repeats + 1):
            batch = prepare([items[(r * b + i) % len(items)] for i in range(b)])
            t0 = time.perf_counter()
            run(batch)
            if r:
                times.append(time.perf_counter() - t0)
        per[k] = float(np.median(times))
    return per


def _grouped(eng, feeds, batch_sizes, repeats: int) -> Dict[str, Any]:
    """旧定义（2026-11-24 的 H100 数字用它）：每次 execute 的 b 个请求都来自同一长度组，
    吞吐 = b / sum_k(p_k * t_k(b))，p_k 为长度组 k 的占比。它是引擎在理想分组下的上限。"""
    from algorithm.serving.runtime.buckets import length_class

    limit = eng.contract.max_seq_length
    groups: Dict[int, list] = {}
    for f in feeds:
        groups.setdefault(length_class(seq_length(f, eng.contract), eng.seq_buckets, limit), []).append(f)
    share = {k: len(v) / len(feeds) for k, v in groups.items()}
    out: Dict[str, Any] = {"length_share": {str(k): v for k, v in sorted(share.items())}}
    for b in batch_sizes:
        per = grouped_seconds(groups, b, repeats, eng.execute)
        sec = sum(share[k] * t for k, t in per.items())
        out[str(b)] = {"batch": b, "seconds_weighted": sec, "throughput": float(b / sec),
                       "seconds_by_length": {str(k): t for k, t in per.items()}}
    return out


def pipelined(eng, feeds, batch_sizes, repeats: int, depth: int = 2) -> Dict[str, Any]:
    """同样的混合长度批，但像 triton.engine_pipeline_depth=2 那样让两批同时在途：第 k+1 批 submit（校验、暂存、启动）
    在第 k 批 complete（等 GPU、拆结果）之前。吞吐 = 总请求数 / 总时间。与上面逐批等完的数字之比就是进程内能从
    主机与 GPU 重叠里拿到的上限（不含 Triton 的交接）；CPU 上 launch 就算完了，两者应相同。"""
    out: Dict[str, Any] = {"depth": depth}
    for b in batch_sizes:
        n = max(4 * repeats, 4)
        batches = [_take(feeds, r, b) for r in range(n + 1)]
        _check(eng.execute(batches[0]))  # 预热
        inflight = []
        t0 = time.perf_counter()
        for batch in batches[1:]:
            if len(inflight) == depth:
                _check(eng.complete(inflight.pop(0)))
            inflight.append(eng.submit(batch))
        for t in inflight:
            _check(eng.complete(t))
        sec = time.perf_counter() - t0
        out[str(b)] = {"batch": b, "seconds_per_batch": sec / n, "throughput": float(b * n / sec)}
    return out


def _take(feeds, r: int, b: int) -> list:
    """第 r 批的 b 个请求：按顺序轮着取，各批内容不同、跨次运行相同。"""
    return [feeds[(r * b + i) % len(feeds)] for i in range(b)]


def _check(results) -> None:
    bad = [x for x in results if isinstance(x, Exception)]
    if bad:
        raise bad[0]


def offline_engine_throughput(repository: str, batch_sizes: Sequence[int], cfg: BenchmarkConfig,
                              max_seq_length: int, repeats: int = 5, samples: int = 2000) -> Dict[str, Any]:
    from algorithm.serving.pipeline import InProcessPipeline

    pipe = InProcessPipeline(repository, lanes=2)  # 两套暂存区：pipelined 一节让两批同时在途
    catalog = os.path.join(repository, "ugt_preprocess", "1", "catalog.npz")
    histories = make_histories(catalog, cfg, samples, max_seq_length, cfg.seed + 99)
    feeds = [f for f in pipe.pre.execute([{"history_item_ids": h.reshape(1, -1)} for h in histories])]
    for f in feeds:
        f.pop("num_unknown_items", None)
    eng = pipe.engine
    out: Dict[str, Any] = {}
    for b in batch_sizes:
        times, stats = [], []
        for r in range(repeats + 1):
            picked = _take(feeds, r, b)
            t0 = time.perf_counter()
            res = eng.execute(picked)
            dt = time.perf_counter() - t0
            _check(res)
            if r:  # 第一次是预热
                times.append(dt)
                stats.append(dict(eng.stats.last))
        sec = float(np.median(times))
        out[str(b)] = {"batch": b, "seconds": sec, "throughput": float(b / sec),
                       "device_ms": float(np.median([s.get("device_ms", 0.0) for s in stats])),
                       "host_ms": float(np.median([s.get("host_ms", 0.0) for s in stats])),
                       "launches": float(np.median([s.get("groups", 0) for s in stats]))}
    out["grouped"] = _grouped(eng, feeds, batch_sizes, repeats)
    out["pipelined"] = pipelined(eng, feeds, batch_sizes, repeats)
    bucket_seconds = eng.runner.bucket_seconds()
    if bucket_seconds:  # 有桶的运行器（torch 的 CUDA Graph）
        out["bucket_seconds"] = bucket_seconds
    return out
