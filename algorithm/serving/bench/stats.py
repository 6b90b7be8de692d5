"""同一时间窗里的服务端数字：Triton 统计 API（每个模型的排队、计算时间与平均 batch）、
引擎运行器的自定义指标（/metrics 里的 ugt_engine_*，见 runtime/glue.EngineMetrics）、NVML 的 GPU 利用率。"""
from __future__ import annotations

import re
import threading
import urllib.request
from typing import Any, Dict, List, Optional

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
            self._thread.join(timeout=5.0)  # NVML 调用卡住时不拖住整轮测量（采样线程是守护线程）
            if self._thread.is_alive():
                self.reason = "NVML 采样线程 5 s 内没有结束：这个点的 GPU 利用率不可信"
                self.samples = []

    def result(self) -> Dict[str, Any]:
        if not self.samples:
            return {"util_mean": None, "reason": self.reason or "采样窗口太短"}
        return {"util_mean": float(np.mean(self.samples)), "util_p50": float(np.median(self.samples)),
                "samples": len(self.samples), "device": self.name}


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
