"""构建后的速度检查：比值与警告的逻辑（假的吞吐），跳过的原因，以及在 CPU 上用假的计时跑完整个钩子。"""
import numpy as np
import pytest

from algorithm.serving import speed_check


def test_compare_reports_ratios_and_warns_where_8bit_is_slower():
    r = speed_check.compare({8: 800.0, 16: 1500.0, 64: 6500.0}, {8: 1000.0, 16: 1500.0, 64: 5000.0}, "fp8")
    assert r["batches"]["8"]["ratio"] == pytest.approx(0.8)
    assert r["batches"]["64"]["ratio"] == pytest.approx(1.3)
    assert r["slower_batches"] == [8] and not r["faster_everywhere"]
    warnings = [s for s in r["lines"] if s.strip().startswith("警告")]
    assert len(warnings) == 1
    assert "batch 8" in warnings[0] and "慢 20 %" in warnings[0] and "800 对 1000" in warnings[0]
    assert "b8 0.80 倍" in r["lines"][0] and "b64 1.30 倍" in r["lines"][0]
    # 同样快不算慢；处处更快时没有警告
    r = speed_check.compare({8: 1000.0}, {8: 1000.0}, "int8")
    assert r["faster_everywhere"] and not any("警告" in s for s in r["lines"])


def _config(tmp_path, precision, **engine):
    from conftest import tiny_config

    from algorithm.serving.config import EngineConfig, ExportConfig, TritonConfig

    return tiny_config(str(tmp_path), export=ExportConfig(precision=precision, max_batch_size=16, max_seq_length=64),
                       engine=EngineConfig(kind="torch", device="cpu", compile_mode="none", cuda_graphs=False,
                                           batch_buckets=[2, 16], seq_buckets=[64], **engine),
                       triton=TritonConfig(instance_count=1, preferred_batch_sizes=[2, 16]))


def test_skip_reasons(tmp_path):
    assert "不是 8 位" in speed_check.skip_reason(_config(tmp_path, "fp16"), "cuda")
    assert "设备是 cpu" in speed_check.skip_reason(_config(tmp_path, "int8"), "cpu")
    assert "speed_check=on" in speed_check.skip_reason(_config(tmp_path, "int8"), "cpu")
    assert speed_check.skip_reason(_config(tmp_path, "int8", speed_check="on"), "cpu") is None
    assert speed_check.skip_reason(_config(tmp_path, "fp8"), "cuda") is None
    assert "off" in speed_check.skip_reason(_config(tmp_path, "fp8", speed_check="off"), "cuda")


def test_sample_batches_follow_the_length_distribution_and_are_reproducible(tmp_path):
    cfg = _config(tmp_path, "int8")
    a = speed_check.sample_batches(cfg, 16, 3)
    b = speed_check.sample_batches(cfg, 16, 3)
    assert len(a) == 3 and all(f["encoder_mask"].shape[0] == 16 for f in a)
    assert all(np.array_equal(x["encoder_l1_ids"], y["encoder_l1_ids"]) for x, y in zip(a, b))
    lengths = np.concatenate([f["encoder_mask"].sum(1) for f in a])
    assert lengths.min() >= 1 and lengths.max() <= 64 and len(set(lengths.tolist())) > 1


class _FakeRunner:
    def __init__(self, per_row):
        self.per_row = per_row
        self.device = type("D", (), {"type": "cpu"})()
        self.calls = []


def test_check_runs_the_hook_with_a_fake_measure_and_logs_the_warning(tmp_path):
    cfg = _config(tmp_path, "int8", speed_check="on", speed_check_batches=[8, 64], speed_check_repeats=3)
    cand, base = _FakeRunner(2e-3), _FakeRunner(1e-3)  # 8 位慢一倍

    def measure(runner, feeds):
        runner.calls.append(feeds["encoder_mask"].shape)
        return runner.per_row * feeds["encoder_mask"].shape[0]

    lines = []
    r = speed_check.check(cfg, None, cand, str(tmp_path), lines.append, measure=measure,
                          make_baseline=lambda *a: (base, "fp32"))
    assert r["baseline"] == "fp32" and r["slower_batches"] == [8, 16]  # 64 > max_batch_size 16：取 16
    assert r["batches"]["16"]["ratio"] == pytest.approx(0.5)
    assert sum("警告" in s and "慢 50 %" in s for s in lines) == 2
    assert len(cand.calls) == len(base.calls) == 2 * (3 + 1)  # 每个 batch 预热 1 批 + 3 批
    assert cand.calls == base.calls  # 两个引擎跑同样的批
    assert speed_check.check(_config(tmp_path, "fp16"), None, cand, str(tmp_path), lines.append) is None
    skipped = speed_check.check(_config(tmp_path, "int8"), None, cand, str(tmp_path), lines.append)
    assert "speed_check=on" in skipped["skipped"] and "跳过" in lines[-1]
