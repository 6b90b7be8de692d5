"""压测工具本身：对已知耗时的模型测得正确的延迟；开环能看到排队，闭环看不到；P99 的置信区间；
SLA 按区间上界判定并独立重测确认；用户的 run_benchmark 是单客户端顺序发送。"""
import json
import os

import numpy as np
import pytest

from algorithm.serving.bench.report import write_report
from algorithm.serving.bench.suite import Benchmark, headline
from algorithm.serving.bench.tail import min_samples_for_upper_bound, quantile_ci
from algorithm.serving.benchmark import run_benchmark
from algorithm.serving.config import BenchmarkConfig
from conftest import TESTS_DIR

SLEEP_REPO = os.path.join(TESTS_DIR, "fixtures", "sleep_repo")
SLEEP_MS = 20.0


def test_p99_confidence_interval_covers_the_true_quantile():
    rng = np.random.default_rng(0)
    true = -np.log(0.01)  # 指数分布的 P99
    hits = sum(1 for _ in range(300) if (lambda ci: ci["low"] <= true <= ci["high"])(quantile_ci(rng.exponential(1, 2000))))
    assert hits / 300 >= 0.93
    few = quantile_ci(rng.exponential(1, 300))
    assert few["high"] is None and few["low"] is not None  # 300 个样本：上界不存在（SLA 不能据此判定达标）
    assert min_samples_for_upper_bound() == 368
    big = quantile_ci(rng.exponential(1, 10_000))
    assert big["beyond"] == 100 and big["high"] - big["low"] < 0.6


@pytest.fixture(scope="module")
def sleepy(tmp_path_factory):
    import shutil

    from algorithm.serving.server import EmbeddedTritonServer

    # 拷一份再服务：同一仓库目录同时只允许一个服务器（两个 pytest 会话并行时不互相拒绝）
    repo = str(tmp_path_factory.mktemp("sleepy") / "repo")
    shutil.copytree(SLEEP_REPO, repo, ignore=shutil.ignore_patterns("__pycache__"))
    with EmbeddedTritonServer(repo, ready_models=["sleepy", "sleepy5"]) as s:
        yield s


def make_bench(sleepy, built, model="sleepy", **kw):
    cfg = BenchmarkConfig(**{"duration_s": 2.5, "min_requests": 40, "concurrency": [1], "warmup_requests": 5,
                             "length_median": 20, "sla_start_rate": 10, "sla_steps": 0, "max_point_s": 2.5} | kw)
    b = Benchmark(sleepy.grpc_url, model, cfg, built[1].catalog, 256, progress=False)
    b.warmup()
    return b


@pytest.mark.server
def test_closed_loop_p50_matches_known_service_time(sleepy, built):
    p = make_bench(sleepy, built).closed_loop(1, duration_s=2.0)
    assert p["error_rate"] == 0 and p["ok"] > 30
    assert SLEEP_MS <= p["latency_ms"]["p50"] <= SLEEP_MS + 15, p["latency_ms"]
    assert p["server"]["sleepy"]["compute_ms"] == pytest.approx(SLEEP_MS, abs=8)
    # 没有动态批处理：每次执行一个请求，两种平均相同（batch_stats 从真实的 Triton 统计里读到了）
    assert p["server"]["sleepy"]["compute_per_execute_ms"] == pytest.approx(SLEEP_MS, abs=8)


def test_server_stats_tell_request_weighted_from_per_execute_compute():
    """Triton 给一批里的每个请求都记整批的时间：1 个请求的批 2 ms + 3 个请求的批 6 ms ->
    每请求 (2 + 3 x 6) / 4 = 5 ms，每次执行 (2 + 6) / 2 = 4 ms。"""
    from algorithm.serving.bench.stats import ServerStats

    zero = {"inferences": 0, "executions": 0, "success": 0, "fail": 0, "queue_ns": 0, "compute_ns": 0, "requests": 0,
            "batch_compute_ns": 0, "batch_executions": 0}
    after = dict(zero, inferences=4, executions=2, success=4, requests=4, queue_ns=4_000_000,
                 compute_ns=20_000_000, batch_compute_ns=8_000_000, batch_executions=2)
    d = ServerStats.delta({"m": zero}, {"m": after})["m"]
    assert d["avg_batch"] == 2 and d["queue_ms"] == 1.0
    assert d["compute_ms"] == 5.0 and d["compute_per_execute_ms"] == 4.0


@pytest.mark.server
def test_open_loop_above_capacity_shows_queueing_closed_loop_does_not(sleepy, built):
    bench = make_bench(sleepy, built)
    over = bench.open_loop(80.0, duration_s=2.5)  # 容量约 50/s；点的时长至少凑够约 370 个请求
    first, last = over["p50_first_quarter_ms"], over["p50_last_quarter_ms"]
    assert last > first + 100, (first, last)  # 队列随时间增长
    assert over["latency_ms"]["p99"] > 5 * SLEEP_MS
    assert not over["behind_schedule"], over["schedule_lag_ms"]  # 发压端跟上了计划：延迟来自服务器
    closed = bench.closed_loop(1, duration_s=2.5)
    assert closed["p50_last_quarter_ms"] < 2 * closed["p50_first_quarter_ms"] + 5
    assert closed["latency_ms"]["p99"] < 3 * SLEEP_MS + 20


@pytest.mark.server
def test_sla_search_decides_on_the_interval_and_confirms(sleepy, built, tmp_path):
    """5 ms 的模型（容量约 200/s）、目标 40 ms：80/s 达标、160/s 不达标；找到的速率再独立重测确认。"""
    bench = make_bench(sleepy, built, model="sleepy5", sla_start_rate=80)
    sla = bench.sla_search(slo_ms=40.0)
    assert sla["max_rate"] is not None and 40 <= sla["max_rate"] <= 160, [p["offered_rate"] for p in sla["points"]]
    confirm = [p for p in sla["points"] if p.get("confirmation")]
    assert confirm and confirm[-1]["offered_rate"] == sla["max_rate"]
    for p in sla["points"]:
        assert p["ok"] >= min_samples_for_upper_bound()  # 每点都够判定
        ci = p["p99_ci"]
        assert ci["low"] <= p["latency_ms"]["p99"] and (ci["high"] is None or ci["high"] >= p["latency_ms"]["p99"])
        assert bench.meets(p, 40.0) == (ci["high"] is not None and ci["high"] <= 40.0 and p["error_rate"] == 0
                                        and p["throughput"] >= 0.9 * p["offered_rate"] * p["ok"] / p["sent"])
    report = {"model": "sleepy5", "slo_ms": 40.0, "runs": [{"closed_loop": [], "sla": sla}]}
    report["headline"] = headline(report["runs"])
    files = write_report(report, str(tmp_path))
    data = json.load(open(files["json"]))
    assert data["headline"]["sla_rate"]["median"] == sla["max_rate"]
    assert "p99_ci" in data["runs"][0]["sla"]["points"][0] and "_client" not in data["runs"][0]["sla"]["points"][0]


@pytest.mark.server
def test_sla_search_stops_when_unbatched_latency_already_misses(sleepy, built):
    # 模型本身要 20 ms：P99 <= 10 ms 在任何速率都做不到；搜索应在第一个不合批的点停下并说明
    sla = make_bench(sleepy, built).sla_search(slo_ms=10.0)
    assert sla["max_rate"] is None and len(sla["points"]) == 1
    assert "任何速率" in sla["note"]


@pytest.mark.server
def test_user_run_benchmark_is_one_sequential_client(sleepy, built):
    out = run_benchmark(sleepy.grpc_url, "sleepy", 40, catalog_path=built[1].catalog, max_seq_length=256,
                        config=BenchmarkConfig(warmup_requests=2, length_median=20))
    assert {"throughput", "latency_p50", "latency_p90", "latency_p99"} <= set(out)
    assert out["error_rate"] == 0 and out["requests"] == 40 and out["concurrency"] == 1
    # 顺序发送：p50 就是单个请求的时间（不含排队），吞吐约等于 1000 / p50
    assert SLEEP_MS <= out["latency_p50"] <= SLEEP_MS + 15
    assert out["throughput"] == pytest.approx(1000 / out["latency_p50"], rel=0.35)
    more = run_benchmark(sleepy.grpc_url, "sleepy", 40, concurrency=4, catalog_path=built[1].catalog,
                         max_seq_length=256, config=BenchmarkConfig(warmup_requests=2, length_median=20))
    assert more["concurrency"] == 4 and more["latency_p50"] > 2 * SLEEP_MS  # 4 个在途、单实例：排队算进延迟


def test_closed_loop_headline_reports_the_refused_share():
    """闭环的吞吐只数成功的请求（被拒的客户端马上重发）：头条与摘要里要有失败比例，否则 8 % 被拒的点看起来与全成功的一样。"""
    from algorithm.serving.bench.report import summary_table

    def point(thr, err):
        return {"concurrency": 64, "throughput": thr, "error_rate": err, "latency_ms": {"p99": 50.0},
                "gpu": {"util_mean": 50.0}, "server": {}}

    runs = [{"closed_loop": [point(1900.0, 0.084)]}, {"closed_loop": [point(1950.0, 0.080)]},
            {"closed_loop": [point(2000.0, 0.090)]}]
    report = {"model": "m", "slo_ms": 30.0, "runs": runs, "headline": headline(runs)}
    err = report["headline"]["closed_loop"]["64"]["error_rate"]
    assert err["median"] == pytest.approx(0.084) and err["min"] == pytest.approx(0.080)
    assert "8.40 [8.00–9.00]" in summary_table(report)


def test_time_outside_the_engine_execute_is_reported():
    """Triton 记的每次 execute 减去引擎自己量的 execute = python backend 交接输入与响应的时间（H100 上 c=64 时 3.7 ms）：
    闭环每点与 SLA 点都报告；任一边缺（例如 onnxruntime 原生后端没有自定义指标）时是空的，不是 0。"""
    from algorithm.serving.bench.report import summary_table
    from algorithm.serving.bench.suite import outside_execute_ms

    def point(triton_ms, ours_ms):
        return {"concurrency": 64, "throughput": 1800.0, "error_rate": 0.0, "latency_ms": {"p99": 50.0},
                "gpu": {"util_mean": 50.0}, "engine_execute": {"execute_ms": ours_ms} if ours_ms else {},
                "server": {"ugt_engine": {"avg_batch": 15.0, "compute_per_execute_ms": triton_ms}}}

    assert outside_execute_ms(point(14.7, 11.0)) == pytest.approx(3.7)
    assert outside_execute_ms(point(14.7, None)) is None
    runs = [{"closed_loop": [point(t, o)]} for t, o in ((14.7, 11.0), (15.1, 11.4), (14.9, 10.9))]
    h = headline(runs)
    assert h["closed_loop"]["64"]["engine_outside_execute_ms"]["median"] == pytest.approx(3.7)
    assert "3.70 [3.70–4.00]" in summary_table({"model": "m", "slo_ms": 30.0, "runs": runs, "headline": h})


@pytest.mark.server
def test_engine_target_sends_what_the_served_engine_takes(server, built):
    """直接压引擎（benchmark.target=engine）：按服务器上引擎的输入发打包的 1 个张量（默认）或 6 个，请求都成功。"""
    cfg, result = built
    bc = BenchmarkConfig(duration_s=1.0, min_requests=10, concurrency=[1], warmup_requests=2, length_median=20)
    c = cfg.contract()
    contract = {"max_seq_length": c.max_seq_length, "codebook_sizes": list(c.codebook_sizes),
                "num_token_types": c.num_token_types, "top_k": c.top_k}
    bench = Benchmark(server.grpc_url, "ugt_engine", bc, result.catalog, cfg.export.max_seq_length,
                      contract_kwargs=contract, progress=False, kind="engine")
    assert bench.packed_inputs
    p = bench.closed_loop(1, duration_s=1.0)
    assert p["error_rate"] == 0 and p["ok"] > 5, p.get("error_samples")


def test_a_point_that_never_finishes_fails_with_a_stalled_error(built):
    """发压端的限时：服务器接了连接却从不回答（一个只 listen 的套接字），单个请求的超时又比限时长时，
    负载点在限时后报 StalledError（哪一步、几个请求没有回答、服务器状态），而不是无声地停住（2026-11-28 H100 上停了 14 分钟）。"""
    import socket
    import time

    from algorithm.errors import StalledError

    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(64)
    url = f"127.0.0.1:{hole.getsockname()[1]}"
    try:
        cfg = BenchmarkConfig(timeout_s=60.0, processes=2, warmup_requests=0, length_median=20, min_requests=40,
                              max_point_s=1.0, duration_s=1.0)
        b = Benchmark(url, "ugt_recommend", cfg, built[1].catalog, 256, progress=False)
        b.STALL_MARGIN_S = 2.0 - cfg.timeout_s  # 限时 = 计划 1 s + 2 s，远短于单个请求的 60 s 超时
        b.stats.snapshot = dict  # 前后的统计快照不在这里测（它有自己的限时）
        t0 = time.monotonic()
        with pytest.raises(StalledError) as e:
            b.open_loop(40.0, duration_s=1.0)
        took = time.monotonic() - t0
    finally:
        hole.close()
    msg = str(e.value)
    assert msg.startswith("开环 40/s：") and "既没有回答也没有出错" in msg, msg
    assert "服务器的统计接口 5 s 内没有回答" in msg, msg
    assert took < 45, took  # 起两个发压进程 + 限时 3 s + 探测 5 s；没有限时就是 60 s 以上
