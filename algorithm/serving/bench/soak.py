"""浸泡与过载：长时间的稳定负载下每一窗的 P99 是否稳定、内存是否增长；过载时多出的请求是否被快速拒绝、
被接受的请求延迟是否仍受约束。

浸泡按窗（默认 60 s）连续发送：每窗是一次开环测量（新的发压进程，窗与窗之间有发压进程启动的约 1-2 s 间隙，
报告写明每窗的起止时刻）。每窗结束时读一次服务器（tritonserver 与全部存根）的 RSS 与 GPU 已用显存（NVML）。
增长按“第 1 窗结束 -> 最后一窗结束”计：第 1 窗里分配器与缓存的预热不算泄漏。
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable, Dict, List, Optional

import numpy as np

# 判定的界（报告里写明）：RSS 与显存的增长、每窗 P99 的稳定性（最大窗 / 各窗中位数）
RSS_GROWTH_BOUND_MB = 256.0
GPU_MEM_GROWTH_BOUND_MB = 64.0
P99_STABILITY_BOUND = 1.5
# 过载：被接受请求的 P99 不超过目标的这么多倍；被拒请求的中位耗时不超过目标（被拒得快）；
# 被接受请求里不应有 Triton 那种约 500 ms 的台阶（见 triton_config._set_batching）
OVERLOAD_P99_FACTOR = 2.0
STEP_MS = 400.0
# 同一次停顿耽误的请求在批处理器醒来后几乎同时完成：完成时刻相距不到这么多秒的算同一次停顿
STEP_EPISODE_GAP_S = 0.2


def step_episodes(done_s) -> int:
    """>= STEP_MS 的被接受请求按完成时刻（秒）聚成几次停顿。区分“一次偶发的停顿”（Triton r24.10 批处理器丢失一次唤醒，
    tests/serving/test_reliability.py）与“每次队列满都停”（以前 max_queue_size 的做法：很多次，吞吐也塌）。"""
    t = np.sort(np.asarray(done_s, dtype=float))
    return 0 if t.size == 0 else 1 + int(np.sum(np.diff(t) > STEP_EPISODE_GAP_S))


def process_tree_rss_mb(pid: int) -> Optional[float]:
    """pid 与它全部子进程（python backend 的存根）的 RSS 之和，MiB；读不到时 None。"""
    try:
        import psutil

        root = psutil.Process(pid)
        return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]) / 2 ** 20
    except Exception:  # noqa: BLE001  进程已退出或没有 psutil
        return None


def gpu_memory_used_mb(sampler) -> Optional[float]:
    """各 GPU 已用显存之和（NVML），MiB；没有 NVML / GPU 时 None。"""
    if not getattr(sampler, "handles", None):
        return None
    try:
        return sum(sampler.nvml.nvmlDeviceGetMemoryInfo(h).used for h in sampler.handles) / 2 ** 20
    except Exception:  # noqa: BLE001
        return None


def _growth(values: List[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return vals[-1] - vals[0] if len(vals) >= 2 else None


def soak(bench, rate: float, duration_s: float, window_s: float, rss_fn: Optional[Callable[[], Optional[float]]] = None,
         log: Callable[[str], None] = print, tracer=None, trace_rate: int = 0) -> Dict[str, Any]:
    """rate req/s 的开环负载 duration_s 秒，分成 window_s 秒的窗；返回每窗的数字与判定。

    tracer 与 trace_rate > 0 时每窗开着 Triton 追踪（每 trace_rate 个请求一个），每窗记下最慢 1% 与最慢一个被追踪请求的分解。"""
    traced = tracer is not None and trace_rate > 0
    n = max(1, math.ceil(duration_s / window_s))
    windows: List[Dict[str, Any]] = []
    t_start = time.monotonic()
    for i in range(n):
        t0 = time.monotonic() - t_start
        hook = (lambda: tracer.session(trace_rate)) if traced else None
        p = bench.open_loop(rate, duration_s=window_s, label=f"浸泡 {i + 1}/{n}", hook=hook)
        w = {"window": i + 1, "start_s": t0, "end_s": time.monotonic() - t_start, "sent": p["sent"], "ok": p["ok"],
             "errors": p["errors"], "throughput": p["throughput"], "p50_ms": p["latency_ms"]["p50"],
             "p99_ms": p["latency_ms"]["p99"], "p99_ci": p["p99_ci"], "max_ms": p["latency_ms"]["max"],
             "gpu_util": p["gpu"].get("util_mean"), "rss_mb": rss_fn() if rss_fn else None,
             "gpu_mem_mb": gpu_memory_used_mb(bench.gpu)}
        if traced:
            w["trace"] = tracer.breakdown(p, trace_rate)
        windows.append(w)
        log(f"浸泡 窗 {i + 1}/{n}：P99 {w['p99_ms']:.1f} ms，错误 {sum(w['errors'].values())}，"
            f"RSS {w['rss_mb'] or float('nan'):.0f} MiB，显存 {w['gpu_mem_mb'] or float('nan'):.0f} MiB")
    p99s = [w["p99_ms"] for w in windows if w["p99_ms"] is not None]
    errors = sum(sum(w["errors"].values()) for w in windows)
    rss_growth = _growth([w["rss_mb"] for w in windows])
    gpu_growth = _growth([w["gpu_mem_mb"] for w in windows])
    stability = max(p99s) / float(np.median(p99s)) if p99s else None
    checks = {
        "zero_errors": errors == 0,
        "rss_growth": None if rss_growth is None else rss_growth <= RSS_GROWTH_BOUND_MB,
        "gpu_mem_growth": None if gpu_growth is None else gpu_growth <= GPU_MEM_GROWTH_BOUND_MB,
        "p99_stable": None if stability is None else stability <= P99_STABILITY_BOUND,
    }
    return {"rate": rate, "duration_s": duration_s, "window_s": window_s, "windows": windows,
            "sent": sum(w["sent"] for w in windows), "errors": errors,
            "p99_median_ms": float(np.median(p99s)) if p99s else None, "p99_max_ms": max(p99s) if p99s else None,
            "p99_max_over_median": stability, "rss_growth_mb": rss_growth, "gpu_mem_growth_mb": gpu_growth,
            "bounds": {"rss_growth_mb": RSS_GROWTH_BOUND_MB, "gpu_mem_growth_mb": GPU_MEM_GROWTH_BOUND_MB,
                       "p99_max_over_median": P99_STABILITY_BOUND},
            "checks": checks, "passed": all(v is not False for v in checks.values())}


def overload(bench, rate: float, duration_s: float, slo_ms: float, log: Callable[[str], None] = print) -> Dict[str, Any]:
    """rate req/s（通常是 SLA 速率的 2 倍）的开环负载 duration_s 秒：多出的请求应被拒（UNAVAILABLE），
    被拒得快（中位耗时不超过目标），被接受请求的 P99 不超过目标的 OVERLOAD_P99_FACTOR 倍，没有约 500 ms 的台阶。"""
    p = bench.open_loop(rate, duration_s=duration_s, label="过载")
    lat, failed = p["latency_ms"], p["failed_latency_ms"]
    other = {k: v for k, v in p["errors"].items() if k not in ("UNAVAILABLE", "503")}
    out = {"rate": rate, "duration_s": duration_s, "sent": p["sent"], "ok": p["ok"], "throughput": p["throughput"],
           "refused_share": p["refused_share"], "errors": p["errors"], "accepted_ms": lat,
           "accepted_p99_ci": p["p99_ci"], "refused_ms": failed, "gpu_util": p["gpu"].get("util_mean"),
           "steps_over_ms": STEP_MS, "slo_ms": slo_ms}
    # 被接受请求里 >= STEP_MS 的个数与停顿次数（分位数看不出几个台阶）：从客户端的原始时间戳算
    done = np.concatenate([r["done"] for r in p["_client"]["results"]])
    accepted = (done - np.concatenate([r["intended"] for r in p["_client"]["results"]])) * 1000
    over = ~np.isnan(accepted) & (accepted >= STEP_MS)
    out["accepted_over_step"] = int(np.sum(over))
    out["step_episodes"] = step_episodes(done[over])
    checks = {
        "only_refusals": not other,
        "accepted_p99": lat["p99"] is not None and lat["p99"] <= OVERLOAD_P99_FACTOR * slo_ms,
        "refused_fast": failed["p50"] is None or failed["p50"] <= slo_ms,
        "no_500ms_steps": out["accepted_over_step"] == 0,
    }
    out |= {"checks": checks, "passed": all(checks.values()),
            "bounds": {"accepted_p99_ms": OVERLOAD_P99_FACTOR * slo_ms, "refused_p50_ms": slo_ms, "step_ms": STEP_MS}}
    log(f"过载 {rate:.0f}/s：接受 {p['ok']}（{p['throughput']:.0f}/s），被拒 {p['refused_share']:.1%}；"
        f"接受的 P99/最大 {lat['p99'] or float('nan'):.1f}/{lat['max'] or float('nan'):.1f} ms；"
        f"被拒的 P50 {failed['p50'] or float('nan'):.1f} ms；{'通过' if out['passed'] else '未通过'} {checks}")
    return out
