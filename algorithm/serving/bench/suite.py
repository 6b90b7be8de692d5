"""负载点、SLA 搜索与整套压测（可重复 N 次，报告每个主要数字的中位数与范围）。

每个负载点：吞吐、p50/p90/p95/p99/p99.9、P99 的 95% 置信区间（次序统计量，bench/tail.py）、按类型的错误与
被拒比例、同一时间窗里 Triton 统计 API 的各模型排队/计算时间与平均 batch、引擎运行器的每次 execute 计时
（自定义指标）、NVML 的 GPU 利用率、发压进程的 CPU 占用。

SLA 判定（meets）：P99 的 95% 置信区间上界 <= 目标、错误率达标、吞吐跟上了到达率。上界不存在（样本太少）
时不算达标——宁可报低，不报一个靠两三个请求撑着的速率。找到的速率再用新的随机种子独立重测一次确认；
确认不过就降 10% 再确认（最多 3 次）。
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time
from dataclasses import asdict
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from algorithm.errors import ConfigError, StalledError
from algorithm.serving.bench import loadgen
from algorithm.serving.bench.stats import EngineMetricsScraper, GpuSampler, ServerStats, gpu_processes
from algorithm.serving.bench.tail import min_samples_for_upper_bound, percentiles, quantile_ci
from algorithm.serving.config import BenchmarkConfig

log = logging.getLogger(__name__)


def engine_stats(server: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return server.get("ugt_engine") or next(iter(server.values()), None)


def outside_execute_ms(p: Dict[str, Any]) -> Optional[float]:
    """Triton 记的引擎每次 execute（compute_per_execute_ms）减去引擎自己量的整个 execute：python backend 把输入交给存根、
    把响应交回的时间（H100 上 c=64、每次 15 个请求时约 3.7 ms，占引擎实例时间的四分之一）。缺哪个就是 None。
    引擎流水线（triton.engine_pipeline_depth > 1）时两者量的不是同一段（Triton 的到启动为止），报告里写明不适用。"""
    triton = (engine_stats(p.get("server") or {}) or {}).get("compute_per_execute_ms")
    ours = (p.get("engine_execute") or {}).get("execute_ms")
    return None if triton is None or ours is None else triton - ours


def format_point(p: Dict[str, Any]) -> str:
    lat = p["latency_ms"]
    what = f"开环 {p['offered_rate']:.1f}/s" if p["mode"] == "open" else f"闭环 并发 {p['concurrency']}"
    if p.get("model_label"):
        what = f"[{p['model_label']}] " + what
    eng = engine_stats(p["server"]) or {}
    gpu = p["gpu"].get("util_mean")
    ci = p.get("p99_ci") or {}
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{what:<22} 吞吐 {p['throughput']:8.1f}/s  p50 {fmt(lat['p50'])}  p99 {fmt(lat['p99'])} "
            f"[{fmt(ci.get('low'))}, {fmt(ci.get('high'))}]  n {p['ok']}  错误 {p['error_rate']:.2%}  "
            f"batch {fmt(eng.get('avg_batch'))}  GPU {fmt(gpu)}%")


class Benchmark:
    """对一个运行中的 Triton 做压测。catalog_path 为构建好的仓库里的目录文件。"""

    def __init__(self, url: str, model_name: str, cfg: BenchmarkConfig, catalog_path: str,
                 max_seq_length: int, contract_kwargs: Optional[Dict[str, Any]] = None,
                 progress: bool = True, metrics_url: Optional[str] = None, kind: str = "ensemble"):
        if not os.path.isfile(catalog_path):
            raise ConfigError(f"目录文件不存在：{catalog_path}（先运行 scripts/build.py，或给出 catalog 路径）")
        self.url, self.model, self.cfg = url, model_name, cfg
        self.kind = kind  # ensemble / floor（原始历史）| engine（六个输入）
        self.catalog_path = catalog_path
        self.max_seq_length = max_seq_length
        self.contract_kwargs = contract_kwargs or {"max_seq_length": max_seq_length}
        self.progress = progress
        self.stats = ServerStats(url, cfg.protocol)
        self.engine_metrics = EngineMetricsScraper(metrics_url)
        self.gpu = GpuSampler()
        self._seed = cfg.seed
        self.on_point: Optional[Callable[[Dict[str, Any]], None]] = None
        # 本次测量自己的进程号（内嵌服务器的进程树与 MPS 服务器）：每次重复开始时的 GPU 进程快照据此区分别人的进程；
        # None = 压已在运行的服务器（benchmark.url），分不出哪些是它的
        self.own_pids: Optional[Callable[[], set]] = None
        # 直接压引擎时按服务器上引擎的输入决定发 6 个张量还是打包的 1 个（runtime/packed.py）
        self.packed_inputs = kind == "engine" and loadgen.engine_takes_packed_input(url, model_name, cfg.protocol)

    def _request_spec(self, count: int, kind: Optional[str] = None) -> Dict[str, Any]:
        self._seed += 1
        return {"benchmark": asdict(self.cfg), "catalog": self.catalog_path, "count": count,
                "max_seq_length": self.max_seq_length, "seed": self._seed, "contract": self.contract_kwargs,
                "kind": kind or self.kind, "packed": self.packed_inputs}

    # 一个负载点的限时 = 计划时长 + 单个请求的超时 + 这个余量（生成请求、起进程）。超过就报 StalledError：
    # 服务器不再回答或某个发压进程死掉时 multiprocessing.Pool.map 会永远等下去（2026-11-28 第 3 台 H100 上一个 SLA 确认点
    # 停了 14 分钟，之前的重复都没有写进报告；后来在 H200 上查明是 Triton 2.51 开着追踪时崩溃，见 trace.SAFE_TRACE_VERSION）
    STALL_MARGIN_S = 120.0

    def deadline_s(self, specs: List[Dict[str, Any]]) -> float:
        planned = max((s["offsets"][-1] if s.get("offsets") else s.get("duration_s", 0.0)) for s in specs)
        return float(planned) + self.cfg.timeout_s + self.STALL_MARGIN_S

    def _run_workers(self, specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        limit = self.deadline_s(specs)
        specs = [s | {"deadline_s": limit} for s in specs]
        if len(specs) == 1:
            return [loadgen.worker(specs[0])]
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(len(specs))
        with ctx.Pool(len(specs), initializer=loadgen.init_worker, initargs=(barrier,)) as pool:
            try:  # 工作进程自己也按 deadline_s 限时；这里多等 60 s（进程启动、导入），再不回来就是进程死了或卡住
                return pool.map_async(loadgen.worker, specs).get(timeout=limit + 60.0)
            except mp.TimeoutError:
                raise StalledError(f"{len(specs)} 个发压进程 {limit + 60.0:.0f} s 内没有全部返回"
                                   "（某个进程崩溃或卡住）") from None

    def server_state(self, timeout_s: float = 5.0) -> str:
        """卡住时服务器的状态（一句话，写进错误与报告）：统计接口在 timeout_s 内回答了没有。"""
        t0 = time.monotonic()
        try:
            ServerStats(self.url, self.cfg.protocol, timeout_s=timeout_s).snapshot()
        except Exception as e:  # noqa: BLE001  这里只描述状态
            return f"服务器的统计接口 {timeout_s:.0f} s 内没有回答（{type(e).__name__}: {str(e)[:200]}）：服务器可能卡住了"
        return f"服务器的统计接口 {time.monotonic() - t0:.2f} s 内回答了：服务器还活着"

    def warmup(self) -> None:
        if self.cfg.warmup_requests:
            self.closed_loop(min(4, self.cfg.warmup_requests), duration_s=60.0, count=self.cfg.warmup_requests,
                             record=False)

    def _base_spec(self, mode: str, model: Optional[str]) -> Dict[str, Any]:
        # 起点 start_at 由各发压进程在屏障之后设定（见 loadgen.worker）
        return {"url": self.url, "model": model or self.model, "protocol": self.cfg.protocol, "mode": mode,
                "timeout_s": self.cfg.timeout_s}

    def point_duration(self, rate: float, duration_s: Optional[float] = None) -> float:
        """开环一个点的时长：至少 duration_s、至少 min_requests 个请求，但不超过 max_point_s。"""
        want = max(duration_s or self.cfg.duration_s, self.cfg.min_requests / rate)
        # 不短于 P99 的置信上界存在所需的样本数（约 370 个）：否则这个点无法判定
        floor_s = 1.05 * min_samples_for_upper_bound() / rate
        return max(min(want, max(self.cfg.max_point_s, duration_s or 0.0)), floor_s)

    def open_loop(self, rate: float, duration_s: Optional[float] = None, model: Optional[str] = None,
                  kind: Optional[str] = None, label: str = "", hook=None) -> Dict[str, Any]:
        """泊松到达，目标速率 rate（请求/秒）。hook：上下文管理器工厂，测量期间开着（例如 Triton 追踪）。"""
        duration_s = self.point_duration(rate, duration_s)
        procs = self.cfg.processes
        rng = np.random.default_rng(self._seed + 10_000)
        specs = []
        for p in range(procs):
            # 以到达数为条件的泊松过程：n = 速率 x 时长，到达时刻为排序后的均匀分布
            n = max(1, int(round(rate / procs * duration_s)))
            offsets = np.sort(rng.uniform(0.0, duration_s, size=n))
            specs.append(self._base_spec("open", model) | {
                "offsets": offsets.tolist(), "id_prefix": f"s{self._seed}p{p}",
                "requests": self._request_spec(len(offsets), kind)})
        return self._measure(specs, {"mode": "open", "offered_rate": rate, "duration_s": duration_s,
                                     "model": model or self.model, "model_label": label}, hook=hook)

    def closed_loop(self, concurrency: int, duration_s: Optional[float] = None, count: Optional[int] = None,
                    record: bool = True, model: Optional[str] = None) -> Dict[str, Any]:
        """concurrency 个并发请求循环发送，直到 duration_s 秒或发完 count 个。"""
        duration_s = duration_s or self.cfg.duration_s
        count = count or max(concurrency * 4, int(duration_s * 4000))
        count = min(count, 200_000)
        procs = min(self.cfg.processes, concurrency)
        per = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        specs = [self._base_spec("closed", model) | {"concurrency": c, "duration_s": duration_s,
                                                     "id_prefix": f"s{self._seed}c{i}",
                                                     "requests": self._request_spec(max(count // procs, c))}
                 for i, c in enumerate(per)]
        return self._measure(specs, {"mode": "closed", "concurrency": concurrency, "duration_s": duration_s,
                                     "model": model or self.model}, record=record)

    def _measure(self, specs, point: Dict[str, Any], record: bool = True, hook=None) -> Dict[str, Any]:
        before, m_before = self.stats.snapshot(), self.engine_metrics.snapshot()
        ctx = hook() if hook is not None else None
        if ctx is not None:
            ctx.__enter__()
        try:
            with self.gpu:
                results = self._run_workers(specs)
        except StalledError as e:
            what = (f"开环 {point['offered_rate']:g}/s" if point["mode"] == "open"
                    else f"闭环 并发 {point['concurrency']}")
            raise StalledError(f"{what}：{e}；{self.server_state()}") from None
        finally:
            if ctx is not None:
                ctx.__exit__(None, None, None)
        if self.engine_metrics.url:
            time.sleep(EngineMetricsScraper.FLUSH_WAIT_S)  # 引擎的指标在后台每 0.1 s 写一次
        after, m_after = self.stats.snapshot(), self.engine_metrics.snapshot()
        intended = np.concatenate([r["intended"] for r in results])
        sent = np.concatenate([r["sent"] for r in results])
        done = np.concatenate([r["done"] for r in results])
        issued = ~np.isnan(intended)
        ok = issued & ~np.isnan(done)
        errors: Dict[str, int] = {}
        samples: Dict[str, str] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
            samples.update(r.get("error_samples", {}))
        lat = (done[ok] - intended[ok]) * 1000
        failed = np.concatenate([r["failed"] for r in results])
        failed_ok = issued & ~np.isnan(failed)
        failed_lat = (failed[failed_ok] - intended[failed_ok]) * 1000
        lag = (sent[issued] - intended[issued]) * 1000
        t0 = min(r["start_at"] for r in results)  # 从计划开始时刻算吞吐的时间窗
        t1 = np.nanmax(np.where(np.isnan(done), sent, done)) if issued.any() else 0.0
        window = max(t1 - t0, 1e-9)
        n_issued = int(issued.sum())
        order = np.argsort(intended[ok])
        q = max(1, len(order) // 4)
        point = point | {
            "sent": n_issued, "ok": int(ok.sum()), "errors": errors, "error_samples": samples,
            "error_rate": (n_issued - int(ok.sum())) / max(n_issued, 1),
            # 过载时被队列策略拒绝（gRPC UNAVAILABLE / HTTP 503）的比例：丢弃而不是排队
            "refused_share": (errors.get("UNAVAILABLE", 0) + errors.get("503", 0)) / max(n_issued, 1),
            "throughput": float(ok.sum() / window),
            "latency_ms": percentiles(lat),
            # 失败请求从计划发送到得到错误的时间（过载时：被拒得多快）
            "failed_latency_ms": percentiles(failed_lat),
            "p99_ci": quantile_ci(lat, 0.99),
            # 前后四分之一的中位延迟：开环过载时队列随时间增长，两者相差很大
            "p50_first_quarter_ms": float(np.median(lat[order[:q]])) if ok.any() else None,
            "p50_last_quarter_ms": float(np.median(lat[order[-q:]])) if ok.any() else None,
            "schedule_lag_ms": percentiles(lag) if point["mode"] == "open" else None,
            "client_cpu_util": [float(r["cpu_util"]) for r in results],
            "server": ServerStats.delta(before, after),
            "engine_execute": EngineMetricsScraper.delta(m_before, m_after),
            # 只算负载期间 [计划起点, 最后一个回答] 的样本：采样窗口还包括发压进程的启动与收尾（约 1.1–1.4 s 的空闲）
            "gpu": self.gpu.result(window=(t0, t1)),
        }
        if point["mode"] == "open" and point["schedule_lag_ms"]["p99"] is not None:
            point["behind_schedule"] = point["schedule_lag_ms"]["p99"] > 5.0
        # 给追踪对照用的客户端时间戳（不进报告：太大）
        point["_client"] = {"results": results}
        if record and self.progress:
            log.info(format_point(point))
        if record and self.on_point is not None:
            self.on_point(point)
        return point

    # ------------------------------------------------------------ SLA 搜索

    def meets(self, point: Dict[str, Any], slo_ms: float) -> bool:
        high = (point.get("p99_ci") or {}).get("high")
        offered = point.get("offered_rate", 0)
        keeps_up = point["throughput"] >= 0.9 * offered * point["ok"] / max(point["sent"], 1)
        return high is not None and high <= slo_ms and point["error_rate"] <= self.cfg.max_error_rate and keeps_up

    def sla_search(self, slo_ms: float) -> Dict[str, Any]:
        """找 P99 <= slo_ms（按置信区间上界）且错误率达标的最高速率，再独立重测确认。

        从 sla_start_rate 起，达标就加倍、不达标就减半，找到相邻的“达标 / 不达标”两个速率后再二分 sla_steps 步。
        减半时若引擎已几乎不合批（平均 batch <= 1.1）而中位延迟仍超过目标，就停下并说明：延迟来自服务本身。"""
        points: List[Dict[str, Any]] = []
        good: Optional[Dict[str, Any]] = None
        bad_rate: Optional[float] = None
        unbatched: Optional[Dict[str, Any]] = None
        rate = self.cfg.sla_start_rate
        min_rate = max(self.cfg.sla_start_rate / 64, self.cfg.sla_min_rate)
        while min_rate <= rate <= self.cfg.sla_max_rate:
            p = self.open_loop(rate)
            points.append(p)
            if self.meets(p, slo_ms):
                good = p
                if bad_rate is not None:
                    break
                rate *= 2
            else:
                bad_rate = rate
                if good is not None:
                    break
                eng = engine_stats(p["server"]) or {}
                p50 = p["latency_ms"]["p50"]
                if (p["error_rate"] <= self.cfg.max_error_rate and (eng.get("avg_batch") or 1.0) <= 1.1
                        and p50 is not None and p50 > slo_ms):
                    unbatched = p
                    break
                rate /= 2
        if good is not None and bad_rate is not None:
            lo, hi = good["offered_rate"], bad_rate
            for _ in range(self.cfg.sla_steps):
                mid = (lo + hi) / 2
                p = self.open_loop(mid)
                points.append(p)
                if self.meets(p, slo_ms):
                    good, lo = p, mid
                else:
                    hi = mid
        result = {"slo_ms": slo_ms, "max_error_rate": self.cfg.max_error_rate, "rule": "P99 95% CI upper <= SLO",
                  "points": points, "search_rate": good["offered_rate"] if good else None, "max_rate": None}
        confirmed = None
        if good is not None:
            rate = good["offered_rate"]
            for _ in range(3 if self.cfg.sla_confirm else 0):
                p = self.open_loop(rate)
                p["confirmation"] = True
                points.append(p)
                if self.meets(p, slo_ms):
                    confirmed = p
                    break
                rate *= 0.9
            if not self.cfg.sla_confirm:
                confirmed = good
        if confirmed is not None:
            eng = engine_stats(confirmed["server"])
            result |= {"max_rate": confirmed["offered_rate"], "throughput": confirmed["throughput"],
                       "p99_ms": confirmed["latency_ms"]["p99"], "p99_ci": confirmed["p99_ci"],
                       "p50_ms": confirmed["latency_ms"]["p50"], "gpu_util": confirmed["gpu"].get("util_mean"),
                       "gpu_sm_clock_mhz": confirmed["gpu"].get("sm_clock_mhz"),
                       "gpu_power_w": confirmed["gpu"].get("power_w"),
                       "gpu_sm_active": confirmed["gpu"].get("sm_active"),
                       "gpu_tensor_active": confirmed["gpu"].get("tensor_active"),
                       "avg_batch": eng.get("avg_batch") if eng else None,
                       "engine_execute": confirmed.get("engine_execute"),
                       "engine_triton_execute_ms": eng.get("compute_per_execute_ms") if eng else None,
                       "engine_outside_execute_ms": outside_execute_ms(confirmed), "confirmed": self.cfg.sla_confirm}
            if bad_rate is None:
                result["note"] = f"到 sla_max_rate={self.cfg.sla_max_rate}/s 仍达标"
        elif good is not None:
            result["note"] = f"搜索得到 {good['offered_rate']:.1f}/s，但独立重测（含降 10% 两次）没有通过"
        elif unbatched is not None:
            result["note"] = (f"{unbatched['offered_rate']:.2f}/s 时引擎几乎不合批，中位延迟已是 "
                              f"{unbatched['latency_ms']['p50']:.1f} ms > {slo_ms} ms：任何速率都不达标")
        else:
            result["note"] = f"低至 {min_rate:.2f}/s 仍不达标（P99 上界 > {slo_ms} ms 或错误率超标）"
        return result


def strip_private(obj):
    """去掉以 _ 开头的键（客户端原始时间戳等），用于写报告。"""
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


# ---------------------------------------------------------------- 整套压测（可重复）

def run_once(bench: Benchmark, cfg: BenchmarkConfig, slo_ms: float, floor_model: Optional[str] = None,
             tracer=None, progress=None, sla_tracer=None) -> Dict[str, Any]:
    """一次完整测量：闭环并发扫描 -> 开环速率 -> 轻负载点（开追踪）-> SLA 搜索与确认 -> SLA 速率上开着追踪的一个点
    -> 地板（同样速率）。tracer 追踪轻负载点，sla_tracer 追踪 SLA 速率上的点（None = 不测那个点，见 trace.sla_point_policy）。"""
    run: Dict[str, Any] = {"closed_loop": [], "open_loop": []}
    if bench.gpu.handles:  # 这次重复开始时 GPU 上有哪些进程（同一设置的数字差很多时，先看是不是有别的进程在用 GPU）
        run["gpu_processes"] = gpu_processes(bench.gpu, bench.own_pids() if bench.own_pids is not None else None)
    step = progress or (lambda label: None)
    for c in cfg.concurrency:
        step(f"闭环 并发 {c}")
        run["closed_loop"].append(bench.closed_loop(c))
    for r in cfg.rates:
        step(f"开环 {r}/s")
        run["open_loop"].append(bench.open_loop(r))
    if cfg.light_rate:
        step(f"轻负载 {cfg.light_rate}/s")
        # 轻负载的尾部（目标：P99 不超过 P50 的 2 倍）也要分解：开着追踪（每 trace_rate 个一个），给出最慢请求停在哪一步
        run["light"] = bench.open_loop(cfg.light_rate, duration_s=cfg.light_duration_s, label="轻负载",
                                       hook=tracer.session if tracer is not None else None)
        if tracer is not None:
            run["light_trace"] = tracer.breakdown(run["light"])
    if cfg.sla_search:
        step("SLA 搜索")
        run["sla"] = bench.sla_search(slo_ms)
        rate = run["sla"].get("max_rate")
        if sla_tracer is not None and rate:
            # 追踪单独测一个点（同一速率，不参与 SLA 的判定）：确认点不开追踪，量的是不被追踪打扰的服务；
            # 2026-11-28 两次服务器卡住（H100 第 3 台、H200）都在开着追踪的高速率确认点上，分开之后再卡住也不丢这次的 SLA 数字，
            # 也分得出卡住是否与追踪有关
            step("SLA 速率上的追踪")
            try:
                traced = bench.open_loop(rate, hook=sla_tracer.session, label="SLA 追踪")
            except StalledError as e:
                raise StalledError(f"开着追踪的点（{rate:g}/s，SLA 已测完）：{e}", partial_run=run) from e
            run["trace_point"] = traced
            run["trace"] = sla_tracer.breakdown(traced)
    if floor_model and cfg.floor:
        step("地板")
        run["floor"] = {}
        if cfg.light_rate:
            run["floor"]["light"] = bench.open_loop(cfg.light_rate, duration_s=cfg.light_duration_s,
                                                    model=floor_model, kind="floor", label="地板")
        rate = (run.get("sla") or {}).get("max_rate")
        if rate:
            run["floor"]["sla_rate"] = bench.open_loop(rate, model=floor_model, kind="floor", label="地板")
    return run


def headline(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """每个主要数字在各次重复中的中位数与范围（bench/tail.spread）。"""
    from algorithm.serving.bench.tail import spread

    def get(run, *path):
        d = run
        for k in path:
            if d is None:
                return None
            d = d.get(k) if isinstance(d, dict) else None
        return d

    h: Dict[str, Any] = {"repeats": len(runs)}
    sla = [r.get("sla") or {} for r in runs]
    h["sla_rate"] = spread(s.get("max_rate") for s in sla)
    h["sla_p99_ms"] = spread(s.get("p99_ms") for s in sla)
    h["sla_p99_ci_high_ms"] = spread((s.get("p99_ci") or {}).get("high") for s in sla)
    h["sla_p50_ms"] = spread(s.get("p50_ms") for s in sla)
    h["sla_gpu_util"] = spread(s.get("gpu_util") for s in sla)
    h["sla_gpu_sm_clock_mhz"] = spread(s.get("gpu_sm_clock_mhz") for s in sla)  # 忙时；机器降频时与别的运行不可比
    h["sla_gpu_power_w"] = spread(s.get("gpu_power_w") for s in sla)
    # GPM（Hopper 起）：SM 活跃与张量核活跃的比例；开 MPS 时 NVML 利用率低估 GPU 做的事，这两项不会
    h["sla_gpu_sm_active"] = spread(s.get("gpu_sm_active") for s in sla)
    h["sla_gpu_tensor_active"] = spread(s.get("gpu_tensor_active") for s in sla)
    h["sla_avg_batch"] = spread(s.get("avg_batch") for s in sla)
    h["sla_throughput"] = spread(s.get("throughput") for s in sla)
    for k in ("host_ms", "device_ms", "copy_back_ms", "execute_ms", "gpu_gap_ms", "requests_per_execute",
              "launches_per_execute", "padding_share"):
        h[f"sla_engine_{k}"] = spread((s.get("engine_execute") or {}).get(k) for s in sla)
    h["sla_engine_triton_execute_ms"] = spread(s.get("engine_triton_execute_ms") for s in sla)
    h["sla_engine_outside_execute_ms"] = spread(s.get("engine_outside_execute_ms") for s in sla)
    h["light_p50_ms"] = spread(get(r, "light", "latency_ms", "p50") for r in runs)
    h["light_p99_ms"] = spread(get(r, "light", "latency_ms", "p99") for r in runs)
    h["light_p99_over_p50"] = spread(
        (get(r, "light", "latency_ms", "p99") or 0) / get(r, "light", "latency_ms", "p50")
        if get(r, "light", "latency_ms", "p50") else None for r in runs)
    for where in ("light", "sla_rate"):
        for q in ("p50", "p99"):
            h[f"floor_{where}_{q}_ms"] = spread(get(r, "floor", where, "latency_ms", q) for r in runs)
    concurrencies = sorted({p["concurrency"] for r in runs for p in r.get("closed_loop", [])})
    h["closed_loop"] = {}
    for c in concurrencies:
        pts = [next((p for p in r.get("closed_loop", []) if p["concurrency"] == c), None) for r in runs]
        h["closed_loop"][str(c)] = {
            "throughput": spread(p["throughput"] if p else None for p in pts),
            "p99_ms": spread(p["latency_ms"]["p99"] if p else None for p in pts),
            "gpu_util": spread(p["gpu"].get("util_mean") if p else None for p in pts),
            "avg_batch": spread((engine_stats(p["server"]) or {}).get("avg_batch") if p else None for p in pts),
            "engine_outside_execute_ms": spread(outside_execute_ms(p) if p else None for p in pts),
            # 闭环的吞吐只数成功的请求：被排队超时拒绝的客户端马上重发，拒绝比例要与吞吐一起看
            "error_rate": spread(p["error_rate"] if p else None for p in pts)}
    return h
