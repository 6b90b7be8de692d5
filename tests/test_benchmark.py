"""压测工具本身：对一个已知耗时的模型测得正确的延迟；开环能看到排队，闭环看不到；报告字段齐全；用户接口可用。"""
import csv
import json
import os

import pytest

from algorithm.serving.benchmark import Benchmark, run_benchmark, run_suite, write_report
from algorithm.serving.config import BenchmarkConfig

pytestmark = pytest.mark.server
SLEEP_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "sleep_repo")
SLEEP_MS = 20.0


@pytest.fixture(scope="module")
def sleepy():
    from algorithm.serving.server import EmbeddedTritonServer

    with EmbeddedTritonServer(SLEEP_REPO, ready_models=["sleepy"]) as s:
        yield s


@pytest.fixture(scope="module")
def bench(sleepy, built):
    cfg = BenchmarkConfig(duration_s=2.5, min_requests=40, concurrency=[1], warmup_requests=5,
                          length_median=20, sla_start_rate=10, sla_steps=1)
    b = Benchmark(sleepy.grpc_url, "sleepy", cfg, built[1].catalog, 256, progress=False)
    b.warmup()
    return b


def test_closed_loop_p50_matches_known_service_time(bench):
    p = bench.closed_loop(1, duration_s=2.0)
    assert p["error_rate"] == 0 and p["ok"] > 30
    assert SLEEP_MS <= p["latency_ms"]["p50"] <= SLEEP_MS + 15, p["latency_ms"]
    assert p["server"]["sleepy"]["compute_ms"] == pytest.approx(SLEEP_MS, abs=8)


def test_open_loop_above_capacity_shows_queueing_closed_loop_does_not(bench):
    over = bench.open_loop(80.0, duration_s=2.5)  # 容量约 50/s
    first, last = over["p50_first_quarter_ms"], over["p50_last_quarter_ms"]
    assert last > first + 100, (first, last)  # 队列随时间增长
    assert over["latency_ms"]["p99"] > 5 * SLEEP_MS
    assert not over["behind_schedule"], over["schedule_lag_ms"]  # 发压端跟上了计划：延迟来自服务器
    closed = bench.closed_loop(1, duration_s=2.5)
    assert closed["p50_last_quarter_ms"] < 2 * closed["p50_first_quarter_ms"] + 5
    assert closed["latency_ms"]["p99"] < 3 * SLEEP_MS + 20


def test_sla_search_and_report_fields(bench, tmp_path):
    sla = bench.sla_search(slo_ms=60.0)
    assert sla["max_rate"] is not None and 5 <= sla["max_rate"] <= 60
    report = {"model": "sleepy", "slo_ms": 60.0, "closed_loop": [bench.closed_loop(1, duration_s=1.0)],
              "open_loop": [], "sla": sla}
    files = write_report(report, str(tmp_path))
    assert all(os.path.getsize(f) > 0 for f in files.values())
    data = json.load(open(files["json"]))
    p = data["sla"]["points"][0]
    for key in ("throughput", "latency_ms", "errors", "error_rate", "schedule_lag_ms", "client_cpu_util", "server",
                "gpu", "sent", "ok"):
        assert key in p
    assert set(p["latency_ms"]) >= {"p50", "p90", "p95", "p99", "p99.9"}
    assert p["gpu"]["util_mean"] is not None or p["gpu"]["reason"]
    rows = list(csv.DictReader(open(files["csv"])))
    assert len(rows) == len(sla["points"]) + 1 and rows[0]["p99"]


def test_run_suite_on_the_ensemble(server, built, tmp_path):
    cfg, result = built
    b = BenchmarkConfig(duration_s=1.5, min_requests=20, concurrency=[2], sla_search=False, rates=[5.0],
                        warmup_requests=4, length_median=30)
    report = run_suite(server.grpc_url, cfg.export.model_name, b, result.repository, cfg.export.max_seq_length,
                       30.0, str(tmp_path), offline_batches=[1, 4])
    assert report["closed_loop"][0]["error_rate"] == 0 and report["open_loop"][0]["ok"] > 0
    assert set(report["offline_engine"]) == {"1", "4", "length_share"}
    assert abs(sum(report["offline_engine"]["length_share"].values()) - 1) < 1e-9
    eng = report["closed_loop"][0]["server"]["ugt_engine"]
    assert eng["compute_ms"] > 0 and eng["avg_batch"] >= 1
    assert os.path.exists(report["files"]["png"])


def test_user_run_benchmark_signature(server, built):
    cfg, result = built
    out = run_benchmark(server.grpc_url, cfg.export.model_name, 60, catalog_path=result.catalog,
                        config=BenchmarkConfig(concurrency=[2], warmup_requests=4, length_median=30),
                        max_seq_length=cfg.export.max_seq_length)
    assert {"throughput", "latency_p50", "latency_p90", "latency_p99"} <= set(out)
    assert out["throughput"] > 0 and out["latency_p50"] <= out["latency_p90"] <= out["latency_p99"]
    assert out["error_rate"] == 0 and out["requests"] == 60


def test_sla_search_stops_when_unbatched_latency_already_misses(bench):
    # 模型本身要 20 ms：P99 <= 10 ms 在任何速率都做不到；搜索应在第一个不合批的点停下并说明
    sla = bench.sla_search(slo_ms=10.0)
    assert sla["max_rate"] is None and len(sla["points"]) == 1
    assert "任何速率" in sla["note"]
