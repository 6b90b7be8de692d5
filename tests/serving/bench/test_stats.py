"""NVML 采样（bench/stats.GpuSampler）：利用率之外，忙时的 SM 时钟、功耗与限频原因；读不到的项只少这一项。"""
import types

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
