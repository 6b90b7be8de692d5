"""引擎的流水线（triton.engine_pipeline_depth，runtime/glue.Pipeline）：每个请求恰好得到一个 FINAL 响应、与同步的
execute 结果相同、坏请求与引擎失败只影响自己；在途的批数不超过 depth，下一批在上一批等 GPU 时就已启动（重叠）。
真实 Triton 上的同一条路径见 tests/serving/test_server.py 的流水线测试。"""
import threading
import time

import numpy as np
import pytest

from algorithm.errors import ConfigError
from algorithm.serving.config import EngineConfig, TritonConfig
from algorithm.serving.pipeline import InProcessPipeline
from algorithm.serving.runtime import glue
from algorithm.serving.runtime.engines.base import EngineRunner
from conftest import tiny_config


class FakePb:
    """pb_utils 里 Pipeline 用到的部分。"""

    TRITONSERVER_RESPONSE_COMPLETE_FINAL = 2

    class TritonError:
        INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

        def __init__(self, msg, code=None):
            self.msg, self.code = msg, code

    class Tensor:
        def __init__(self, name, arr):
            self.name, self.arr = name, arr

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.outputs = {t.name: t.arr for t in output_tensors}
            self.error = error


class FakeRequest:
    def __init__(self):
        self.sent = []

    def get_response_sender(self):
        return self

    def send(self, response, flags=0):
        self.sent.append((response, flags))


class CountingMetrics:
    def __init__(self):
        self.n = 0

    def record(self, stats):
        self.n += 1


@pytest.fixture(scope="module")
def engine_and_feeds(built):
    """构建好的 tiny 仓库里的 EngineModel（与服务同一个类）与前处理给它的输入（长度混合）。"""
    from algorithm.models.catalog import load_catalog
    from algorithm.models.train import SyntheticSequences

    pipe = InProcessPipeline(built[1].repository)
    data = SyntheticSequences(load_catalog(built[1].catalog), seed=8)
    rng = np.random.default_rng(8)
    hs = [data.sample(1, int(n), random_lengths=False)[0][0] for n in rng.integers(1, 250, size=24)]
    feeds = pipe.pre.execute([{"history_item_ids": h.reshape(1, -1)} for h in hs])
    for f in feeds:
        f.pop("num_unknown_items")
    return pipe.engine, feeds


def run_pipeline(eng, batches, depth):
    metrics = CountingMetrics()
    pipe = glue.Pipeline(eng, FakePb, metrics, depth)
    reqs = [[FakeRequest() for _ in b] for b in batches]
    for r, b in zip(reqs, batches):
        pipe.submit(r, b)
    pipe.close()
    return reqs, pipe, metrics


def test_pipelined_answers_match_the_synchronous_execute_and_errors_stay_per_request(engine_and_feeds):
    eng, feeds = engine_and_feeds
    bad = {k: v.copy() for k, v in feeds[3].items()}
    bad[next(iter(bad))] = bad[next(iter(bad))][:, :-1]  # 打包的输入少一列：拆不开，只有它自己失败
    batches = [feeds[0:5], feeds[5:6], [feeds[6], bad, feeds[7]], feeds[8:24]]
    expect = [eng.execute(b) for b in batches]
    reqs, pipe, metrics = run_pipeline(eng, batches, depth=2)
    assert pipe.max_inflight <= 2 and pipe.inflight == 0
    assert metrics.n == len(batches)  # 每批一次计时（坏请求那批里还有好的）
    for rs, ex in zip(reqs, expect):
        for r, e in zip(rs, ex):
            assert len(r.sent) == 1 and r.sent[0][1] == FakePb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
            resp = r.sent[0][0]
            if isinstance(e, Exception):
                assert resp.error is not None and resp.error.code == "INVALID_ARG" and resp.outputs == {}
            else:
                assert resp.error is None
                assert np.array_equal(resp.outputs["recommendations"], e["recommendations"])
                np.testing.assert_allclose(resp.outputs["scores"], e["scores"], atol=1e-6)
    assert reqs[2][1].sent[0][0].error is not None and reqs[2][0].sent[0][0].error is None


class SlowRunner(EngineRunner):
    """包住真实的运行器：launch 立即算完（CPU），finish 等到“GPU 时间” gpu_s 之后；记下每批启动与取回的时刻。
    fail_on：第几次 launch 的那批在 finish 时失败（像 CUDA 出错）。"""

    def __init__(self, inner, gpu_s, fail_on=None):
        self.inner, self.gpu_s, self.fail_on = inner, gpu_s, fail_on
        self.contract = inner.contract
        self.launched, self.finished = [], []
        self.n = 0
        self.lock = threading.Lock()

    def cost(self, rows, length):
        return self.inner.cost(rows, length)

    def staging(self, rows, length):
        return self.inner.staging(rows, length)

    def launch(self, staged):
        with self.lock:
            k = self.n
            self.n += 1
        self.launched.append((k, time.monotonic()))
        return k, time.monotonic() + self.gpu_s, self.inner.run_many(staged)

    def finish(self, pending):
        k, ready, result = pending
        time.sleep(max(0.0, ready - time.monotonic()))
        self.finished.append((k, time.monotonic()))
        if k == self.fail_on:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return result


def test_the_next_batch_is_launched_while_the_previous_one_waits_for_the_gpu(engine_and_feeds):
    eng, feeds = engine_and_feeds
    real = eng.runner
    eng.runner = SlowRunner(real, gpu_s=0.05, fail_on=2)
    try:
        batches = [feeds[i:i + 3] for i in range(0, 18, 3)]
        reqs, pipe, _ = run_pipeline(eng, batches, depth=2)
        slow = eng.runner
    finally:
        eng.runner = real
    assert pipe.max_inflight == 2
    launched, finished = dict(slow.launched), dict(slow.finished)
    # 重叠：第 k+1 批在第 k 批取回结果之前就已启动（同步的 execute 里不可能）
    assert all(launched[k + 1] < finished[k] for k in range(len(batches) - 1)), (slow.launched, slow.finished)
    # 流水线深度 2：第 k+2 批在第 k 批取回之后才启动（暂存区只有 2 套）
    assert all(launched[k + 2] >= finished[k] for k in range(len(batches) - 2)), (slow.launched, slow.finished)
    # 第 2 批在 finish 时失败：它的请求得到写明原因的错误，前后的批照常
    for k, rs in enumerate(reqs):
        errs = [r.sent[0][0].error for r in rs]
        if k == 2:
            assert all(e is not None and e.code == "INTERNAL" and "illegal memory access" in e.msg for e in errs)
        else:
            assert all(e is None for e in errs) and all(len(r.sent) == 1 for r in rs)


def test_pipeline_depth_is_validated_and_only_for_python_hosted_engines(tmp_path):
    with pytest.raises(ConfigError, match="engine_pipeline_depth"):
        TritonConfig(engine_pipeline_depth=0)
    with pytest.raises(ConfigError, match="1–4"):
        TritonConfig(engine_pipeline_depth=5)
    piped = TritonConfig(preferred_batch_sizes=[4, 8, 16], engine_pipeline_depth=2)
    with pytest.raises(ConfigError, match="python 运行器"):
        tiny_config(str(tmp_path), triton=piped, engine=EngineConfig(kind="onnxruntime", native=True))
    assert tiny_config(str(tmp_path), triton=piped).triton.engine_pipeline_depth == 2


def test_a_response_that_cannot_be_sent_does_not_silence_the_rest_of_its_batch(engine_and_feeds):
    eng, feeds = engine_and_feeds

    class Gone(FakeRequest):  # 客户端已经走了：发回时抛异常
        def send(self, response, flags=0):
            raise RuntimeError("request cancelled")

    pipe = glue.Pipeline(eng, FakePb, CountingMetrics(), 2)
    reqs = [FakeRequest(), Gone(), FakeRequest()]
    pipe.submit(reqs, feeds[:3])
    pipe.close()
    assert len(reqs[0].sent) == 1 and len(reqs[2].sent) == 1 and reqs[2].sent[0][0].error is None
    assert pipe.inflight == 0
