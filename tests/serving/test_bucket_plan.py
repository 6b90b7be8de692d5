"""长度桶规划：动态规划与穷举一致；默认分布下 4 个规划桶的期望填充计算量低于 [128, 256, 512, 1024]。"""
import itertools

import numpy as np
import pytest

from algorithm.serving.bucket_plan import (DEFAULT_ATTENTION_CROSSOVER, default_lengths, expected_cost, model_cost,
                                           padding_report, plan_seq_buckets)


def _brute_force(lengths, num_buckets, max_len, align, cost):
    cand = [b for b in range(align, max_len, align)] + [max_len]
    best = None
    for k in range(0, num_buckets):
        for inner in itertools.combinations(cand[:-1], k):
            v = expected_cost(lengths, list(inner) + [max_len], cost)
            if best is None or v < best[0] - 1e-9:
                best = (v, list(inner) + [max_len])
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cost", [None, 50.0, DEFAULT_ATTENTION_CROSSOVER])
def test_dp_matches_brute_force(seed, cost):
    rng = np.random.default_rng(seed)
    max_len, align = int(rng.choice([64, 100, 128])), int(rng.choice([8, 16]))
    lengths = rng.integers(1, max_len + 1, size=int(rng.integers(5, 60)))
    k = int(rng.integers(1, 5))
    plan = plan_seq_buckets(lengths, k, max_len, align, cost)
    best_cost, _ = _brute_force(lengths, k, max_len, align, cost)
    assert expected_cost(lengths, plan, cost) == pytest.approx(best_cost, rel=1e-12)
    assert len(plan) <= k


def test_default_distribution_beats_power_of_two_buckets():
    lengths = default_lengths(100, 1.0, 1024, 100_000, seed=0)
    plan = plan_seq_buckets(lengths, 4, 1024)
    fixed = [128, 256, 512, 1024]
    planned, base = padding_report(lengths, plan), padding_report(lengths, fixed)
    print(f"\n规划桶 {plan}：期望代价比 {planned['cost_ratio']:.3f}，填充 token {planned['padded_token_share']:.3f}；"
          f"{fixed}：{base['cost_ratio']:.3f}，{base['padded_token_share']:.3f}")
    assert planned["expected_cost"] < base["expected_cost"]
    assert plan == sorted(set(plan)) and plan[-1] == 1024 and all(b % 16 == 0 for b in plan) and len(plan) == 4
    assert sum(planned["request_share"].values()) == pytest.approx(1.0)
    # 线性代价（只数填充 token）下同样更好
    linear_plan = plan_seq_buckets(lengths, 4, 1024, cost=None)
    assert expected_cost(lengths, linear_plan, None) < expected_cost(lengths, fixed, None)


def test_default_lengths_match_the_benchmark_sampler():
    from algorithm.serving.benchmark import sample_lengths
    from algorithm.serving.config import BenchmarkConfig

    cfg = BenchmarkConfig(length_median=80.0, length_sigma=0.7)
    assert np.array_equal(default_lengths(80.0, 0.7, 512, 1000, seed=5), sample_lengths(cfg, 1000, 512, 5))


def test_model_cost_equals_flops_per_request():
    from algorithm.models.config import preset
    from algorithm.models.ugt import flops_per_request

    for name in ("ugt_tiny", "ugt_base"):
        cfg = preset(name)
        for kv_cache in (True, False):
            fn = model_cost(cfg, kv_cache)
            for n in (1, 37, 128, 1024):
                assert fn(np.array([n]))[0] == pytest.approx(flops_per_request(cfg, n, kv_cache), rel=1e-12)
    # KV 缓存只省解码器的重算：长度 100 时 ugt_base 每请求 20.9 对 31.0 GFLOP
    base = preset("ugt_base")
    assert flops_per_request(base, 100, True) < 0.7 * flops_per_request(base, 100, False)
    # 代价用模型 FLOPs 时也能规划
    plan = plan_seq_buckets(default_lengths(n=5000), 4, 1024, cost=model_cost(preset("ugt_base")))
    assert plan[-1] == 1024 and len(plan) == 4


def test_edge_cases():
    lengths = default_lengths(n=2000)
    assert plan_seq_buckets(lengths, 1, 1024) == [1024]
    # 全部等长：一个紧贴的桶加上 max_len，多余的桶不返回
    assert plan_seq_buckets(np.full(50, 100), 4, 1024) == [112, 1024]
    assert plan_seq_buckets(np.full(50, 1024), 4, 1024) == [1024]
    # max_len 不是 align 的倍数、比 align 小
    assert plan_seq_buckets(np.array([1, 5, 90, 100]), 3, 100, align=16)[-1] == 100
    assert plan_seq_buckets(np.array([1, 3]), 2, 8, align=16) == [8]
    # 桶数多于候选：每个有请求的候选各一个桶，代价等于不填充
    x = np.array([16, 32, 48, 64])
    assert plan_seq_buckets(x, 10, 64) == [16, 32, 48, 64]
    assert padding_report(x, [16, 32, 48, 64])["padded_token_share"] == 0.0
    with pytest.raises(ValueError):
        plan_seq_buckets(np.array([2000]), 4, 1024)
    with pytest.raises(ValueError):
        plan_seq_buckets(lengths, 0, 1024)
    with pytest.raises(ValueError):
        plan_seq_buckets(np.array([], dtype=int), 2, 1024)


def test_execute_padding_counts_groups_batch_buckets_and_packed_rows():
    from algorithm.serving.bucket_plan import execute_padding

    sb, bb = [128, 256, 512, 1024], [2, 4, 8, 16, 32, 64]
    # 全是 128、正好一个 batch 桶：不填充，一组
    r = execute_padding(np.full(10, 128), 8, sb, bb, trials=5)
    assert r["token_ratio"] == 1.0 and r["launches"] == 1.0
    # 长度 100 补到 128、9 行补到 16 行：16 * 128 / 900
    r = execute_padding(np.full(10, 100), 9, sb, bb, trials=5)
    assert r["token_ratio"] == pytest.approx(16 * 128 / 900) and r["launches"] == 1.0
    # 拼行：每行 5 个 100，10 个请求 2 行（batch 桶 2）x 512；长于 512 的照旧按桶分组（一行 1024，补到 2 行）
    r = execute_padding(np.full(10, 100), 10, sb, bb, pack_width=512, trials=5)
    assert r["token_ratio"] == pytest.approx(2 * 512 / 1000) and r["launches"] == 1.0
    r = execute_padding(np.array([600]), 1, sb, bb, pack_width=512, trials=3)
    assert r["token_ratio"] == pytest.approx(2 * 1024 / 600) and r["launches"] == 1.0
    # 实现的拼法（-1）：W = 这次最长者的桶。全是 100 时 W = 128，一行只放得下一条：10 行补到 16，与分组相同（16 * 128 / 1000）
    r = execute_padding(np.full(10, 100), 10, sb, bb, pack_width=-1, trials=3)
    assert r["token_ratio"] == pytest.approx(16 * 128 / 1000) and r["launches"] == 1.0
    # 默认分布下（同一种子）：每次 execute 的填充比 padding_report 的每请求填充多；拼行在 16 个请求时更少、组更少
    lengths = default_lengths(n=20_000)
    now = execute_padding(lengths, 16, sb, bb, trials=500)
    packed = execute_padding(lengths, 16, sb, bb, pack_width=512, trials=500)
    per_request = 1 / (1 - padding_report(lengths, sb)["padded_token_share"])
    assert now["token_ratio"] > per_request > 1
    assert packed["token_ratio"] < now["token_ratio"] and packed["launches"] < now["launches"]
    served = execute_padding(lengths, 16, sb, bb, pack_width=-1, trials=500)
    assert served["launches"] == 1.0 and served["token_ratio"] < now["token_ratio"]
