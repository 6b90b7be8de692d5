"""Triton Python backend 与 runtime/models 之间的薄适配层（只在服务器进程里导入）。

把 pb_utils 的请求变成 {输入名: numpy}，把结果（字典或异常）变成 InferenceResponse；
用户错误以 INVALID_ARG 返回（HTTP 400），引擎故障与内部错误以 INTERNAL 返回。
另外：初始化后冻结 GC（见 settle_process），引擎的每次 execute 计时导出为 Triton 自定义指标（EngineMetrics），
引擎的流水线（Pipeline，triton.engine_pipeline_depth > 1）。
"""
from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from typing import Iterable, List, Optional

from algorithm.serving.runtime.models import ExecuteStats, serving_error_code

log = logging.getLogger(__name__)


def read_requests(pb_utils, requests, names: Iterable[str]) -> List[dict]:
    names = list(names)
    get = pb_utils.get_input_tensor_by_name
    out = []
    for r in requests:
        d = {}
        for n in names:
            t = get(r, n)
            d[n] = None if t is None else t.as_numpy()
        out.append(d)
    return out


def _error(pb_utils, exc: Exception):
    err_cls = pb_utils.TritonError
    code = getattr(err_cls, serving_error_code(exc), None)
    msg = str(exc)
    try:
        return err_cls(msg, code) if code is not None else err_cls(msg)
    except TypeError:  # 旧版 python backend 的 TritonError 只接受消息
        return err_cls(msg)


def write_responses(pb_utils, results) -> list:
    Tensor, Response = pb_utils.Tensor, pb_utils.InferenceResponse
    responses = []
    for res in results:
        if isinstance(res, Exception):
            responses.append(Response(output_tensors=[], error=_error(pb_utils, res)))
        else:
            responses.append(Response(output_tensors=[Tensor(k, v) for k, v in res.items()]))
    return responses


def settle_process() -> None:
    """模型加载完后调用：收集一次再冻结现有对象（gc.freeze），并调高第 0 代阈值。

    为什么：引擎进程里 torch / inductor 留下数百万个长寿对象，一次完整的第 2 代 GC 要扫描全部，
    会让恰好碰上它的请求多等几十毫秒（轻负载下的长尾之一）。冻结后这些对象不再被扫描。
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)


class EngineMetrics:
    """引擎每次 execute 的累计计时 / 形状，作为 Triton 自定义指标（/metrics，Prometheus 格式）导出。

    指标（计数器，标签 model、instance）：ugt_engine_executes_total、ugt_engine_requests_total、
    ugt_engine_rows_total、ugt_engine_groups_total、ugt_engine_tokens_total{kind=valid|padded}、
    ugt_engine_ms_total{stage=host|device|copy_back|respond|execute|gpu_gap}。
    压测在每个负载点前后各抓一次 /metrics，差值除以 execute 数就是“服务中的一批”的各阶段时间，
    可与同一 batch 的离线时间对比。python backend 不支持自定义指标时（旧版本）只记日志，不影响服务。

    为什么在后台线程里每 FLUSH_S 秒写一次：python backend 的每次 Metric.increment 都是一次到 Triton 进程的
    同步往返（pb_stub.h 的 SendMessage 等父进程处理完才返回），11 个计数器在 execute 里逐个写，
    就在每个请求返回之前多等 11 次往返。execute 里只把这一次的数加进本地的待写字典（微秒级）。
    读 /metrics 的一方最多晚 FLUSH_S 秒看到（压测在每个点结束后等 FLUSH_WAIT_S 再抓）。
    """

    FLUSH_S = 0.1

    def __init__(self, pb_utils, model_name: str, instance: str, flush_s: float = FLUSH_S):
        self.ok = False
        self._pending: dict = {}
        self._recorded = 0.0  # 已记到的 ExecuteStats.totals["executes"]
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None
        self._flush_s = flush_s
        labels = {"model": model_name, "instance": instance}
        try:
            MF = pb_utils.MetricFamily

            def counter(name, desc):
                return MF(name=name, description=desc, kind=MF.COUNTER)

            fams = {
                "executes": counter("ugt_engine_executes_total", "引擎 execute 次数"),
                "requests": counter("ugt_engine_requests_total", "引擎处理的请求数"),
                "rows": counter("ugt_engine_rows_total", "引擎处理的行数（请求的 batch 行）"),
                "groups": counter("ugt_engine_groups_total", "按长度分组后的启动次数"),
                "tokens": counter("ugt_engine_tokens_total", "有效 / 填充后的 token 数"),
                "ms": counter("ugt_engine_ms_total", "各阶段累计毫秒：host=启动前的 Python，device=GPU（CUDA 事件），"
                                                     "copy_back=回拷，respond=拆分结果，execute=整个 execute，"
                                                     "gpu_gap=这一批开始前 GPU 空着的时间"),
            }
            # 留住 MetricFamily 的引用：python backend 里 family 对象被回收时会注销它（连同它的指标）
            self._fams = fams
            # ExecuteStats.FIELDS 的每个键 -> 一个指标：*_tokens 是 tokens{kind}，*_ms 是 ms{stage}，其余是同名计数器
            self._metrics = {}
            for k in ExecuteStats.FIELDS:
                if k.endswith("_tokens"):
                    self._metrics[k] = fams["tokens"].Metric(labels=labels | {"kind": k[:-len("_tokens")]})
                elif k.endswith("_ms"):
                    self._metrics[k] = fams["ms"].Metric(labels=labels | {"stage": k[:-len("_ms")]})
                else:
                    self._metrics[k] = fams[k].Metric(labels=labels)
            self.ok = True
        except Exception as e:  # pragma: no cover - 取决于 python backend 版本
            log.warning("自定义指标不可用（%s: %s）；引擎计时只在日志里", type(e).__name__, e)

    def record(self, stats: ExecuteStats) -> None:
        """记下 stats 的最近一次 execute；自上次以来没有新的（整批都没通过校验、引擎失败）就不记，不重复计上一次的。"""
        n = stats.totals["executes"]
        if n <= self._recorded:
            return
        self._recorded = n
        d = stats.last
        if not self.ok or not d:
            return
        with self._lock:
            for k in self._metrics:
                self._pending[k] = self._pending.get(k, 0.0) + float(d.get(k, 0.0))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ugt-engine-metrics", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._flush_s)
            try:
                self.flush()
            except Exception as e:  # noqa: BLE001  指标写失败不能影响服务：记一次日志后停止写
                log.warning("写自定义指标失败，停止写（%s: %s）", type(e).__name__, e)
                self.ok = False
                return

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for k, v in pending.items():
            if v:
                self._metrics[k].increment(v)


def instance_name(args: dict) -> Optional[str]:
    return args.get("model_instance_name") or args.get("model_name")


class Pipeline:
    """引擎的流水线（triton.engine_pipeline_depth = depth > 1）：execute 里只做 EngineModel.submit（校验、暂存、启动），
    这一批交给后台线程等 GPU、拆结果、经各请求的 response sender 发回（FINAL 标志；python backend 的非 decoupled 模型
    execute 返回 None 时就这样回答，ensemble 与客户端看到的仍是一问一答）。

    execute 在启动这一批之后等到在途的批数 <= depth - 1 才返回：depth = 2 时等上一批做完。这样 Triton 在上一批做完时
    才组下一批（不会因为 execute 返回得早而组出更小的批），而下一批的主机工作（Triton 交接输入、校验、暂存、启动）与
    这一批的 GPU 时间重叠。torch 运行器每个桶有 depth 套页锁定暂存区（_Lane），在途的批数不超过 depth，所以轮到的那套
    总是已经取走了结果。"""

    def __init__(self, impl, pb_utils, metrics: "EngineMetrics", depth: int):
        self.impl, self.pb, self.metrics, self.depth = impl, pb_utils, metrics, int(depth)
        self._queue: "queue.Queue" = queue.Queue()
        self._cv = threading.Condition()
        self.inflight = 0
        self.max_inflight = 0  # 测试用：在途批数的最大值（不应超过 depth）
        self._thread = threading.Thread(target=self._run, name="ugt-engine-complete", daemon=True)
        self._thread.start()

    def submit(self, requests, feeds) -> None:
        with self._cv:
            while self.inflight >= self.depth:  # 暂存区只有 depth 套（正常时不会在这里等：上一次返回前已降到 depth - 1）
                self._cv.wait()
            self.inflight += 1
            self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            item = (requests, self.impl.submit(feeds), None)
        except Exception as e:  # noqa: BLE001  本工具的 bug（InternalError 等）：这批都得到错误，服务继续
            item = (requests, None, e)
        self._queue.put(item)
        with self._cv:
            while self.inflight > self.depth - 1:
                self._cv.wait()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            requests, ticket, err = item
            try:
                self._complete(requests, ticket, err)
            except Exception as e:  # noqa: BLE001  这个线程不能死：它一停，execute 就永远等下去
                log.error("流水线发回响应失败（%s: %s）", type(e).__name__, e)
            finally:
                with self._cv:
                    self.inflight -= 1
                    self._cv.notify_all()

    def _complete(self, requests, ticket, err) -> None:
        try:
            results = self.impl.complete(ticket) if err is None else [err] * len(requests)
        except Exception as e:  # noqa: BLE001
            results = [RuntimeError(f"引擎执行失败：{type(e).__name__}: {e}")] * len(requests)
        self.metrics.record(self.impl.stats)
        final = self.pb.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for r, resp in zip(requests, write_responses(self.pb, results)):
            try:
                r.get_response_sender().send(resp, flags=final)
            except Exception as e:  # noqa: BLE001  一个请求发不回去（例如客户端已取消）不能让同批的其它请求没有回答
                log.warning("发回响应失败（%s: %s）", type(e).__name__, e)

    def close(self, timeout_s: float = 30.0) -> None:
        """卸载模型时：发完在途的批再停。"""
        self._queue.put(None)
        self._thread.join(timeout_s)
