"""追踪与客户端时间戳的对齐（合成的 Triton 追踪，不起服务器；真服务器上的对齐见 test_app 的浸泡测试）。"""
import pytest

from algorithm.serving.bench.trace import format_breakdown, join, stage_names, summarize

STEPS = ["pre", "engine"]


def _traces(split: bool):
    ms = 1_000_000
    ens = {"id": 1, "model_name": "ens", "request_id": "r1", "timestamps": {"REQUEST_START": 2 * ms, "REQUEST_END": 30 * ms}}
    pre = {"id": 2, "parent_id": 1, "model_name": "pre",
           "timestamps": {"QUEUE_START": 3 * ms, "COMPUTE_START": 4 * ms, "COMPUTE_END": 6 * ms}}
    eng = {"id": 3, "parent_id": 1, "model_name": "engine",
           "timestamps": {"QUEUE_START": 7 * ms, "COMPUTE_START": 10 * ms, "COMPUTE_END": 28 * ms}}
    if split:
        eng["timestamps"].update(COMPUTE_INPUT_END=11 * ms, COMPUTE_OUTPUT_START=26 * ms)
    return {t["id"]: t for t in (ens, pre, eng)}


@pytest.mark.parametrize("split", [True, False])
def test_stages_add_up_and_compute_split_is_reported_when_timestamps_exist(split):
    # 客户端：计划 0.5 ms、发出 1 ms、收到 31 ms（秒）
    rows = join(_traces(split), {"r1": (0.0005, 0.001, 0.031)}, "ens", STEPS)
    assert len(rows) == 1
    r = rows[0]
    assert r["latency"] == pytest.approx(30.5)
    assert sum(r[n] for n in stage_names(STEPS)) == pytest.approx(r["latency"])
    assert "engine.compute" in format_breakdown({**summarize(rows, STEPS), "offered_rate": 1, "trace_rate": 1})
    assert r["engine.queue"] == pytest.approx(3.0) and r["engine.compute"] == pytest.approx(18.0)
    b = summarize(rows, STEPS)
    if split:
        assert (r["engine.compute.input"], r["engine.compute.infer"], r["engine.compute.output"]) == \
            pytest.approx((1.0, 15.0, 2.0))
        assert "engine.compute.infer 15.00/15.00" in format_breakdown({**b, "offered_rate": 1, "trace_rate": 1})
        assert b["slowest_request"]["engine.compute.infer"] == pytest.approx(15.0)
        assert b["compute_split"]["p50"] == pytest.approx(
            {"engine.compute.input": 1.0, "engine.compute.infer": 15.0, "engine.compute.output": 2.0})
    else:  # 没有这两个时间戳的步（这里的 pre，以及 split=False 时的 engine）不拆
        assert not any(".compute." in k for k in r)
        assert b["compute_split"]["p50"] == {}


def test_sla_point_is_traced_only_where_triton_tracing_is_safe():
    """Triton < 2.57 的高速率追踪会让服务器崩溃后卡死（server#7795）：auto 时不测 SLA 速率上的追踪点并写明原因。"""
    from algorithm.serving.bench.trace import sla_point_policy

    on, note = sla_point_policy("auto", (2, 51, 0))
    assert not on and "2.51.0" in note and "server#7795" in note and "trace_sla_point=on" in note
    assert sla_point_policy("auto", (2, 57, 0)) == (True, "") and sla_point_policy("auto", (2, 62, 1)) == (True, "")
    on, note = sla_point_policy("auto", None)  # 版本读不到：当作不安全
    assert not on and "未知" in note
    on, note = sla_point_policy("on", (2, 51, 0))
    assert on and "可能让服务器崩溃" in note
    assert sla_point_policy("on", (2, 60, 0)) == (True, "")
    assert sla_point_policy("off", (2, 60, 0))[0] is False


def test_triton_version_is_read_from_the_server_metadata(server):
    from algorithm.serving.bench.trace import triton_version

    version = triton_version(server.http_url)
    assert version is not None and len(version) == 3 and version >= (2, 0, 0)
    assert triton_version("127.0.0.1:9", timeout=0.5) is None  # 没有服务器：None，不抛异常
