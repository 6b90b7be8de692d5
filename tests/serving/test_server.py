"""真实 Triton 上的 ensemble：gRPC / HTTP 与进程内流水线结果一致；并发下不同长度的请求被合批，结果不变。"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from algorithm.models.train import SyntheticSequences
from algorithm.serving.client import RecommendClient
from algorithm.serving.pipeline import InProcessPipeline

pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def reference(built):
    return InProcessPipeline(built[1].repository)


@pytest.fixture(scope="module")
def histories(catalog):
    data = SyntheticSequences(catalog, seed=11)
    lengths = [1, 2, 7, 30, 99, 180, 256, 400]  # 400 > max_seq_length(256)：截断
    return [data.sample(1, n, random_lengths=False)[0][0] for n in lengths]


def assert_same(got, ref):
    assert np.array_equal(got.item_ids, ref["item_ids"])
    assert np.array_equal(got.semantic_ids, ref["semantic_ids"])
    np.testing.assert_allclose(got.scores, ref["scores"], atol=1e-4)
    assert got.num_unknown_items == ref["num_unknown_items"]


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_ensemble_matches_in_process_pipeline(server, built, reference, histories, protocol):
    url = server.grpc_url if protocol == "grpc" else server.http_url
    client = RecommendClient(url, built[0].export.model_name, protocol)
    for h in histories:
        got = client.recommend(h)
        assert (got.item_ids >= 0).sum() == 50  # 目录约束：50 个都是真实物品
        assert_same(got, reference.recommend(h))
    # 行为类型与未知 id
    h = histories[3]
    types = np.arange(len(h)) % 4
    with_unknown = np.concatenate([[-1], h, [10 ** 12]])
    got = client.recommend(with_unknown, np.concatenate([[0], types, [1]]))
    assert got.num_unknown_items == 2
    assert_same(got, reference.recommend(with_unknown, np.concatenate([[0], types, [1]])))
    client.close()


def test_concurrent_mixed_lengths_are_batched_and_unchanged(server, built, reference, catalog):
    check_concurrent_mixed_lengths(server, built, reference, catalog)


def check_concurrent_mixed_lengths(server, built, reference, catalog):
    import tritonclient.grpc as grpcclient

    data = SyntheticSequences(catalog, seed=5)
    rng = np.random.default_rng(5)
    hs = [data.sample(1, int(n), random_lengths=False)[0][0] for n in rng.integers(1, 200, size=48)]
    refs = [reference.recommend(h) for h in hs]
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    steps = ("ugt_preprocess", "ugt_engine", "ugt_postprocess")
    before = {m: stats.get_inference_statistics(m).model_stats[0] for m in steps}

    def send(i):
        c = RecommendClient(server.grpc_url, built[0].export.model_name)
        try:
            return c.recommend(hs[i])
        finally:
            c.close()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(len(hs))))
    for got, ref in zip(results, refs):
        assert_same(got, ref)
    after = {m: stats.get_inference_statistics(m).model_stats[0] for m in steps}
    counts = {m: (after[m].inference_count - before[m].inference_count,
                  after[m].execution_count - before[m].execution_count) for m in steps}
    print("推理数 / 执行数：", counts)
    assert all(inf == len(hs) for inf, _ in counts.values()), counts
    # 引擎与后处理（引擎一次吐出一批响应）都应被动态批处理合并：执行次数 < 推理次数。前处理的到达更分散，不要求
    for m in ("ugt_engine", "ugt_postprocess"):
        assert counts[m][1] < counts[m][0], f"{m} 的并发请求应被动态批处理合并：{counts}"


def test_engine_custom_metrics_match_triton_statistics(server, built, histories):
    """引擎运行器的自定义指标（后台线程写）与 Triton 自己的统计一致：execute 数、请求数；各阶段毫秒为正。"""
    import time

    import tritonclient.grpc as grpcclient

    from algorithm.serving.bench.stats import EngineMetricsScraper

    scraper = EngineMetricsScraper(server.metrics_url)
    stats = grpcclient.InferenceServerClient(server.grpc_url)
    time.sleep(EngineMetricsScraper.FLUSH_WAIT_S)  # 之前测试的待写数字先落地
    before, s0 = scraper.snapshot(), stats.get_inference_statistics("ugt_engine").model_stats[0]
    client = RecommendClient(server.grpc_url, built[0].export.model_name)
    for h in histories:
        client.recommend(h)
    client.close()
    time.sleep(EngineMetricsScraper.FLUSH_WAIT_S)
    after, s1 = scraper.snapshot(), stats.get_inference_statistics("ugt_engine").model_stats[0]
    d = EngineMetricsScraper.delta(before, after)
    assert d is not None, (before, after)
    assert d["executes"] == s1.execution_count - s0.execution_count == len(histories)
    assert d["requests_per_execute"] == 1.0
    assert d["execute_ms"] > 0 and d["host_ms"] > 0 and d["execute_ms"] >= d["device_ms"]
    assert d["gpu_gap_ms"] == 0.0  # 两批之间 GPU 空着的时间只有 GPU 上的 torch 运行器量得到（CUDA 事件）；这里导出为 0


@pytest.fixture(scope="module")
def pipelined_server(built, tmp_path_factory):
    """同一个引擎产物、triton.engine_pipeline_depth=2 的仓库（execute 启动后返回 None，后台线程经 response sender 回答）。"""
    import dataclasses

    from algorithm.serving.repository import build_repository
    from algorithm.serving.server import EmbeddedTritonServer

    cfg, result = built
    piped = dataclasses.replace(cfg, triton=dataclasses.replace(cfg.triton, engine_pipeline_depth=2))
    d = tmp_path_factory.mktemp("pipelined")
    repo = build_repository(piped, str(d / "repo"), result.engine_artifact, result.catalog)
    with EmbeddedTritonServer(repo, cfg.server, ready_models=[cfg.export.model_name],
                              log_path=str(d / "triton.log")) as s:
        yield s


def test_pipelined_engine_gives_the_same_answers_under_concurrent_load(pipelined_server, built, reference, catalog):
    """流水线（非 decoupled 的 python 模型 execute 返回 None、经 response sender 回答）在 ensemble 里仍是一问一答：
    gRPC / HTTP 都得到与进程内流水线相同的结果，并发的混合长度仍被动态批处理合并。"""
    import time

    import tritonclient.grpc as grpcclient

    from algorithm.serving.bench.stats import EngineMetricsScraper

    h = SyntheticSequences(catalog, seed=3).sample(1, 40, random_lengths=False)[0][0]
    for protocol, url in (("grpc", pipelined_server.grpc_url), ("http", pipelined_server.http_url)):
        c = RecommendClient(url, built[0].export.model_name, protocol)
        assert_same(c.recommend(h), reference.recommend(h))
        c.close()
    scraper = EngineMetricsScraper(pipelined_server.metrics_url)
    stats = grpcclient.InferenceServerClient(pipelined_server.grpc_url)
    time.sleep(EngineMetricsScraper.FLUSH_WAIT_S)
    before, s0 = scraper.snapshot(), stats.get_inference_statistics("ugt_engine").model_stats[0]
    check_concurrent_mixed_lengths(pipelined_server, built, reference, catalog)
    time.sleep(EngineMetricsScraper.FLUSH_WAIT_S)
    after, s1 = scraper.snapshot(), stats.get_inference_statistics("ugt_engine").model_stats[0]
    d = EngineMetricsScraper.delta(before, after)
    # 后台线程记的计时与 Triton 记的执行数一致：每批恰好一次
    assert d["executes"] == s1.execution_count - s0.execution_count, (d, s0, s1)


def test_crash_signs_are_found_in_the_server_log(tmp_path):
    """Triton 2.51 堆损坏后不退出、只在日志里留一行信号（2026-11-28 H200 那次卡住）：crash_lines 找出它，正常退出的 SIGTERM 不算。"""
    from algorithm.serving.server import EmbeddedTritonServer

    log = tmp_path / "tritonserver.log"
    log.write_text('I1128 07:41:01 server.cc:325] "Model \'ugt_postprocess\' (version 1) has 20 in-flight inferences"\n'
                   "Signal (11) received.\nSignal (15) received.\n"
                   "corrupted double-linked list (not small)\nSignal (6) received.\n")
    lines = EmbeddedTritonServer(str(tmp_path), log_path=str(log)).crash_lines()
    assert lines == ["2: Signal (11) received.", "4: corrupted double-linked list (not small)", "5: Signal (6) received."]
    log.write_text("Signal (15) received.\nSignal (2) received.\n")
    assert EmbeddedTritonServer(str(tmp_path), log_path=str(log)).crash_lines() == []
    assert EmbeddedTritonServer(str(tmp_path), log_path=str(tmp_path / "none.log")).crash_lines() == []
