"""同一时间窗里的服务端数字：Triton 统计 API（每个模型的排队、计算时间与平均 batch）、
引擎运行器的自定义指标（/metrics 里的 ugt_engine_*，见 runtime/glue.EngineMetrics）、NVML 的 GPU 利用率。"""
from __future__ import annotations

import os
import re
import threading
import time
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from algorithm.errors import StalledError
from algorithm.serving.bench.loadgen import client_module


class ServerStats:
    """Triton 统计 API 的两次快照之差：每个模型的推理数、执行数、平均排队与计算时间。

    两种计算时间：compute_ms 是每个请求的平均（inference_stats；Triton 给一批里的每个请求都记整批的时间，所以它按请求数
    加权，大批的 execute 权重大），compute_per_execute_ms 是每次执行的平均（batch_stats，按执行计数）。有动态批处理时前者
    更大，差值不是开销：H100 上 SLA 点引擎 6.6 ms / 请求，而 model.py 自测的 execute 是 4.3 ms / 次。"""

    def __init__(self, url: str, protocol: str = "grpc", timeout_s: float = 30.0):
        mod = client_module(protocol, aio=False)
        # 限时：服务器卡住时统计请求不能无限等（StalledError 写明）
        self.client = mod.InferenceServerClient(url=url) if protocol == "grpc" else \
            mod.InferenceServerClient(url=url, connection_timeout=timeout_s, network_timeout=timeout_s)
        self.protocol, self.timeout_s = protocol, timeout_s

    def snapshot(self) -> Dict[str, Dict[str, int]]:
        try:
            stats = self.client.get_inference_statistics("", as_json=True, client_timeout=self.timeout_s) \
                if self.protocol == "grpc" else self.client.get_inference_statistics("")
        except Exception as e:  # noqa: BLE001  tritonclient 的超时与连接错误都是 InferenceServerException
            raise StalledError(f"服务器的统计接口 {self.timeout_s:.0f} s 内没有回答：{str(e)[:200]}") from None
        out = {}
        for m in stats.get("model_stats", []):
            s = m.get("inference_stats", {})
            out[m["name"]] = {
                "inferences": int(m.get("inference_count", 0)), "executions": int(m.get("execution_count", 0)),
                "success": int(s.get("success", {}).get("count", 0)), "fail": int(s.get("fail", {}).get("count", 0)),
                "queue_ns": int(s.get("queue", {}).get("ns", 0)),
                "compute_ns": int(s.get("compute_infer", {}).get("ns", 0))
                + int(s.get("compute_input", {}).get("ns", 0)) + int(s.get("compute_output", {}).get("ns", 0)),
                "requests": int(s.get("success", {}).get("count", 0)) + int(s.get("fail", {}).get("count", 0)),
                "batch_compute_ns": sum(int(b.get(k, {}).get("ns", 0)) for b in m.get("batch_stats", [])
                                        for k in ("compute_input", "compute_infer", "compute_output")),
                "batch_executions": sum(int(b.get("compute_infer", {}).get("count", 0))
                                        for b in m.get("batch_stats", []))}
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
                         "queue_ms": d["queue_ns"] / reqs / 1e6, "compute_ms": d["compute_ns"] / reqs / 1e6,
                         "compute_per_execute_ms": d["batch_compute_ns"] / d["batch_executions"] / 1e6
                         if d["batch_executions"] > 0 else None}
        return out


# NVML 的限频原因位（nvmlClocksEventReason*，数值是 NVML API 的一部分）；GpuIdle 与应用时钟设置不算“被限”
CLOCK_LIMIT_REASONS = {0x4: "SwPowerCap", 0x8: "HwSlowdown", 0x10: "SyncBoost", 0x20: "SwThermalSlowdown",
                       0x40: "HwThermalSlowdown", 0x80: "HwPowerBrakeSlowdown"}
BUSY_UTIL = 50  # 只在 GPU 忙（利用率 ≥ 50 %）的样本里看时钟与功耗：空闲时时钟本来就降
# GPM（GPU 性能监视器，Hopper 起；与 DCGM 的 SM_ACTIVE / TENSOR_ACTIVE 同源）：一个负载点前后各取一个样本，NVML 给出这段时间的平均。
# 为什么要它：NVML 的“利用率”只是“有内核在跑”的时间占比。2026-11-28 H200 上开 CUDA MPS 后两个引擎实例的内核同时跑，
# 吞吐 +44 % 而利用率反而低 4 个百分点、功耗高 27 %：利用率不再反映 GPU 做了多少事，SM 活跃比例才反映
GPM_METRICS = {"sm_active": "NVML_GPM_METRIC_SM_UTIL", "sm_occupancy": "NVML_GPM_METRIC_SM_OCCUPANCY",
               "tensor_active": "NVML_GPM_METRIC_ANY_TENSOR_UTIL"}


class GpuSampler:
    """后台线程每 interval 秒读一次 NVML：GPU 利用率，以及 SM 时钟、功耗与限频原因；没有 NVML 或 GPU 时给出原因。

    为什么记时钟：2026-11-28 H200 上同一段离线测量隔 10 分钟慢了 1.3–1.45 倍而 b1 不变，报告里分不出是机器降频还是代码；
    忙时的 SM 时钟（对最高时钟）与限频原因能直接回答。时钟、功耗或原因读不到（有的 GPU 不支持）时只少这几项，利用率照常。
    GPU 支持 GPM 时每次采样另记上一次以来的 SM 活跃、占用与张量核活跃比例（GPM_METRICS）；不支持或没有权限时 gpm_reason 写明，
    其余照常。NVML 调用都在采样线程里（主线程只等它 5 s），NVML 卡住不会卡住整轮测量；例外是每次重复开始时的
    进程快照（gpu_processes，没有采样线程在跑时才在主线程里取）。

    每个样本记下时刻：result(window=(t0, t1)) 只算负载期间的样本。采样窗口（with 块）还包括发压进程的启动、生成请求与收尾，
    比负载长 1.1–1.4 s（2026-11-28 H200 上 4.5 s 的点：窗口 5.8 s）；以前把这段空闲一起平均，GPU 利用率被低估约四分之一。
    nvml 参数给测试注入替身，clock 给测试注入时刻。"""

    def __init__(self, interval: float = 0.1, nvml=None, clock=time.monotonic):
        self.interval = interval
        self.clock = clock
        self.samples: List[float] = []
        self.times: List[float] = []  # 与 samples 对齐：采样时刻（clock，与发压进程的 time.monotonic 同一个时钟）
        self.extra: List[tuple] = []  # 与 samples 对齐：(SM MHz, 功耗 W, 限频原因位, 显存 MHz)，读不到的是 None
        self.gpm_points: List[Dict[str, Optional[float]]] = []  # 与 samples 对齐：上一次采样以来的 GPM 读数（没有时空字典）
        self.reason: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.handles = []
        self.name = None
        self.max_sm_mhz: Optional[float] = None
        self.power_limit_w: Optional[float] = None
        try:
            if nvml is None:
                import pynvml as nvml

            nvml.nvmlInit()
            self.nvml = nvml
            count = nvml.nvmlDeviceGetCount()
            self.handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            if not self.handles:
                self.reason = "NVML 没有发现 GPU"
            else:
                name = nvml.nvmlDeviceGetName(self.handles[0])
                self.name = name.decode() if isinstance(name, bytes) else name
                self.max_sm_mhz = self._optional(lambda h: nvml.nvmlDeviceGetMaxClockInfo(h, nvml.NVML_CLOCK_SM))
                self.power_limit_w = self._optional(lambda h: nvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
        except ImportError:
            self.reason = "未安装 nvidia-ml-py（pip install -e '.[gpu]'）"
        except Exception as e:
            self.reason = f"NVML 不可用：{e}"
        # 新版 NVML 叫 ClocksEventReasons，旧版叫 ClocksThrottleReasons
        self._reasons_fn = None
        if self.handles:
            self._reasons_fn = getattr(self.nvml, "nvmlDeviceGetCurrentClocksEventReasons", None) or \
                getattr(self.nvml, "nvmlDeviceGetCurrentClocksThrottleReasons", None)
        self._no_extra: set = set()
        self._gpm_prev = None  # 上一次采样时取的 GPM 样本（每块 GPU 一个）
        self.gpm_missing: Dict[str, int] = {}  # 读不到的 GPM 项 -> NVML 返回码
        self.gpm_reason: Optional[str] = self._gpm_support() if self.handles else None

    # ---- GPM：相邻两次采样之间的读数 ----
    def _gpm_support(self) -> Optional[str]:
        """None = 可用；否则是不可用的原因。"""
        nvml = self.nvml
        if not hasattr(nvml, "nvmlGpmQueryDeviceSupport"):
            return "这个 nvidia-ml-py 没有 GPM 接口"
        try:
            if not all(nvml.nvmlGpmQueryDeviceSupport(h).isSupportedDevice for h in self.handles):
                return "这块 GPU 不支持 GPM（Hopper 起才有）"
        except Exception as e:  # noqa: BLE001  旧驱动没有这个函数、容器里没有权限等
            return f"GPM 不可用：{e}"
        return None

    def _gpm_take(self):
        """每块 GPU 一个样本；失败时记下原因、以后不再试（返回 None）。"""
        taken = []
        try:
            for h in self.handles:
                sample = self.nvml.nvmlGpmSampleAlloc()
                taken.append(sample)
                self.nvml.nvmlGpmSampleGet(h, sample)
            return taken
        except Exception as e:  # noqa: BLE001  例如 NVML_ERROR_NO_PERMISSION（只许管理员读性能计数器的机器）
            self._gpm_free(taken)
            self.gpm_reason = f"GPM 取样失败：{e}"
            return None

    def _gpm_free(self, samples) -> None:
        for sample in samples or []:
            try:
                self.nvml.nvmlGpmSampleFree(sample)
            except Exception:  # noqa: BLE001  释放失败只漏一小块 NVML 内存
                pass

    def _gpm_metrics(self, start, end) -> Optional[Dict[str, Optional[float]]]:
        """两组样本之间的 GPM_METRICS（各 GPU 平均，%）；某项在任一块 GPU 上读不到时该项为 None。"""
        nvml = self.nvml
        per: Dict[str, List[float]] = {k: [] for k in GPM_METRICS}
        try:
            for s1, s2 in zip(start, end):
                mg = nvml.c_nvmlGpmMetricsGet_t()
                mg.version = nvml.NVML_GPM_METRICS_GET_VERSION
                mg.numMetrics = len(GPM_METRICS)
                mg.sample1, mg.sample2 = s1, s2
                for i, name in enumerate(GPM_METRICS.values()):
                    mg.metrics[i].metricId = getattr(nvml, name)
                nvml.nvmlGpmMetricsGet(mg)
                for i, key in enumerate(GPM_METRICS):
                    if mg.metrics[i].nvmlReturn == nvml.NVML_SUCCESS:
                        per[key].append(float(mg.metrics[i].value))
                    else:  # 这一项读不到：记下 NVML 的返回码，报告里写明
                        self.gpm_missing[key] = int(mg.metrics[i].nvmlReturn)
        except Exception as e:  # noqa: BLE001
            self.gpm_reason = f"GPM 读数失败：{e}"
            return None
        return {k: float(np.mean(v)) if len(v) == len(start) else None for k, v in per.items()}

    def _optional(self, read) -> Optional[float]:
        """各 GPU 的平均；读不到（不支持）时 None。"""
        try:
            return float(np.mean([read(h) for h in self.handles]))
        except Exception:  # noqa: BLE001  NVMLError_NotSupported 等：只少这一项
            return None

    def _read_extra(self, key: str, read):
        if key in self._no_extra:
            return None
        try:
            return read()
        except Exception:  # noqa: BLE001  第一次读不到就不再试（每次都抛异常的调用也有代价）
            self._no_extra.add(key)
            return None

    def begin(self) -> None:
        """一个窗口开始（采样线程里调用；测试直接调用）：清空样本，取 GPM 的第一个样本。"""
        self.samples, self.times, self.extra, self.gpm_points = [], [], [], []
        self._gpm_free(self._gpm_prev)
        self._gpm_prev = self._gpm_take() if self.handles and self.gpm_reason is None else None

    def end(self) -> None:
        self._gpm_free(self._gpm_prev)
        self._gpm_prev = None

    def sample(self) -> None:
        """读一次（采样线程调用；测试直接调用）。"""
        nvml = self.nvml
        self.times.append(self.clock())
        self.samples.append(float(np.mean([nvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles])))
        sm = self._read_extra("sm", lambda: float(np.mean([nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)
                                                            for h in self.handles])))
        power = self._read_extra("power", lambda: sum(nvml.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000.0)
        bits = None
        if self._reasons_fn is not None:
            bits = self._read_extra("reasons", lambda: int(np.bitwise_or.reduce([int(self._reasons_fn(h))
                                                                                 for h in self.handles])))
        # 显存时钟：两台 H200 的离线 b64 差 1.46 倍而 SM 都在满频（2026-11-28），下次分得出是不是显存那边
        mem = self._read_extra("mem", lambda: float(np.mean([nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)
                                                             for h in self.handles])))
        self.extra.append((sm, power, bits, mem))
        gpm: Dict[str, Optional[float]] = {}
        if self._gpm_prev is not None:
            cur = self._gpm_take()
            if cur is not None:
                m = self._gpm_metrics(self._gpm_prev, cur)
                if m is None:  # 读数失败（原因已记下）：这个窗口里不再取样，以后的窗口 begin() 也不取
                    self._gpm_free(cur)
                    cur = None
                gpm = m or {}
            self._gpm_free(self._gpm_prev)
            self._gpm_prev = cur
        self.gpm_points.append(gpm)

    def _run(self) -> None:
        try:
            self.begin()
            while not self._stop.wait(self.interval):
                self.sample()
        except Exception as e:  # pragma: no cover
            self.reason = f"NVML 读数失败：{e}"
        finally:
            self.end()

    def __enter__(self) -> "GpuSampler":
        self.samples, self.times, self.extra, self.gpm_points = [], [], [], []
        if self.handles:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread:
            self._stop.set()
            self._thread.join(timeout=5.0)  # NVML 调用卡住时不拖住整轮测量（采样线程是守护线程）
            if self._thread.is_alive():
                self.reason = "NVML 采样线程 5 s 内没有结束：这个点的 GPU 利用率不可信"
                self.gpm_reason = self.gpm_reason or "NVML 采样线程卡住过，之后不再读 GPM"
                self.samples, self.times, self.extra, self.gpm_points = [], [], [], []

    def result(self, window: Optional[Tuple[float, float]] = None) -> Dict[str, Any]:
        """window = (t0, t1)：只算这段时间里的样本（负载期间；没有落在里面的样本时用全部）。
        util_mean_all 是整个采样窗口的平均（含发压进程启动与收尾的空闲），供对照以前的数字。"""
        idx = list(range(len(self.samples)))
        if window is not None:
            inside = [i for i in idx if window[0] <= self.times[i] <= window[1]]
            idx = inside or idx
        gpm_vals = {k: [self.gpm_points[i][k] for i in idx if self.gpm_points[i].get(k) is not None]
                    for k in GPM_METRICS}
        gpm = {k: float(np.mean(v)) if v else None for k, v in gpm_vals.items()}
        missing = [f"{k}（NVML 返回 {self.gpm_missing[k]}）" for k in GPM_METRICS if gpm[k] is None and k in self.gpm_missing]
        if any(v is not None for v in gpm.values()):
            gpm["gpm_reason"] = (("读不到：" + "、".join(missing)) if missing else None) or \
                (f"{self.gpm_reason}（之前的读数照算）" if self.gpm_reason else None)
        else:
            gpm["gpm_reason"] = self.gpm_reason or ("读不到：" + "、".join(missing) if missing else
                                                    "GPM 没有读数" if self.samples and self.handles else None)
        if not idx:
            return {"util_mean": None, "reason": self.reason or "采样窗口太短"} | gpm
        util = [self.samples[i] for i in idx]
        out = {"util_mean": float(np.mean(util)), "util_p50": float(np.median(util)), "samples": len(util),
               "util_mean_all": float(np.mean(self.samples)), "samples_all": len(self.samples),
               "device": self.name} | gpm
        busy = [self.extra[i] for i in idx if self.samples[i] >= BUSY_UTIL]
        sm = [e[0] for e in busy if e[0] is not None]
        power = [e[1] for e in busy if e[1] is not None]
        bits = [e[2] for e in busy if e[2] is not None]
        mem = [e[3] for e in busy if e[3] is not None]
        # 忙时：SM 时钟与功耗的中位数、限频原因出现在多少比例的忙样本里（没有忙样本时这几项为 None / 空）
        out |= {"busy_samples": len(busy), "sm_clock_mhz": float(np.median(sm)) if sm else None,
                "sm_clock_min_mhz": float(min(sm)) if sm else None, "sm_clock_max_mhz": self.max_sm_mhz,
                "power_w": float(np.median(power)) if power else None, "power_limit_w": self.power_limit_w,
                "mem_clock_mhz": float(np.median(mem)) if mem else None,
                "clock_limits": {name: round(sum(bool(b & bit) for b in bits) / len(bits), 3)
                                 for bit, name in CLOCK_LIMIT_REASONS.items() if any(b & bit for b in bits)}}
        return out


def _proc_name(pid: int) -> str:
    import psutil

    try:
        return psutil.Process(pid).name()
    except psutil.Error:  # 别的用户 / 别的容器的进程（NVML 在容器里可能给出宿主机的进程号）
        return "?"


def gpu_processes(sampler, own_pids: Optional[set] = None) -> Dict[str, Any]:
    """此刻 GPU 上的计算进程（NVML）：[{gpu, pid, name, used_mib, ours}]。own_pids：本次测量自己的进程（压测进程、
    tritonserver 与存根、MPS 服务器）；不在其中的记 ours=False。own_pids=None（压已在运行的服务器，benchmark.url）时分不出
    哪些是被测服务器的，除本进程外都记 ours=None（摘要不标）。

    在主线程里调用（GpuSampler 的其余 NVML 调用都在采样线程里）：只在每次重复开始、没有采样线程在跑时调用；
    上一个点的采样线程卡在 NVML 里没结束时不调用（否则这里也可能卡住），reason 写明。

    为什么：同一台机器、同一设置的数字有时差很多（2026-11-28 H200 第 3 台：开着 MPS 的前两次重复 500 req/s 的 P50 是
    10.1 ms，第三次与上一阶段都是 7.3 ms；两台 H200 的离线 b64 差 1.46 倍），而报告里看不出当时 GPU 上还有什么——
    例如上一组没退干净的存根、别的租户。读不到时给出原因。"""
    if not getattr(sampler, "handles", None):
        return {"processes": [], "reason": getattr(sampler, "reason", None) or "没有 GPU"}
    thread = getattr(sampler, "_thread", None)
    if thread is not None and thread.is_alive():
        return {"processes": [], "reason": "上一个点的 NVML 采样线程还没结束，没有取进程列表"}
    nvml = sampler.nvml
    me = os.getpid()
    out = []
    try:
        for i, h in enumerate(sampler.handles):
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(h):
                used = getattr(p, "usedGpuMemory", None)
                pid = int(p.pid)
                ours = True if pid == me else (None if own_pids is None else pid in own_pids)
                out.append({"gpu": i, "pid": pid, "name": _proc_name(pid),
                            "used_mib": round(used / 2 ** 20, 1) if isinstance(used, int) else None, "ours": ours})
    except Exception as e:  # noqa: BLE001  有的驱动 / 容器不给进程列表
        return {"processes": out, "reason": f"读不到 GPU 上的进程：{e}"}
    return {"processes": out, "reason": None}


def foreign_processes_note(snapshot: Dict[str, Any]) -> str:
    """不属于本次测量的 GPU 进程，一句话；没有时空串。"""
    others = [p for p in (snapshot or {}).get("processes", []) if p.get("ours") is False]
    if not others:
        return ""
    items = "，".join(f"{p['pid']}（{p['name']}，{p['used_mib'] if p['used_mib'] is not None else '?'} MiB）" for p in others[:5])
    return (f"GPU 上另有 {len(others)} 个计算进程：{items}（不是本次压测、服务器或它的 MPS 服务器的进程号；"
            "容器里 NVML 可能给出宿主机的进程号，那时这里也会列出自己的进程）")


def clock_note(gpu: Dict[str, Any]) -> str:
    """一行说明忙时的时钟与功耗（报告用）；没有读数时空串。"""
    sm = gpu.get("sm_clock_mhz")
    if sm is None:
        return ""
    top = gpu.get("sm_clock_max_mhz")
    text = f"忙时 SM {sm:.0f}" + (f"/{top:.0f}" if top else "") + " MHz"
    if gpu.get("power_w") is not None:
        text += f"、{gpu['power_w']:.0f}" + (f"/{gpu['power_limit_w']:.0f}" if gpu.get("power_limit_w") else "") + " W"
    if gpu.get("mem_clock_mhz") is not None:
        text += f"、显存 {gpu['mem_clock_mhz']:.0f} MHz"
    limits = gpu.get("clock_limits") or {}
    if limits:
        text += "、限频 " + " ".join(f"{k} {v:.0%}" for k, v in limits.items())
    return text


_METRIC_RE = re.compile(r'^(ugt_engine_[a-z_]+)\{([^}]*)\}\s+([0-9.eE+-]+)$')


class EngineMetricsScraper:
    """抓 /metrics 里引擎运行器的累计计数（各实例相加），两次之差除以 execute 数得到“服务中的一批”。

    引擎在后台线程里每 0.1 s 写一次指标（runtime/glue.EngineMetrics.FLUSH_S）：负载点结束后先等 FLUSH_WAIT_S 再抓。"""

    FLUSH_WAIT_S = 0.3

    def __init__(self, metrics_url: Optional[str]):
        self.url = metrics_url

    def snapshot(self) -> Dict[str, float]:
        if not self.url:
            return {}
        try:
            with urllib.request.urlopen(self.url, timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return {}
        out: Dict[str, float] = {}
        for line in text.splitlines():
            m = _METRIC_RE.match(line.strip())
            if not m:
                continue
            name, labels, value = m.groups()
            extra = dict(kv.split("=", 1) for kv in labels.split(",") if "=" in kv)
            key = name[len("ugt_engine_"):]
            for lk in ("stage", "kind"):
                if lk in extra:
                    key += ":" + extra[lk].strip('"')
            out[key] = out.get(key, 0.0) + float(value)
        return out

    @staticmethod
    def delta(before: Dict[str, float], after: Dict[str, float]) -> Optional[Dict[str, Any]]:
        d = {k: after[k] - before.get(k, 0.0) for k in after}
        n = d.get("executes_total", 0.0)
        if n <= 0:
            return None
        per = lambda k: d.get(k, 0.0) / n  # noqa: E731
        valid, padded = d.get("tokens_total:valid", 0.0), d.get("tokens_total:padded", 0.0)
        return {"executes": int(n), "requests_per_execute": per("requests_total"), "rows_per_execute": per("rows_total"),
                "launches_per_execute": per("groups_total"),
                "padding_share": (1 - valid / padded) if padded else None,
                **{f"{s}_ms": per(f"ms_total:{s}") for s in ("host", "device", "copy_back", "respond", "execute",
                                                             "gpu_gap")}}
