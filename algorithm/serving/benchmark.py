"""压测：开环（泊松到达，延迟从计划发送时刻算起）、闭环并发扫描、SLA 搜索。

为什么要开环：闭环（等到回答再发下一个）永远看不到真实到达流造成的排队（coordinated omission），
P99 会被低估。开环按计划时刻发送，每个请求的延迟 = 完成时刻 - 计划发送时刻；
若发压端落后于计划，报告里的 schedule_lag 会写明落后多少。

请求：从目录里的真实物品生成原始历史，长度服从对数正态（默认中位数 100、sigma 1.0），截断到 [1, max_seq_length]；
发给 ensemble（默认），或经同一前处理得到六个输入直接发给引擎模型。请求在压测前生成好，不占用发压时间。

同一时间窗内还采集：Triton 统计 API（每个模型的排队、计算时间与平均 batch）、NVML 的 GPU 利用率、
发压进程自身的 CPU 占用（判断客户端是否成了瓶颈）。
"""
from __future__ import annotations

import asyncio
import csv
import json
import logging
import math
import multiprocessing as mp
import os
import threading
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from algorithm.serving.config import BenchmarkConfig
from algorithm.serving.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)
PERCENTILES = (50, 90, 95, 99, 99.9)


# ---------------------------------------------------------------- 请求生成

def sample_lengths(cfg: BenchmarkConfig, n: int, max_len: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.round(rng.lognormal(math.log(cfg.length_median), cfg.length_sigma, n)), 1, max_len).astype(int)


def make_histories(catalog_path: str, cfg: BenchmarkConfig, n: int, max_len: int, seed: int) -> List[np.ndarray]:
    """n 条原始历史（目录中的真实物品，按主题抽取，与训练数据同分布）。"""
    from algorithm.models.catalog import load_catalog
    from algorithm.models.train import SyntheticSequences

    catalog = load_catalog(catalog_path)
    data = SyntheticSequences(catalog, seed)
    return [data.sample(1, int(k), random_lengths=False)[0][0] for k in sample_lengths(cfg, n, max_len, seed)]


def _client_module(protocol: str, aio: bool):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as sync_mod
            import tritonclient.grpc.aio as aio_mod
        else:
            import tritonclient.http as sync_mod
            import tritonclient.http.aio as aio_mod
    except ImportError as e:
        raise MissingDependencyError("压测需要 tritonclient[grpc,http]") from e
    return aio_mod if aio else sync_mod


def build_requests(spec: Dict[str, Any]) -> List[list]:
    """按规格生成请求的 InferInput 列表（在发压进程内生成，避免跨进程传 protobuf 对象）。"""
    from algorithm.serving.triton_config import HISTORY_INPUT

    cfg = BenchmarkConfig(**spec["benchmark"])
    mod = _client_module(cfg.protocol, aio=False)
    histories = make_histories(spec["catalog"], cfg, spec["count"], spec["max_seq_length"], spec["seed"])
    requests = []
    if cfg.target == "ensemble":
        for h in histories:
            arr = h.reshape(1, -1).astype(np.int64)
            inp = mod.InferInput(HISTORY_INPUT, list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            requests.append([inp])
    else:
        from algorithm.interfaces import EngineContract
        from algorithm.models.catalog import load_catalog
        from algorithm.serving.preprocess import Preprocessor

        contract = EngineContract(**spec["contract"])
        pre = Preprocessor(load_catalog(spec["catalog"]), contract)
        for h in histories:
            feeds, _ = pre.encode_one(h)
            inputs = []
            for s in contract.inputs:
                inp = mod.InferInput(s.name, list(feeds[s.name].shape), s.triton_dtype[len("TYPE_"):])
                inp.set_data_from_numpy(feeds[s.name])
                inputs.append(inp)
            requests.append(inputs)
    return requests


# ---------------------------------------------------------------- 发压

def _error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    s = status() if callable(status) else status
    if s:
        return str(s).replace("StatusCode.", "")
    return type(exc).__name__


async def _run_schedule(spec: Dict[str, Any], requests: List[list]) -> Dict[str, Any]:
    """一个发压进程：开环（按 offsets 计划时刻发送）或闭环（concurrency 个协程轮流发送）。"""
    mod = _client_module(spec["protocol"], aio=True)
    client = mod.InferenceServerClient(url=spec["url"])
    model = spec["model"]
    timeout = spec["timeout_s"]
    n = len(requests)
    intended = np.full(n, np.nan)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    errors: Dict[str, int] = {}
    cpu0, wall0 = time.process_time(), time.time()
    kwargs = {"client_timeout": timeout} if spec["protocol"] == "grpc" else {}

    async def one(i: int) -> None:
        sent[i] = time.time()
        try:
            await client.infer(model, requests[i], **kwargs)
            done[i] = time.time()
        except Exception as e:  # 记下错误类型，继续
            kind = _error_kind(e)
            errors[kind] = errors.get(kind, 0) + 1

    try:
        start = spec["start_at"]
        if spec["mode"] == "open":
            offsets = np.asarray(spec["offsets"])
            tasks = []
            for i in range(n):
                intended[i] = start + offsets[i]
                delay = intended[i] - time.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        else:
            await asyncio.sleep(max(0.0, start - time.time()))
            deadline = start + spec["duration_s"]
            counter = iter(range(n))

            async def loop() -> None:
                for i in counter:
                    if time.time() >= deadline:
                        break
                    intended[i] = time.time()
                    await one(i)

            await asyncio.gather(*(loop() for _ in range(spec["concurrency"])))
    finally:
        await client.close()
    wall = time.time() - wall0
    return {"intended": intended, "sent": sent, "done": done, "errors": errors, "start_at": start,
            "cpu_util": (time.process_time() - cpu0) / max(wall, 1e-9)}


_BARRIER = None


def _init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def _worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """先生成请求，再在屏障处等所有发压进程就绪，然后同时开始（各进程的计划起点相差不到几毫秒）。"""
    requests = build_requests(spec["requests"])
    spec = dict(spec)
    if _BARRIER is not None:
        _BARRIER.wait()
    spec["start_at"] = time.time() + 0.2
    return asyncio.run(_run_schedule(spec, requests))


# ---------------------------------------------------------------- 服务器统计与 GPU

class ServerStats:
    """Triton 统计 API 的两次快照之差：每个模型的推理数、执行数、平均排队与计算时间。"""

    def __init__(self, url: str, protocol: str = "grpc"):
        self.client = _client_module(protocol, aio=False).InferenceServerClient(url=url)
        self.protocol = protocol

    def snapshot(self) -> Dict[str, Dict[str, int]]:
        stats = self.client.get_inference_statistics("", as_json=True) if self.protocol == "grpc" \
            else self.client.get_inference_statistics("")
        out = {}
        for m in stats.get("model_stats", []):
            s = m.get("inference_stats", {})
            out[m["name"]] = {
                "inferences": int(m.get("inference_count", 0)), "executions": int(m.get("execution_count", 0)),
                "success": int(s.get("success", {}).get("count", 0)), "fail": int(s.get("fail", {}).get("count", 0)),
                "queue_ns": int(s.get("queue", {}).get("ns", 0)),
                "compute_ns": int(s.get("compute_infer", {}).get("ns", 0))
                + int(s.get("compute_input", {}).get("ns", 0)) + int(s.get("compute_output", {}).get("ns", 0)),
                "requests": int(s.get("success", {}).get("count", 0)) + int(s.get("fail", {}).get("count", 0))}
        return out

    @staticmethod
    def delta(before, after) -> Dict[str, Dict[str, float]]:
        out = {}
        for name, a in after.items():
            b = before.get(name, {k: 0 for k in a})
            d = {k: a[k] - b[k] for k in a}
            if d["requests"] <= 0 and d["executions"] <= 0:
                continue
            reqs = max(d["requests"], 1)
            out[name] = {"requests": d["requests"], "executions": d["executions"], "failures": d["fail"],
                         "avg_batch": d["inferences"] / d["executions"] if d["executions"] else None,
                         "queue_ms": d["queue_ns"] / reqs / 1e6, "compute_ms": d["compute_ns"] / reqs / 1e6}
        return out


class GpuSampler:
    """后台线程每 interval 秒读一次 NVML 的 GPU 利用率；没有 NVML 或 GPU 时给出原因。"""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.samples: List[float] = []
        self.reason: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.handles = []
        self.name = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            count = pynvml.nvmlDeviceGetCount()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            if not self.handles:
                self.reason = "NVML 没有发现 GPU"
            else:
                name = pynvml.nvmlDeviceGetName(self.handles[0])
                self.name = name.decode() if isinstance(name, bytes) else name
        except ImportError:
            self.reason = "未安装 nvidia-ml-py（pip install -e '.[gpu]'）"
        except Exception as e:
            self.reason = f"NVML 不可用：{e}"

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                vals = [self.nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
                self.samples.append(float(np.mean(vals)))
            except Exception as e:  # pragma: no cover
                self.reason = f"NVML 读数失败：{e}"
                return

    def __enter__(self) -> "GpuSampler":
        self.samples = []
        if self.handles:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join()

    def result(self) -> Dict[str, Any]:
        if not self.samples:
            return {"util_mean": None, "reason": self.reason or "采样窗口太短"}
        return {"util_mean": float(np.mean(self.samples)), "util_p50": float(np.median(self.samples)),
                "samples": len(self.samples), "device": self.name}


# ---------------------------------------------------------------- 一个负载点

def _percentiles(x: np.ndarray) -> Dict[str, Optional[float]]:
    if x.size == 0:
        return {f"p{p:g}": None for p in PERCENTILES} | {"mean": None, "max": None}
    return {f"p{p:g}": float(np.percentile(x, p)) for p in PERCENTILES} | {"mean": float(x.mean()),
                                                                              "max": float(x.max())}


class Benchmark:
    """对一个运行中的 Triton 做压测。catalog_path 为构建好的仓库里的目录文件。"""

    def __init__(self, url: str, model_name: str, cfg: BenchmarkConfig, catalog_path: str,
                 max_seq_length: int, contract_kwargs: Optional[Dict[str, Any]] = None,
                 progress: bool = True):
        if not os.path.isfile(catalog_path):
            raise ConfigError(f"目录文件不存在：{catalog_path}（先运行 scripts/build.py，或给出 catalog 路径）")
        self.url, self.model, self.cfg = url, model_name, cfg
        self.catalog_path = catalog_path
        self.max_seq_length = max_seq_length
        self.contract_kwargs = contract_kwargs or {"max_seq_length": max_seq_length}
        self.progress = progress
        self.stats = ServerStats(url, cfg.protocol)
        self.gpu = GpuSampler()
        self._seed = cfg.seed

    def _request_spec(self, count: int) -> Dict[str, Any]:
        self._seed += 1
        return {"benchmark": asdict(self.cfg), "catalog": self.catalog_path, "count": count,
                "max_seq_length": self.max_seq_length, "seed": self._seed, "contract": self.contract_kwargs}

    def _run_workers(self, specs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        if len(specs) == 1:
            return [_worker(specs[0])]
        ctx = mp.get_context("spawn")
        barrier = ctx.Barrier(len(specs))
        with ctx.Pool(len(specs), initializer=_init_worker, initargs=(barrier,)) as pool:
            return pool.map(_worker, specs)

    def warmup(self) -> None:
        if self.cfg.warmup_requests:
            self.closed_loop(min(4, self.cfg.warmup_requests), duration_s=60.0, count=self.cfg.warmup_requests,
                             record=False)

    def _base_spec(self, mode: str) -> Dict[str, Any]:
        # 起点 start_at 由各发压进程在屏障之后设定（见 _worker）
        return {"url": self.url, "model": self.model, "protocol": self.cfg.protocol, "mode": mode,
                "timeout_s": self.cfg.timeout_s}

    def open_loop(self, rate: float, duration_s: Optional[float] = None) -> Dict[str, Any]:
        """泊松到达，目标速率 rate（请求/秒），持续 duration_s 秒。"""
        duration_s = max(duration_s or self.cfg.duration_s, self.cfg.min_requests / rate)
        procs = self.cfg.processes
        rng = np.random.default_rng(self._seed + 10_000)
        specs = []
        for p in range(procs):
            # 以到达数为条件的泊松过程：n = 速率 x 时长，到达时刻为排序后的均匀分布
            # （间隔仍近似指数分布，但实际平均速率与目标一致，负载点之间可比）
            n = max(1, int(round(rate / procs * duration_s)))
            offsets = np.sort(rng.uniform(0.0, duration_s, size=n))
            specs.append(self._base_spec("open") | {"offsets": offsets.tolist(),
                                                    "requests": self._request_spec(len(offsets))})
        return self._measure(specs, {"mode": "open", "offered_rate": rate, "duration_s": duration_s})

    def closed_loop(self, concurrency: int, duration_s: Optional[float] = None, count: Optional[int] = None,
                    record: bool = True) -> Dict[str, Any]:
        """concurrency 个并发请求循环发送，直到 duration_s 秒或发完 count 个。"""
        duration_s = duration_s or self.cfg.duration_s
        count = count or max(concurrency * 4, int(duration_s * 2000))
        count = min(count, 200_000)
        procs = min(self.cfg.processes, concurrency)
        per = [concurrency // procs + (i < concurrency % procs) for i in range(procs)]
        specs = [self._base_spec("closed") | {"concurrency": c, "duration_s": duration_s,
                                              "requests": self._request_spec(max(count // procs, c))}
                 for c in per]
        return self._measure(specs, {"mode": "closed", "concurrency": concurrency, "duration_s": duration_s},
                             record=record)

    def _measure(self, specs, point: Dict[str, Any], record: bool = True) -> Dict[str, Any]:
        before = self.stats.snapshot()
        with self.gpu:
            results = self._run_workers(specs)
        after = self.stats.snapshot()
        intended = np.concatenate([r["intended"] for r in results])
        sent = np.concatenate([r["sent"] for r in results])
        done = np.concatenate([r["done"] for r in results])
        issued = ~np.isnan(intended)
        ok = issued & ~np.isnan(done)
        errors: Dict[str, int] = {}
        for r in results:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        lat = (done[ok] - intended[ok]) * 1000
        lag = (sent[issued] - intended[issued]) * 1000
        t0 = min(r["start_at"] for r in results)  # 从计划开始时刻算吞吐的时间窗
        t1 = np.nanmax(np.where(np.isnan(done), sent, done)) if issued.any() else 0.0
        window = max(t1 - t0, 1e-9)
        order = np.argsort(intended[ok])
        q = max(1, len(order) // 4)
        n_issued = int(issued.sum())
        point = point | {
            "sent": n_issued, "ok": int(ok.sum()), "errors": errors,
            "error_rate": (n_issued - int(ok.sum())) / max(n_issued, 1),
            # 过载时被队列策略拒绝（gRPC UNAVAILABLE / HTTP 503）的比例：丢弃而不是排队
            "refused_share": (errors.get("UNAVAILABLE", 0) + errors.get("503", 0)) / max(n_issued, 1),
            "throughput": float(ok.sum() / window),
            "latency_ms": _percentiles(lat),
            "p50_first_quarter_ms": float(np.median(lat[order[:q]])) if ok.any() else None,
            "p50_last_quarter_ms": float(np.median(lat[order[-q:]])) if ok.any() else None,
            "schedule_lag_ms": _percentiles(lag) if point["mode"] == "open" else None,
            "client_cpu_util": [float(r["cpu_util"]) for r in results],
            "server": ServerStats.delta(before, after),
            "gpu": self.gpu.result(),
        }
        if point["mode"] == "open" and point["schedule_lag_ms"]["p99"] is not None:
            point["behind_schedule"] = point["schedule_lag_ms"]["p99"] > 5.0
        if record and self.progress:
            log.info(format_point(point))
        return point

    # ------------------------------------------------------------ SLA 搜索

    def meets(self, point: Dict[str, Any], slo_ms: float) -> bool:
        p99 = point["latency_ms"]["p99"]
        offered = point.get("offered_rate", 0)
        keeps_up = point["throughput"] >= 0.9 * offered * point["ok"] / max(point["sent"], 1)
        return (p99 is not None and p99 <= slo_ms and point["error_rate"] <= self.cfg.max_error_rate and keeps_up)

    def sla_search(self, slo_ms: float) -> Dict[str, Any]:
        """找 P99 <= slo_ms 且错误率达标的最高速率：从 sla_start_rate 起，达标就加倍、不达标就减半，
        找到相邻的“达标 / 不达标”两个速率后再二分 sla_steps 步。减半时若引擎已几乎不合批（平均 batch <= 1.1）
        而中位延迟仍超过目标，就停下并说明：延迟来自服务本身，降速率无用。"""
        points: List[Dict[str, Any]] = []
        good: Optional[Dict[str, Any]] = None
        bad_rate: Optional[float] = None
        unbatched: Optional[Dict[str, Any]] = None
        rate = self.cfg.sla_start_rate
        min_rate = self.cfg.sla_start_rate / 64
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
                eng = _engine_stats(p["server"]) or {}
                p50 = p["latency_ms"]["p50"]
                if (p["error_rate"] <= self.cfg.max_error_rate and (eng.get("avg_batch") or 1.0) <= 1.1
                        and p50 is not None and p50 > slo_ms):
                    # 引擎几乎不合批（没有排队）而中位延迟已超过目标：延迟来自服务本身，再降速率也不会达标
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
        result = {"slo_ms": slo_ms, "max_error_rate": self.cfg.max_error_rate, "points": points,
                  "max_rate": good["offered_rate"] if good else None}
        if good:
            eng = _engine_stats(good["server"])
            result |= {"throughput": good["throughput"], "p99_ms": good["latency_ms"]["p99"],
                       "gpu_util": good["gpu"].get("util_mean"), "avg_batch": eng.get("avg_batch") if eng else None}
            if bad_rate is None:
                result["note"] = f"到 sla_max_rate={self.cfg.sla_max_rate}/s 仍达标"
        elif unbatched is not None:
            result["note"] = (f"{unbatched['offered_rate']:.2f}/s 时引擎几乎不合批，中位延迟已是 "
                              f"{unbatched['latency_ms']['p50']:.1f} ms > {slo_ms} ms：任何速率都不达标")
        else:
            result["note"] = f"低至 {min_rate:.2f}/s 仍不达标（P99 > {slo_ms} ms 或错误率超标）"
        return result


def _engine_stats(server: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    return server.get("ugt_engine") or next(iter(server.values()), None)


def format_point(p: Dict[str, Any]) -> str:
    lat = p["latency_ms"]
    what = f"开环 {p['offered_rate']:.1f}/s" if p["mode"] == "open" else f"闭环 并发 {p['concurrency']}"
    eng = _engine_stats(p["server"]) or {}
    gpu = p["gpu"].get("util_mean")
    fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    return (f"{what:<18} 吞吐 {p['throughput']:8.1f}/s  p50 {fmt(lat['p50'])}  p99 {fmt(lat['p99'])}  "
            f"p99.9 {fmt(lat['p99.9'])} ms  错误 {p['error_rate']:.2%}  batch {fmt(eng.get('avg_batch'))}  "
            f"GPU {fmt(gpu)}%")


# ---------------------------------------------------------------- 报告

def write_report(report: Dict[str, Any], out_dir: str) -> Dict[str, str]:
    """JSON（全部数据）+ CSV（每个负载点一行）+ PNG（延迟分位数与 GPU 利用率 vs 吞吐）。"""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "benchmark.json"), "csv": os.path.join(out_dir, "benchmark.csv"),
             "png": os.path.join(out_dir, "benchmark.png")}
    with open(paths["json"], "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False, default=float)
    points = all_points(report)
    cols = ["mode", "offered_rate", "concurrency", "sent", "ok", "error_rate", "throughput", "p50", "p90", "p95",
            "p99", "p99.9", "lag_p99", "engine_avg_batch", "engine_queue_ms", "engine_compute_ms", "gpu_util",
            "client_cpu_util_max"]
    with open(paths["csv"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for p in points:
            eng = _engine_stats(p["server"]) or {}
            lat = p["latency_ms"]
            w.writerow([p["mode"], p.get("offered_rate", ""), p.get("concurrency", ""), p["sent"], p["ok"],
                        f"{p['error_rate']:.5f}", f"{p['throughput']:.2f}",
                        *[_fmt(lat[f"p{q:g}"]) for q in PERCENTILES],
                        _fmt((p.get("schedule_lag_ms") or {}).get("p99")), _fmt(eng.get("avg_batch")),
                        _fmt(eng.get("queue_ms")), _fmt(eng.get("compute_ms")), _fmt(p["gpu"].get("util_mean")),
                        _fmt(max(p["client_cpu_util"]))])
    _plot(report, points, paths["png"])
    return paths


def _fmt(v) -> str:
    return "" if v is None else f"{v:.3f}"


def all_points(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    pts = list(report.get("closed_loop", [])) + list(report.get("open_loop", []))
    if report.get("sla"):
        pts += report["sla"]["points"]
    return pts


def _plot(report: Dict[str, Any], points: List[Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for mode, marker in (("open", "o"), ("closed", "s")):
        pts = sorted((p for p in points if p["mode"] == mode and p["latency_ms"]["p50"] is not None),
                     key=lambda p: p["throughput"])
        if not pts:
            continue
        x = [p["throughput"] for p in pts]
        for q, style in (("p50", "-"), ("p99", "--"), ("p99.9", ":")):
            ax.plot(x, [p["latency_ms"][q] for p in pts], style, marker=marker, label=f"{mode} {q}")
    slo = report.get("slo_ms")
    if slo:
        ax.axhline(slo, color="red", lw=1, alpha=0.6, label=f"SLO {slo:g} ms")
    ax.set_xlabel("throughput (req/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    gpu_pts = [p for p in points if p["gpu"].get("util_mean") is not None]
    if gpu_pts:
        ax2 = ax.twinx()
        gpu_pts.sort(key=lambda p: p["throughput"])
        ax2.plot([p["throughput"] for p in gpu_pts], [p["gpu"]["util_mean"] for p in gpu_pts], "g^-", alpha=0.6,
                 label="GPU util %")
        ax2.set_ylabel("GPU utilization (%)")
        ax2.set_ylim(0, 100)
        ax2.legend(loc="upper center", fontsize=8)
    sla = report.get("sla") or {}
    title = f"{report.get('model', '')}  {report.get('device', '')}"
    if sla.get("max_rate"):
        title += f"\nmax rate with P99 <= {sla['slo_ms']:g} ms: {sla['max_rate']:.1f} req/s"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def offline_engine_throughput(repository: str, batch_sizes: Sequence[int], cfg: BenchmarkConfig,
                              max_seq_length: int, repeats: int = 3, samples: int = 2000) -> Dict[str, Any]:
    """在本进程里直接运行仓库中的引擎（与服务同一个运行器），按 batch 测吞吐（请求/秒）。

    与服务一致：历史按配置的长度分布抽样，按引擎的长度组（seq 桶）分组，每组单独成批；
    某 batch 的吞吐 = b / sum_k(p_k * t_k(b))，p_k 为长度组 k 的占比，t_k(b) 为该组 batch b 一次的中位时间。
    """
    from algorithm.serving.pipeline import InProcessPipeline
    from algorithm.serving.triton_models import merge_requests

    pipe = InProcessPipeline(repository)
    catalog = os.path.join(repository, "ugt_preprocess", "1", "catalog.npz")
    histories = make_histories(catalog, cfg, samples, max_seq_length, cfg.seed + 99)
    eng = pipe.engine
    groups: Dict[int, List[Dict[str, np.ndarray]]] = {}
    for h in histories:
        feed = pipe.pre.pre.encode_one(h)[0]
        groups.setdefault(eng._length_class(feed["encoder_mask"].shape[1]), []).append(feed)
    share = {k: len(v) / len(histories) for k, v in groups.items()}
    out: Dict[str, Any] = {}
    for b in batch_sizes:
        per_class = {}
        for k, feeds in sorted(groups.items()):
            times = []
            for r in range(repeats + 1):
                picked = [feeds[(r * b + i) % len(feeds)] for i in range(b)]
                batch = merge_requests(picked, eng.contract, eng.seq_buckets)
                t0 = time.perf_counter()
                eng.runner.run(batch)
                if r:  # 第一次是预热
                    times.append(time.perf_counter() - t0)
            per_class[str(k)] = float(np.median(times))
        seconds = sum(share[int(k)] * t for k, t in per_class.items())
        out[str(b)] = {"batch": b, "seconds_weighted": seconds, "throughput": float(b / seconds),
                       "seconds_by_length": per_class}
    out["length_share"] = {str(k): v for k, v in sorted(share.items())}
    return out


def run_benchmark(triton_url: str, model_name: str, num_requests: int = 10000,
                  catalog_path: Optional[str] = None, config: Optional[BenchmarkConfig] = None,
                  max_seq_length: int = 1024) -> Dict[str, Any]:
    """用户的接口：对运行中的 Triton 发 num_requests 个请求（闭环，并发取配置的最大值，原始历史来自真实目录），
    返回 throughput（请求/秒）与 latency_p50/p90/p95/p99/p99.9（毫秒）、error_rate 等。

    它回答“这个并发下的延迟”；要看真实到达流下的 P99 与满足 SLA 的最高速率，用 scripts/benchmark.py（开环 + SLA 搜索）。
    catalog_path 缺省为 build/model_repository/ugt_preprocess/1/catalog.npz。
    """
    cfg = config or BenchmarkConfig()
    catalog_path = catalog_path or os.path.join("build", "model_repository", "ugt_preprocess", "1", "catalog.npz")
    bench = Benchmark(triton_url, model_name, cfg, catalog_path, max_seq_length, progress=False)
    bench.warmup()
    p = bench.closed_loop(max(cfg.concurrency), duration_s=3600.0, count=num_requests)
    lat = p["latency_ms"]
    return {"throughput": p["throughput"], "latency_p50": lat["p50"], "latency_p90": lat["p90"],
            "latency_p95": lat["p95"], "latency_p99": lat["p99"], "latency_p99.9": lat["p99.9"],
            "error_rate": p["error_rate"], "requests": p["sent"]}


# ---------------------------------------------------------------- perf_analyzer 交叉检查

def _perf_analyzer_exe() -> Optional[str]:
    """pip 包 perf_analyzer 自带二进制（perf_analyzer/bin/perf_analyzer）；它的入口脚本用装它时的解释器，
    换了环境会找不到包，所以优先直接用包里的二进制，其次 PATH 上的。"""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("perf_analyzer")
    if spec and spec.origin:
        exe = os.path.join(os.path.dirname(spec.origin), "bin", "perf_analyzer")
        if os.access(exe, os.X_OK):
            return exe
    return shutil.which("perf_analyzer")


def run_perf_analyzer(grpc_url: str, model_name: str, catalog_path: str, cfg: BenchmarkConfig,
                      max_seq_length: int, out_dir: str) -> Dict[str, Any]:
    """若装有 perf_analyzer，用同样分布的原始历史在同一模型上跑闭环并发扫描，返回它的数字。"""
    import shutil
    import subprocess

    from algorithm.serving.triton_config import HISTORY_INPUT

    exe = _perf_analyzer_exe()
    if not exe:
        return {"available": False, "reason": "未找到 perf_analyzer（pip install perf_analyzer；它的 wheel 需要 glibc 2.38+）"}
    if cfg.target != "ensemble":
        return {"available": False, "reason": "perf_analyzer 交叉检查只对 ensemble 目标实现"}
    os.makedirs(out_dir, exist_ok=True)
    histories = make_histories(catalog_path, cfg, 200, max_seq_length, cfg.seed + 500)
    data_path = os.path.join(out_dir, "perf_analyzer_input.json")
    with open(data_path, "w") as f:
        json.dump({"data": [{HISTORY_INPUT: {"content": h.tolist(), "shape": [len(h)]}} for h in histories]}, f)
    rows = []
    for c in cfg.concurrency:
        csv_path = os.path.join(out_dir, f"perf_analyzer_c{c}.csv")
        cmd = [exe, "-m", model_name, "-u", grpc_url, "-i", "grpc", "--input-data", data_path,
               "--concurrency-range", str(c), "--measurement-interval", str(int(cfg.duration_s * 1000)),
               "--percentile=99", "--stability-percentage", "20", "--max-trials", "6", "-f", csv_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not os.path.exists(csv_path):
            # 例如 P99 在 max_trials 个窗口内不稳定：记下原因，继续下一个并发
            rows.append({"concurrency": c, "error": (proc.stdout[-1200:] + proc.stderr[-800:]).strip()})
            continue
        with open(csv_path) as f:
            r = next(csv.DictReader(f))
        rows.append({"concurrency": c, "throughput": float(r["Inferences/Second"]),
                     **{f"p{q}_ms": float(r[f"p{q} latency"]) / 1000 for q in (50, 90, 95, 99)}})
    return {"available": True, "command": " ".join(cmd[:-2]), "points": rows}


# ---------------------------------------------------------------- 整套压测

def run_suite(url: str, model_name: str, cfg: BenchmarkConfig, repository: str, max_seq_length: int,
              slo_ms: float, out_dir: str, offline_batches: Sequence[int] = (), meta: Optional[Dict] = None,
              contract_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """预热 -> 闭环并发扫描 -> 开环速率 -> SLA 搜索 ->（可选）perf_analyzer -> 引擎离线吞吐 -> 写报告。"""
    from tqdm import tqdm

    catalog = os.path.join(repository, "ugt_preprocess", "1", "catalog.npz")
    bench = Benchmark(url, model_name, cfg, catalog, max_seq_length, contract_kwargs, progress=False)
    report: Dict[str, Any] = {"model": model_name, "url": url, "slo_ms": slo_ms, "benchmark": asdict(cfg),
                              "device": bench.gpu.name or "CPU", **(meta or {})}
    steps = len(cfg.concurrency) + len(cfg.rates) + (1 if cfg.sla_search else 0) + 2
    bar = tqdm(total=steps, desc="压测", unit="步", dynamic_ncols=True)
    try:
        bench.warmup()
        bar.update()
        sweeps = (("closed_loop", cfg.concurrency, "闭环 并发 {}", bench.closed_loop),
                  ("open_loop", cfg.rates, "开环 {}/s", bench.open_loop))
        for key, values, label, run in sweeps:
            report[key] = []
            for v in values:
                bar.set_postfix_str(label.format(v))
                report[key].append(run(v))
                tqdm.write(format_point(report[key][-1]))
                bar.update()
        if cfg.sla_search:
            bar.set_postfix_str("SLA 搜索")
            bench.progress = True  # 搜索中的每个点在测完时打印一次
            report["sla"] = bench.sla_search(slo_ms)
            bar.update()
        if cfg.perf_analyzer:
            bar.set_postfix_str("perf_analyzer")
            report["perf_analyzer"] = run_perf_analyzer(url, model_name, catalog, cfg, max_seq_length, out_dir)
        # 引擎离线吞吐放在最后：它在本进程里再加载一份引擎（GPU 上占显存与上下文），不能干扰服务的测量
        if offline_batches:
            bar.set_postfix_str("引擎离线吞吐")
            report["offline_engine"] = offline_engine_throughput(repository, offline_batches, cfg, max_seq_length,
                                                                 samples=cfg.offline_samples)
        bar.update()
    finally:
        bar.close()
    _add_overhead(report)
    report["files"] = write_report(report, out_dir)
    return report


def _add_overhead(report: Dict[str, Any]) -> None:
    """服务开销 = 引擎离线吞吐（在服务时的平均 batch 附近）/ 服务吞吐；只在两者都测了时给出。"""
    off = report.get("offline_engine")
    sla = report.get("sla") or {}
    if not off or not sla.get("max_rate") or not sla.get("avg_batch"):
        return
    best = min((v for k, v in off.items() if k.isdigit()), key=lambda v: abs(v["batch"] - sla["avg_batch"]))
    report["serving_overhead"] = {"avg_batch_at_sla": sla["avg_batch"], "offline_batch": best["batch"],
                                  "offline_throughput": best["throughput"], "served_throughput": sla["throughput"],
                                  "offline_over_served": best["throughput"] / max(sla["throughput"], 1e-9)}


def summary_table(report: Dict[str, Any]) -> str:
    lines = ["模式                吞吐/s    p50     p90     p99     p99.9   错误率   平均batch  GPU%"]
    for p in all_points(report):
        lat = p["latency_ms"]
        eng = _engine_stats(p["server"]) or {}
        what = f"开环 {p['offered_rate']:.1f}/s" if p["mode"] == "open" else f"闭环 c={p['concurrency']}"
        f = lambda v, w=7: ("-" if v is None else f"{v:.1f}").rjust(w)  # noqa: E731
        lines.append(f"{what:<16}{f(p['throughput'], 9)}{f(lat['p50'])} {f(lat['p90'])} {f(lat['p99'])} "
                     f"{f(lat['p99.9'])}  {p['error_rate']:6.2%}  {f(eng.get('avg_batch'), 8)}  "
                     f"{f(p['gpu'].get('util_mean'), 5)}")
    sla = report.get("sla")
    if sla:
        if sla.get("max_rate"):
            lines.append(f"SLA：P99 <= {sla['slo_ms']:g} ms 的最高速率 {sla['max_rate']:.1f}/s（吞吐 "
                         f"{sla['throughput']:.1f}/s，P99 {sla['p99_ms']:.1f} ms，平均 batch "
                         f"{sla['avg_batch'] or 0:.2f}，GPU {sla['gpu_util'] if sla['gpu_util'] is not None else '-'}）")
        else:
            lines.append(f"SLA：{sla.get('note')}")
    pa = report.get("perf_analyzer") or {}
    for r in pa.get("points", []):
        lines.append(f"perf_analyzer c={r['concurrency']}: " + (
            f"吞吐 {r['throughput']:.1f}/s p50 {r['p50_ms']:.1f} p99 {r['p99_ms']:.1f} ms" if "throughput" in r
            else "失败：" + (r["error"].splitlines() or [""])[-1][:120]))
    if pa and not pa.get("available"):
        lines.append(f"perf_analyzer：{pa.get('reason')}")
    off = {k: v for k, v in (report.get("offline_engine") or {}).items() if k.isdigit()}
    if off:
        lines.append("引擎离线吞吐（同一运行器，按长度分组）：" + "，".join(
            f"b{k} {v['throughput']:.0f}/s" for k, v in off.items()))
    return "\n".join(lines)
