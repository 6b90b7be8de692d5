"""引擎离线吞吐（压测报告的 offline_engine）：混合长度与按长度组两种定义，在 tiny 仓库上跑通且数字自洽。"""
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
    share = out["grouped"]["length_share"]
    assert len(share) >= 2, share  # 长度中位数 30 的分布跨过几个长度组
    for b in (1, 4):
        row = out[str(b)]
        assert row["seconds"] > 0 and row["throughput"] > 0
        # 混合长度的一批按长度组分开启动：b=1 恰好 1 次，b=4 至少 1 次、至多 b 次
        assert row["launches"] == 1 if b == 1 else 1 <= row["launches"] <= b
        g = out["grouped"][str(b)]
        assert set(g["seconds_by_length"]) == set(share) and all(t > 0 for t in g["seconds_by_length"].values())
        assert g["throughput"] > 0
    # 两批同时在途（流水线）：每个 batch 都有数；CPU 上 launch 就算完了，与逐批等完的同一量级
    p = out["pipelined"]
    assert p["depth"] == 2
    for b in (1, 4):
        assert p[str(b)]["throughput"] > 0.3 * out[str(b)]["throughput"], (p, out[str(b)])
