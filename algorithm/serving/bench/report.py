"""报告：JSON（全部数据）+ CSV（每个负载点一行）+ PNG（延迟分位数与 GPU 利用率 vs 吞吐）+ 终端摘要。"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List

from algorithm.serving.bench.stats import clock_note, foreign_processes_note
from algorithm.serving.bench.suite import engine_stats, strip_private
from algorithm.serving.bench.tail import PERCENTILES, fmt_spread


def all_points(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    pts = []
    for i, run in enumerate(report.get("runs", [])):
        for p in (list(run.get("closed_loop", [])) + list(run.get("open_loop", []))
                  + ([run["light"]] if run.get("light") else []) + list((run.get("sla") or {}).get("points", []))
                  + list((run.get("floor") or {}).values())):
            pts.append(p | {"repeat": i})
    return pts


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def write_report(report: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "benchmark.json"), "csv": os.path.join(out_dir, "benchmark.csv"),
             "png": os.path.join(out_dir, "benchmark.png")}
    clean = strip_private(report)
    with open(paths["json"], "w") as f:
        json.dump(clean, f, indent=2, ensure_ascii=False, default=float)
    points = all_points(clean)
    cols = ["repeat", "model", "mode", "offered_rate", "concurrency", "sent", "ok", "error_rate", "throughput", "p50",
            "p90", "p95", "p99", "p99.9", "p99_ci_low", "p99_ci_high", "lag_p99", "engine_avg_batch",
            "engine_queue_ms", "engine_compute_ms", "engine_compute_per_execute_ms", "exec_host_ms", "exec_device_ms",
            "exec_gpu_gap_ms", "gpu_util", "gpu_util_window_all", "gpu_sm_clock_mhz", "gpu_power_w", "gpu_sm_active",
            "gpu_tensor_active", "client_cpu_util_max"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for p in points:
            eng = engine_stats(p["server"]) or {}
            ex = p.get("engine_execute") or {}
            lat, ci = p["latency_ms"], p.get("p99_ci") or {}
            w.writerow([p["repeat"], p.get("model", ""), p["mode"], p.get("offered_rate", ""), p.get("concurrency", ""),
                        p["sent"], p["ok"], f"{p['error_rate']:.5f}", f"{p['throughput']:.2f}",
                        *[_fmt(lat[f"p{q:g}"]) for q in PERCENTILES], _fmt(ci.get("low")), _fmt(ci.get("high")),
                        _fmt((p.get("schedule_lag_ms") or {}).get("p99")), _fmt(eng.get("avg_batch")),
                        _fmt(eng.get("queue_ms")), _fmt(eng.get("compute_ms")),
                        _fmt(eng.get("compute_per_execute_ms")), _fmt(ex.get("host_ms")),
                        _fmt(ex.get("device_ms")), _fmt(ex.get("gpu_gap_ms")), _fmt(p["gpu"].get("util_mean")),
                        _fmt(p["gpu"].get("util_mean_all")),  # 含发压进程启动与收尾的整个窗口（2026-11-28 之前的定义）
                        _fmt(p["gpu"].get("sm_clock_mhz")), _fmt(p["gpu"].get("power_w")),
                        _fmt(p["gpu"].get("sm_active")), _fmt(p["gpu"].get("tensor_active")),
                        _fmt(max(p["client_cpu_util"]))])
    _plot(clean, points, paths["png"])
    return paths


def _plot(report: Dict[str, Any], points: List[Dict[str, Any]], path: str) -> None:
    try:
        import matplotlib
    except ImportError:  # GPU 机器上可能没有 matplotlib：只少一张图
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    main = [p for p in points if not p.get("model_label")]
    for mode, marker in (("open", "o"), ("closed", "s")):
        pts = sorted((p for p in main if p["mode"] == mode and p["latency_ms"]["p50"] is not None),
                     key=lambda p: p["throughput"])
        if not pts:
            continue
        x = [p["throughput"] for p in pts]
        for q in ("p50", "p99"):
            # 各次重复的点混在一起：只画点，不连线
            ax.plot(x, [p["latency_ms"][q] for p in pts], marker=marker, linestyle="none",
                    label=f"{mode} {q}", alpha=0.7)
    floor = [p for p in points if p.get("model_label") == "地板"]
    if floor:
        ax.plot([p["throughput"] for p in floor], [p["latency_ms"]["p99"] for p in floor], "kx", label="floor p99")
    slo = report.get("slo_ms")
    if slo:
        ax.axhline(slo, color="red", lw=1, alpha=0.6, label=f"SLO {slo:g} ms")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    gpu_pts = sorted((p for p in main if p["gpu"].get("util_mean") is not None), key=lambda p: p["throughput"])
    if gpu_pts:
        ax2 = ax.twinx()
        ax2.plot([p["throughput"] for p in gpu_pts], [p["gpu"]["util_mean"] for p in gpu_pts], "g^", alpha=0.5,
                 label="GPU util %")
        ax2.set_ylabel("GPU utilization (%)")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="upper center", fontsize=8)
    h = report.get("headline") or {}
    title = f"{report.get('model', '')}  {report.get('device', '')}"
    if (h.get("sla_rate") or {}).get("median"):
        title += f"\nmax rate with P99 <= {slo:g} ms (median of {h['repeats']}): {fmt_spread(h['sla_rate'])} req/s"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_table(report: Dict[str, Any]) -> str:
    """终端摘要：主要数字的中位数 [最小–最大]（重复 N 次）、闭环扫描、追踪的分解、离线吞吐。"""
    h = report.get("headline") or {}
    n = h.get("repeats", 1)
    lines = [f"主要数字（{n} 次重复：中位数 [最小–最大]）"]
    depth = (report.get("triton") or {}).get("engine_pipeline_depth", 1)
    piped = depth if depth and depth > 1 else 0
    if report.get("incomplete"):
        lines.append(f"  ！压测中断，只有完成的 {n} 次算进中位数：{report['incomplete']}")
    if report.get("server_crash"):
        lines.append(f"  ！tritonserver 的日志里有崩溃的痕迹：{'；'.join(report['server_crash'][:3])}")
    if report.get("trace_note"):
        lines.append(f"  {report['trace_note']}")
    for i, run in enumerate(report.get("runs") or []):
        note = foreign_processes_note(run.get("gpu_processes"))
        if note:
            lines.append(f"  ！第 {i + 1} 次重复开始时{note}")
    if report.get("mps"):
        m = report["mps"]
        lines.append(f"  CUDA MPS：{'开' if m.get('active') else '不开'}（{m.get('reason')}）")
    if report.get("shedding"):
        sh = report["shedding"]
        lines.append(f"  过载丢弃：{sh['rule']}" + ("" if sh.get("enabled") else f"（{sh.get('why')}）"))
    slo = report.get("slo_ms")
    rates = (h.get("sla_rate") or {}).get("values") or []
    missing = sum(v is None for v in rates)
    lines.append(f"  SLA：P99（95% 置信上界）<= {slo:g} ms 的最高速率（已独立重测确认）：{fmt_spread(h.get('sla_rate'))} req/s"
                 + (f"（{len(rates)} 次中 {missing} 次没有达标的速率，中位数只取其余的）" if missing else ""))
    lines.append(f"       该点 P99 {fmt_spread(h.get('sla_p99_ms'))} ms（上界 {fmt_spread(h.get('sla_p99_ci_high_ms'))}），"
                 f"P50 {fmt_spread(h.get('sla_p50_ms'))} ms，GPU {fmt_spread(h.get('sla_gpu_util'))} %，"
                 f"平均 batch {fmt_spread(h.get('sla_avg_batch'), 2)}"
                 + (f"，忙时 SM {fmt_spread(h['sla_gpu_sm_clock_mhz'], 0)} MHz、{fmt_spread(h.get('sla_gpu_power_w'), 0)} W"
                    if (h.get("sla_gpu_sm_clock_mhz") or {}).get("median") is not None else "")
                 + (f"，SM 活跃 {fmt_spread(h['sla_gpu_sm_active'])} %、张量核 {fmt_spread(h.get('sla_gpu_tensor_active'))} %（GPM）"
                    if (h.get("sla_gpu_sm_active") or {}).get("median") is not None else ""))
    if (h.get("sla_engine_execute_ms") or {}).get("median") is not None:
        lines.append(f"       引擎每次 execute：{fmt_spread(h.get('sla_engine_requests_per_execute'))} 个请求、"
                     f"{fmt_spread(h.get('sla_engine_launches_per_execute'))} 次启动；Python 启动前 "
                     f"{fmt_spread(h.get('sla_engine_host_ms'), 2)} ms，运行 {fmt_spread(h.get('sla_engine_device_ms'), 2)} ms（GPU 上为 CUDA 事件），"
                     f"回拷 {fmt_spread(h.get('sla_engine_copy_back_ms'), 2)} ms，整个 execute "
                     f"{fmt_spread(h.get('sla_engine_execute_ms'), 2)} ms，填充占 "
                     f"{fmt_spread(h.get('sla_engine_padding_share'), 2)}；每批开始前这个实例的 GPU 空了 "
                     f"{fmt_spread(h.get('sla_engine_gpu_gap_ms'), 2)} ms")
        if piped:
            lines.append(f"       引擎流水线（triton.engine_pipeline_depth={piped}）：Triton 记的 execute 到启动为止、引擎自己量的"
                         "从启动到回答，“execute 之外”的拆分不适用；上面的 execute 是从启动到回答的墙钟时间")
        elif (h.get("sla_engine_outside_execute_ms") or {}).get("median") is not None:
            lines.append(f"       Triton 记的每次 execute {fmt_spread(h.get('sla_engine_triton_execute_ms'), 2)} ms，其中在 execute 之外 "
                         f"{fmt_spread(h.get('sla_engine_outside_execute_ms'), 2)} ms（python backend 交接输入与响应）")
    if (h.get("light_p50_ms") or {}).get("median") is not None:
        lines.append(f"  轻负载 {report.get('benchmark', {}).get('light_rate')}/s：P50 {fmt_spread(h['light_p50_ms'])} ms，"
                     f"P99 {fmt_spread(h['light_p99_ms'])} ms，P99/P50 {fmt_spread(h['light_p99_over_p50'], 2)}")
    if (h.get("floor_sla_rate_p99_ms") or {}).get("median") is not None or \
            (h.get("floor_light_p99_ms") or {}).get("median") is not None:
        lines.append(f"  地板（ugt_floor：同 I/O、不计算）：轻负载 P50 {fmt_spread(h.get('floor_light_p50_ms'))} / "
                     f"P99 {fmt_spread(h.get('floor_light_p99_ms'))} ms；SLA 速率下 P50 "
                     f"{fmt_spread(h.get('floor_sla_rate_p50_ms'))} / P99 {fmt_spread(h.get('floor_sla_rate_p99_ms'))} ms")
    if h.get("closed_loop"):
        lines.append("  闭环：并发  吞吐/s（成功的）       P99 ms               GPU %            平均 batch         失败 %"
                     "              引擎 execute 之外 ms")
        for c, v in h["closed_loop"].items():
            lines.append(f"        c={c:<4} {fmt_spread(v['throughput']):<22} {fmt_spread(v['p99_ms']):<20} "
                         f"{fmt_spread(v['gpu_util']):<16} {fmt_spread(v['avg_batch'], 2):<18} "
                         f"{fmt_spread(v.get('error_rate'), 2, scale=100):<18} "
                         f"{'不适用（流水线）' if piped else fmt_spread(v.get('engine_outside_execute_ms'), 2)}")
    for i, run in enumerate(report.get("runs", [])):
        sla = run.get("sla") or {}
        if not sla.get("max_rate"):
            lines.append(f"  第 {i + 1} 次：SLA {sla.get('note', '-')}")
    from algorithm.serving.bench.trace import format_breakdown

    for key, title in (("light_trace", "轻负载点"), ("trace", "SLA 速率上")):
        traces = [run.get(key) for run in report.get("runs", []) if run.get(key)]
        if traces:  # 最后一次重复的
            lines.append(f"  {title}的" + format_breakdown(traces[-1]).lstrip())
    pa = report.get("perf_analyzer") or {}
    for r in pa.get("points", []):
        lines.append(f"  perf_analyzer c={r['concurrency']}: " + (
            f"吞吐 {r['throughput']:.1f}/s p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms" if "throughput" in r
            else "失败：" + (r["error"].splitlines() or [""])[-1][:120]))
    if pa and not pa.get("available"):
        lines.append(f"  perf_analyzer：{pa.get('reason')}")
    sk = report.get("soak")
    if sk:
        lines.append(f"  浸泡 {sk['rate']:.0f}/s x {sk['duration_s']:.0f} s（{len(sk['windows'])} 窗）：{sk['sent']} 个请求，错误 "
                     f"{sk['errors']}；每窗 P99 " + " ".join(f"{w['p99_ms']:.1f}" for w in sk["windows"] if w["p99_ms"])
                     + f" ms（最大/中位 {_fmt(sk['p99_max_over_median'])}，界 {sk['bounds']['p99_max_over_median']}）；"
                     f"RSS 增长 {_fmt(sk['rss_growth_mb'])} MiB（界 {sk['bounds']['rss_growth_mb']:g}），显存增长 "
                     f"{_fmt(sk['gpu_mem_growth_mb'])} MiB（界 {sk['bounds']['gpu_mem_growth_mb']:g}）："
                     + ("通过" if sk["passed"] else f"未通过 {sk['checks']}"))
        tw = [w for w in sk["windows"] if (w.get("trace") or {}).get("traced")]
        if tw:  # 最慢的窗里最慢的一个被追踪请求：停在哪几步
            w = max(tw, key=lambda x: x["trace"]["slowest_request"]["latency"])
            r = w["trace"]["slowest_request"]
            top = sorted(((k, v) for k, v in r.items() if k != "latency"), key=lambda kv: -kv[1])[:3]
            lines.append(f"       追踪（每 {w['trace']['trace_rate']} 个一个）：最慢的被追踪请求在第 {w['window']} 窗，"
                         f"{r['latency']:.1f} ms = " + "、".join(f"{k} {v:.1f}" for k, v in top) + " ms ……")
    ov = report.get("overload")
    if ov:
        acc, ref = ov["accepted_ms"], ov["refused_ms"]
        lines.append(f"  过载 {ov['rate']:.0f}/s x {ov['duration_s']:.0f} s：被拒 {ov['refused_share']:.1%}（P50 "
                     f"{_fmt(ref['p50'])} ms），接受 {ov['throughput']:.0f}/s，P99 {_fmt(acc['p99'])} / 最大 {_fmt(acc['max'])} ms，"
                     f">= {ov['steps_over_ms']:g} ms 的 {ov['accepted_over_step']} 个"
                     + (f"（{ov['step_episodes']} 次停顿）" if ov.get("step_episodes") else "") + "："
                     + ("通过" if ov["passed"] else f"未通过 {ov['checks']}"))
    off = report.get("offline_engine") or {}
    mixed = {k: v for k, v in off.items() if k.isdigit()}
    if off.get("error"):
        lines.append(f"  引擎离线吞吐：没有测到（{off['error']}）")
    if mixed:
        note = clock_note(off.get("gpu") or {})
        lines.append("  引擎离线吞吐（同一个 EngineModel，混合长度，与服务同一条路径）：" + "，".join(
            f"b{k} {v['throughput']:.0f}/s" for k, v in mixed.items()) + (f"（{note}）" if note else ""))
        grouped = {k: v for k, v in (off.get("grouped") or {}).items() if k.isdigit()}
        if grouped:
            lines.append("  引擎离线吞吐（每批同一长度组，按占比加权，旧定义）：" + "，".join(
                f"b{k} {v['throughput']:.0f}/s" for k, v in grouped.items()))
        piped = {k: v for k, v in (off.get("pipelined") or {}).items() if k.isdigit()}
        if piped:
            lines.append("  引擎离线吞吐（同样的混合长度批，两批同时在途，像 engine_pipeline_depth=2）：" + "，".join(
                f"b{k} {v['throughput']:.0f}/s" for k, v in piped.items()))
    return "\n".join(lines)
