"""引擎离线吞吐（压测报告的 offline_engine）：混合长度与按长度组两种定义，在 tiny 仓库上跑通且数字自洽。"""
import numpy as np

from algorithm.serving.bench.offline import grouped_seconds, offline_engine_throughput
from algorithm.serving.config import BenchmarkConfig


def test_grouped_seconds_warms_up_once_and_rotates_through_each_group():
    calls = []
    per = grouped_seconds({128: ["a", "b", "c"], 16: ["x"]}, 2, 3, calls.append, prepare=tuple)
    assert sorted(per) == [16, 128] and all(t >= 0 for t in per.values())
    # 每组 1 次预热 + 3 次计时；组内轮转取样，prepare 的结果交给 run
    assert calls[:4] == [("x", "x")] * 4
    assert calls[4:] == [("a", "b"), ("c", "a"), ("b", "c"), ("a", "b")]


def test_offline_engine_throughput_on_the_built_repository(built):
    cfg, result = built
    out = offline_engine_throughput(result.repository, [1, 4], BenchmarkConfig(length_median=30),
                                    cfg.export.max_seq_length, repeats=2, samples=40)
    for b in (1, 4):
        row = out[str(b)]
        assert row["throughput"] == row["batch"] / row["seconds"] and row["launches"] >= 1
        g = out["grouped"][str(b)]
        share = out["grouped"]["length_share"]
        assert np.isclose(sum(share.values()), 1.0) and set(g["seconds_by_length"]) == set(share)
        assert np.isclose(g["seconds_weighted"], sum(share[k] * t for k, t in g["seconds_by_length"].items()))
