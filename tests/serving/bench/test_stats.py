"""NVML 采样（bench/stats.GpuSampler）：利用率之外，忙时的 SM 时钟、功耗与限频原因；读不到的项只少这一项。"""
import types

import pytest

from algorithm.serving.bench.stats import GpuSampler, clock_note


def fake_nvml(readings, power=True, reasons=True, mem_mhz=None):
    """readings：每次采样的 (利用率 %, SM MHz, 功耗 mW, 限频原因位)，按顺序给出；一块 GPU。
    mem_mhz：显存时钟（给出时才有 NVML_CLOCK_MEM，像支持它的 NVML）。"""
    it = iter(readings)
    state = {}

    def util(h):
        state["now"] = next(it)
        return types.SimpleNamespace(gpu=state["now"][0])

    def no(*a):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    nvml = types.SimpleNamespace(
        NVML_CLOCK_SM=1, nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1,
        nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: b"NVIDIA H200",
        nvmlDeviceGetMaxClockInfo=lambda h, kind: 1980, nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetUtilizationRates=util,
        nvmlDeviceGetClockInfo=lambda h, kind: mem_mhz if kind == 2 else state["now"][1],
        nvmlDeviceGetPowerUsage=(lambda h: state["now"][2]) if power else no)
    if reasons:
        nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: state["now"][3]
    if mem_mhz is not None:
        nvml.NVML_CLOCK_MEM = 2
    return nvml


def test_clock_and_power_are_taken_from_busy_samples_only():
    # 两个空闲样本（时钟低，不该算进去）、四个忙样本，其中一半带 SwPowerCap（0x4），一个带 GpuIdle（0x1，不算限频）
    readings = [(0, 345, 80_000, 0x1), (3, 345, 80_000, 0x1),
                (90, 1980, 650_000, 0), (95, 1755, 700_000, 0x4), (97, 1700, 700_000, 0x4), (80, 1980, 600_000, 0)]
    g = GpuSampler(nvml=fake_nvml(readings))
    for _ in readings:
        g.sample()
    r = g.result()
    assert r["device"] == "NVIDIA H200" and r["samples"] == 6 and r["busy_samples"] == 4
    assert r["sm_clock_mhz"] == (1755 + 1980) / 2 and r["sm_clock_min_mhz"] == 1700 and r["sm_clock_max_mhz"] == 1980
    assert r["power_w"] == 675.0 and r["power_limit_w"] == 700.0
    assert r["clock_limits"] == {"SwPowerCap": 0.5}
    assert clock_note(r) == "忙时 SM 1868/1980 MHz、675/700 W、限频 SwPowerCap 50%"


def test_memory_clock_is_reported_when_nvml_has_it():
    readings = [(0, 345, 80_000, 0x1), (90, 1980, 650_000, 0)]
    g = GpuSampler(nvml=fake_nvml(readings, mem_mhz=3201))
    for _ in readings:
        g.sample()
    r = g.result()
    assert r["mem_clock_mhz"] == 3201 and clock_note(r) == "忙时 SM 1980/1980 MHz、650/700 W、显存 3201 MHz"


def test_unsupported_readings_leave_utilization_intact():
    readings = [(90, 1980, 0, 0), (92, 1980, 0, 0)]
    g = GpuSampler(nvml=fake_nvml(readings, power=False, reasons=False))
    for _ in readings:
        g.sample()
    r = g.result()
    assert r["util_mean"] == 91 and r["sm_clock_mhz"] == 1980
    assert r["power_w"] is None and r["clock_limits"] == {}
    assert clock_note(r) == "忙时 SM 1980/1980 MHz"


def test_idle_window_has_no_clock_note():
    readings = [(0, 345, 80_000, 0x1)]
    g = GpuSampler(nvml=fake_nvml(readings))
    g.sample()
    r = g.result()
    assert r["busy_samples"] == 0 and r["sm_clock_mhz"] is None and clock_note(r) == ""
    assert GpuSampler(nvml=fake_nvml([])).result()["util_mean"] is None  # 没有样本：照旧给出原因


# ---------------------------------------------------------------- GPM：窗口前后各一个样本

class FakeGpm:
    """NVML 的 GPM 接口的替身：每块 GPU 有累计的时间与 SM 忙计数，样本记下取样时的计数，
    nvmlGpmMetricsGet 像 NVML 一样由两个样本之差算出百分比（SM 活跃 = 忙 / 时间，占用恒为 30，张量核 = SM 活跃的一半）。
    broken：{(GPU 序号, 指标)} 这几项返回错误码 999。"""

    SM, OCC, TENSOR = 2, 3, 5

    def __init__(self, devices=1, supported=True, sample_error=None, broken=()):
        self.counters = [{"t": 0.0, "busy": 0.0} for _ in range(devices)]
        self.supported, self.sample_error, self.broken = supported, sample_error, set(broken)
        self.allocated, self.freed, self.requested = 0, 0, []

    def install(self, nvml):
        nvml.nvmlDeviceGetCount = lambda: len(self.counters)
        nvml.NVML_SUCCESS, nvml.NVML_GPM_METRICS_GET_VERSION = 0, 1
        nvml.NVML_GPM_METRIC_SM_UTIL, nvml.NVML_GPM_METRIC_SM_OCCUPANCY = self.SM, self.OCC
        nvml.NVML_GPM_METRIC_ANY_TENSOR_UTIL = self.TENSOR
        nvml.nvmlGpmQueryDeviceSupport = lambda h: types.SimpleNamespace(isSupportedDevice=int(self.supported))
        nvml.nvmlGpmSampleAlloc = self.alloc
        nvml.nvmlGpmSampleGet = self.get
        nvml.nvmlGpmSampleFree = self.free
        nvml.c_nvmlGpmMetricsGet_t = lambda: types.SimpleNamespace(
            metrics=[types.SimpleNamespace(metricId=None, nvmlReturn=None, value=None) for _ in range(8)])
        nvml.nvmlGpmMetricsGet = self.metrics
        return nvml

    def alloc(self):
        self.allocated += 1
        return {}

    def get(self, h, sample):
        if self.sample_error:
            raise RuntimeError(self.sample_error)
        sample |= {"dev": h} | self.counters[h]

    def free(self, sample):
        self.freed += 1

    def run(self, dev, seconds, busy_share):
        self.counters[dev]["t"] += seconds
        self.counters[dev]["busy"] += seconds * busy_share

    def metrics(self, mg):
        s1, s2 = mg.sample1, mg.sample2
        assert s1["dev"] == s2["dev"] and mg.version == 1
        dt = s2["t"] - s1["t"]
        sm = 100.0 * (s2["busy"] - s1["busy"]) / dt if dt else 0.0
        values = {self.SM: sm, self.OCC: 30.0, self.TENSOR: sm / 2}
        for m in mg.metrics[:mg.numMetrics]:
            self.requested.append(m.metricId)
            m.nvmlReturn, m.value = (999, 0.0) if (s1["dev"], m.metricId) in self.broken else (0, values[m.metricId])
        return mg


def ticking(g, gpm, steps):
    """替身时钟：每次 sample 前让每块 GPU 各“跑”一段，steps = [(秒, [各 GPU 的 SM 忙比例]), ...]。"""
    g.begin()
    for seconds, shares in steps:
        for dev, share in enumerate(shares):
            gpm.run(dev, seconds, share)
        g.sample()
    g.end()


def test_gpm_is_read_between_samples_averaged_over_gpus_and_freed():
    gpm = FakeGpm(devices=2)
    g = GpuSampler(nvml=gpm.install(fake_nvml([(90, 1980, 600_000, 0)] * 6)))  # 3 次采样 × 2 块 GPU
    assert g.gpm_reason is None
    ticking(g, gpm, [(0.1, [0.9, 0.5]), (0.1, [0.9, 0.5])])
    r = g.result()
    assert r["sm_active"] == pytest.approx(70.0) and r["tensor_active"] == pytest.approx(35.0)
    assert r["sm_occupancy"] == 30.0 and r["gpm_reason"] is None
    assert gpm.allocated == gpm.freed == 6  # 2 块 GPU × （开始 + 2 次采样）
    assert sorted(set(gpm.requested)) == [FakeGpm.SM, FakeGpm.OCC, FakeGpm.TENSOR]
    ticking(g, gpm, [(0.1, [0.2, 0.2])])  # 下一个窗口只算自己的那段
    assert g.result()["sm_active"] == pytest.approx(20.0)


def test_only_samples_inside_the_load_window_count():
    """发压进程启动与收尾时 GPU 空着：result(window) 只平均负载期间的样本，util_mean_all 保留整个窗口的平均。"""
    now = {"t": 0.0}
    gpm = FakeGpm()
    readings = [(0, 345, 80_000, 0x1)] * 3 + [(90, 1980, 650_000, 0)] * 4 + [(0, 345, 80_000, 0x1)] * 3
    g = GpuSampler(nvml=gpm.install(fake_nvml(readings)), clock=lambda: now["t"])
    g.begin()
    for i, (util, *_rest) in enumerate(readings):
        now["t"] = 10.0 + 0.1 * i
        gpm.run(0, 0.1, 0.8 if util else 0.0)
        g.sample()
    g.end()
    r = g.result(window=(10.25, 10.65))  # 第 4–7 个样本（10.3 .. 10.6）
    assert r["samples"] == 4 and r["util_mean"] == 90 and r["samples_all"] == 10 and r["util_mean_all"] == 36
    assert r["sm_active"] == pytest.approx(80.0)  # GPM 也只算窗口里的几段
    assert g.result()["sm_active"] == pytest.approx(32.0)
    assert g.result(window=(50.0, 60.0))["samples"] == 10  # 没有样本落在里面：用全部（不丢掉这个点）


def test_gpm_unavailable_is_explained_and_the_rest_still_works():
    g = GpuSampler(nvml=FakeGpm(supported=False).install(fake_nvml([(90, 1980, 600_000, 0)])))
    g.begin()
    g.sample()
    g.end()
    r = g.result()
    assert r["util_mean"] == 90 and r["sm_active"] is None and "不支持 GPM" in r["gpm_reason"]
    # 没有权限读性能计数器：第一次取样失败后记下原因、不再取样
    gpm = FakeGpm(sample_error="NVML_ERROR_NO_PERMISSION")
    g = GpuSampler(nvml=gpm.install(fake_nvml([(90, 1980, 600_000, 0)] * 2)))
    ticking(g, gpm, [(0.1, [0.5])])
    ticking(g, gpm, [(0.1, [0.5])])
    r = g.result()
    assert r["util_mean"] == 90 and r["sm_active"] is None and "NO_PERMISSION" in r["gpm_reason"]
    assert gpm.allocated == gpm.freed == 1


def test_gpm_read_failure_stops_sampling_gpm_for_the_rest_of_the_window():
    gpm = FakeGpm()
    calls = []

    def failing(mg):
        calls.append(1)
        raise RuntimeError("NVML_ERROR_UNKNOWN")

    nvml = gpm.install(fake_nvml([(90, 1980, 600_000, 0)] * 4))
    nvml.nvmlGpmMetricsGet = failing
    g = GpuSampler(nvml=nvml)
    ticking(g, gpm, [(0.1, [0.5])] * 3)
    ticking(g, gpm, [(0.1, [0.5])])  # 下一个窗口不再取 GPM 样本
    r = g.result()
    assert len(calls) == 1 and gpm.allocated == gpm.freed == 2  # 开始一个 + 第 1 次采样一个，之后不再取
    assert r["util_mean"] == 90 and r["sm_active"] is None and "NVML_ERROR_UNKNOWN" in r["gpm_reason"]


def test_gpm_failure_after_good_readings_keeps_them_and_says_so():
    gpm = FakeGpm()
    nvml = gpm.install(fake_nvml([(90, 1980, 600_000, 0)] * 3))
    g = GpuSampler(nvml=nvml)
    g.begin()
    gpm.run(0, 0.1, 0.5)
    g.sample()  # 一个好的读数
    nvml.nvmlGpmMetricsGet = lambda mg: (_ for _ in ()).throw(RuntimeError("NVML_ERROR_UNKNOWN"))
    gpm.run(0, 0.1, 0.5)
    g.sample()
    g.end()
    r = g.result()
    assert r["sm_active"] == pytest.approx(50.0)
    assert r["gpm_reason"] == "GPM 读数失败：NVML_ERROR_UNKNOWN（之前的读数照算）"


def test_gpm_metric_missing_on_one_gpu_is_none_with_the_nvml_code():
    gpm = FakeGpm(devices=2, broken={(1, FakeGpm.TENSOR)})  # 只有第 2 块 GPU 读不到张量核那一项
    g = GpuSampler(nvml=gpm.install(fake_nvml([(90, 1980, 600_000, 0)] * 2)))  # 1 次采样 × 2 块 GPU
    ticking(g, gpm, [(1.0, [0.6, 0.6])])
    r = g.result()
    assert r["sm_active"] == 60.0 and r["tensor_active"] is None
    assert r["gpm_reason"] == "读不到：tensor_active（NVML 返回 999）"


def test_sampler_thread_takes_gpm_and_util_samples():
    """真的采样线程：with 块里每 interval 秒一次，GPM 的取样也在线程里（主线程不调 NVML）。"""
    import threading
    import time

    gpm = FakeGpm()
    main = threading.get_ident()
    seen = []
    take = gpm.get
    gpm.get = lambda h, sample: (seen.append(threading.get_ident()), take(h, sample))
    g = GpuSampler(interval=0.01, nvml=gpm.install(fake_nvml([(50, 1980, 600_000, 0)] * 1000)))
    with g:
        time.sleep(0.1)
    r = g.result()
    assert r["samples"] >= 3 and r["util_mean"] == 50 and seen and main not in seen
    assert gpm.allocated == gpm.freed


def test_measure_averages_gpu_over_the_load_and_sla_result_keeps_gpm():
    """Benchmark._measure 把负载的时间窗 [计划起点, 最后一个回答] 交给 GpuSampler；SLA 的结果带上该点的 SM 活跃与张量核活跃。"""
    import numpy as np

    from algorithm.serving.bench.suite import Benchmark
    from algorithm.serving.config import BenchmarkConfig

    class Gpu:
        windows = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

        def result(self, window=None):
            self.windows.append(window)
            return {"util_mean": 80.0, "sm_active": 61.0, "tensor_active": 12.0}

    b = Benchmark.__new__(Benchmark)
    b.cfg = BenchmarkConfig(sla_start_rate=100.0, sla_steps=0, max_error_rate=0.01)
    b.progress, b.on_point, b.gpu = False, None, Gpu()
    b.stats = types.SimpleNamespace(snapshot=lambda: {})
    b.engine_metrics = types.SimpleNamespace(url=None, snapshot=lambda: {})
    n = 500
    intended = 100.0 + np.arange(n) / 100.0  # 5 s 的负载，从 100.0 s 开始
    b._run_workers = lambda specs: [{"intended": intended, "sent": intended, "done": intended + 0.005,
                                     "failed": np.full(n, np.nan), "errors": {}, "start_at": 100.0,
                                     "cpu_util": 0.1}]
    p = b._measure([], {"mode": "open", "offered_rate": 100.0})
    assert b.gpu.windows[-1] == (100.0, intended[-1] + 0.005) and p["gpu"]["sm_active"] == 61.0
    # SLA 搜索：100/s 达标、200/s 不达标（替身：按速率决定 P99 上界），确认点的 GPM 进结果
    b.open_loop = lambda rate, **kw: {"offered_rate": rate, "throughput": rate, "ok": 1000, "sent": 1000,
                                      "error_rate": 0.0, "p99_ci": {"high": 10.0 if rate <= 100 else 50.0},
                                      "latency_ms": {"p99": 9.0, "p50": 5.0}, "server": {},
                                      "gpu": {"util_mean": 80.0, "sm_active": 61.0, "tensor_active": 12.0}}
    sla = b.sla_search(30.0)
    assert sla["max_rate"] == 100.0 and sla["gpu_sm_active"] == 61.0 and sla["gpu_tensor_active"] == 12.0


# ---------------------------------------------------------------- GPU 上的进程快照

def test_gpu_process_snapshot_marks_our_processes_and_names_the_others(monkeypatch):
    import os

    from algorithm.serving.bench.stats import foreign_processes_note, gpu_processes

    nvml = fake_nvml([])
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=512 * 2 ** 20),
        types.SimpleNamespace(pid=4242, usedGpuMemory=2048 * 2 ** 20),
        types.SimpleNamespace(pid=999_999_999, usedGpuMemory=None)]  # 别的容器的进程号：/proc 里没有
    g = GpuSampler(nvml=nvml)
    snap = gpu_processes(g, own_pids={4242})
    assert snap["reason"] is None
    assert [(p["pid"], p["ours"], p["used_mib"]) for p in snap["processes"]] == \
        [(os.getpid(), True, 512.0), (4242, True, 2048.0), (999_999_999, False, None)]
    assert snap["processes"][2]["name"] == "?"
    note = foreign_processes_note(snap)
    assert note.startswith("GPU 上另有 1 个计算进程：999999999（?，? MiB）")
    assert foreign_processes_note(gpu_processes(g, own_pids={4242, 999_999_999})) == ""

    def broken(h):
        raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")

    nvml.nvmlDeviceGetComputeRunningProcesses = broken
    assert gpu_processes(g)["reason"].endswith("NVML_ERROR_NOT_SUPPORTED")
    none = fake_nvml([])
    none.nvmlDeviceGetCount = lambda: 0
    assert gpu_processes(GpuSampler(nvml=none)) == {"processes": [], "reason": "NVML 没有发现 GPU"}


def test_each_repeat_records_the_gpu_processes_and_the_summary_flags_others():
    from algorithm.serving.bench.report import summary_table
    from algorithm.serving.bench.suite import run_once
    from algorithm.serving.config import BenchmarkConfig

    nvml = fake_nvml([])
    nvml.nvmlDeviceGetComputeRunningProcesses = lambda h: [types.SimpleNamespace(pid=1234, usedGpuMemory=2 ** 30)]
    bench = types.SimpleNamespace(gpu=GpuSampler(nvml=nvml), own_pids=lambda: {1234})
    cfg = BenchmarkConfig(concurrency=[], rates=[], light_rate=0.0, sla_search=False, floor=False)
    run = run_once(bench, cfg, slo_ms=30.0)
    assert run["gpu_processes"]["processes"][0]["ours"] is True
    bench.own_pids = set
    run2 = run_once(bench, cfg, slo_ms=30.0)
    bench.own_pids = None  # 压已在运行的服务器（benchmark.url）：分不出哪些是它的，不标
    run3 = run_once(bench, cfg, slo_ms=30.0)
    assert run3["gpu_processes"]["processes"][0]["ours"] is None
    text = summary_table({"runs": [run, run2, run3], "headline": {}, "slo_ms": 30.0})
    assert "！第 2 次重复开始时GPU 上另有 1 个计算进程：1234" in text
    assert "第 1 次重复开始时" not in text and "第 3 次重复开始时" not in text
    # 上一个点的采样线程卡在 NVML 里：不在主线程里再调 NVML
    bench.gpu._thread = types.SimpleNamespace(is_alive=lambda: True)
    assert run_once(bench, cfg, slo_ms=30.0)["gpu_processes"] == {
        "processes": [], "reason": "上一个点的 NVML 采样线程还没结束，没有取进程列表"}
