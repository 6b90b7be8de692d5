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
