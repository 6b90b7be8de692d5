"""NVML 采样（bench/stats.GpuSampler）：利用率之外，忙时的 SM 时钟、功耗与限频原因；读不到的项只少这一项。"""
import types

import pytest

from algorithm.serving.bench.stats import GpuSampler, clock_note


def fake_nvml(readings, power=True, reasons=True):
    """readings：每次采样的 (利用率 %, SM MHz, 功耗 mW, 限频原因位)，按顺序给出；一块 GPU。"""
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
        nvmlDeviceGetClockInfo=lambda h, kind: state["now"][1],
        nvmlDeviceGetPowerUsage=(lambda h: state["now"][2]) if power else no)
    if reasons:
        nvml.nvmlDeviceGetCurrentClocksEventReasons = lambda h: state["now"][3]
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
    nvmlGpmMetricsGet 像 NVML 一样由两个样本之差算出百分比（SM 活跃 = 忙 / 时间，占用恒为 30，张量核 = SM 活跃的一半）。"""

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
        sm = 100.0 * (s2["busy"] - s1["busy"]) / (s2["t"] - s1["t"])
        values = {self.SM: sm, self.OCC: 30.0, self.TENSOR: sm / 2}
        for m in mg.metrics[:mg.numMetrics]:
            self.requested.append(m.metricId)
            m.nvmlReturn, m.value = (999, 0.0) if m.metricId in self.broken else (0, values[m.metricId])
        return mg


def test_gpm_window_averages_the_gpus_and_frees_its_samples():
    gpm = FakeGpm(devices=2)
    g = GpuSampler(interval=60, nvml=gpm.install(fake_nvml([])))
    assert g.gpm_reason is None
    with g:
        gpm.run(0, 2.0, 0.9)
        gpm.run(1, 2.0, 0.5)
    r = g.result()
    assert r["sm_active"] == 70.0 and r["tensor_active"] == 35.0 and r["sm_occupancy"] == 30.0
    assert r["gpm_reason"] is None
    assert gpm.allocated == gpm.freed == 4  # 2 块 GPU × 窗口前后
    assert sorted(set(gpm.requested)) == [FakeGpm.SM, FakeGpm.OCC, FakeGpm.TENSOR]
    with g:  # 下一个窗口只算自己的那段
        gpm.run(0, 1.0, 0.2)
        gpm.run(1, 1.0, 0.2)
    assert g.result()["sm_active"] == pytest.approx(20.0)


def test_gpm_unavailable_is_explained_and_the_rest_still_works():
    g = GpuSampler(interval=60, nvml=FakeGpm(supported=False).install(fake_nvml([(90, 1980, 600_000, 0)])))
    with g:
        pass
    g.sample()
    r = g.result()
    assert r["util_mean"] == 90 and r["sm_active"] is None and "不支持 GPM" in r["gpm_reason"]
    # 没有权限读性能计数器：第一次取样失败后记下原因、不再取样
    gpm = FakeGpm(sample_error="NVML_ERROR_NO_PERMISSION")
    g = GpuSampler(interval=60, nvml=gpm.install(fake_nvml([])))
    with g:
        pass
    with g:
        pass
    r = g.result()
    assert r["sm_active"] is None and "NO_PERMISSION" in r["gpm_reason"]
    assert gpm.allocated == gpm.freed == 1


def test_gpm_metric_not_returned_for_one_gpu_is_none():
    gpm = FakeGpm(devices=2, broken={FakeGpm.TENSOR})
    g = GpuSampler(interval=60, nvml=gpm.install(fake_nvml([])))
    with g:
        gpm.run(0, 1.0, 0.6)
        gpm.run(1, 1.0, 0.6)
    r = g.result()
    assert r["sm_active"] == 60.0 and r["tensor_active"] is None
