"""发压：开环（泊松到达，延迟从计划发送时刻算起）与闭环（并发 c 个请求轮流发送），多进程 gRPC 异步客户端。

为什么要开环：闭环（等到回答再发下一个）永远看不到真实到达流造成的排队（coordinated omission），
P99 会被低估。开环按计划时刻发送，每个请求的延迟 = 完成时刻 - 计划发送时刻；发压端落后于计划时
报告里的 schedule_lag 写明落后多少。

时间都用 time.monotonic()（Linux 上即 CLOCK_MONOTONIC，各进程共用，与 Triton 追踪的 steady_clock 是同一个钟），
所以客户端的时间戳能直接与服务端的追踪时间戳对齐（bench/trace.py）。每个请求带 request_id，追踪按它对应。
请求在计时开始前生成好；发压进程冻结 GC，避免客户端自己的停顿算进服务的延迟。
"""
from __future__ import annotations

import asyncio
import gc
import threading
import time
from typing import Any, Dict, List

import numpy as np

from algorithm.errors import MissingDependencyError, StalledError
from algorithm.interfaces import HISTORY_INPUT, EngineContract
from algorithm.serving.runtime import packed


def client_module(protocol: str, aio: bool):
    try:
        if protocol == "grpc":
            import tritonclient.grpc as sync_mod
            import tritonclient.grpc.aio as aio_mod
        else:
            import tritonclient.http as sync_mod
            import tritonclient.http.aio as aio_mod
    except ImportError as e:
        raise MissingDependencyError("压测需要 tritonclient[grpc,http]") from e
    return aio_mod if aio else sync_mod


def engine_takes_packed_input(url: str, model: str, protocol: str) -> bool:
    """服务器上的引擎模型收的是打包的 1 个输入（runtime/packed.py）还是 6 个：看模型元数据里的输入名。"""
    client = client_module(protocol, aio=False).InferenceServerClient(url=url)
    try:
        meta = client.get_model_metadata(model, as_json=True) if protocol == "grpc" else client.get_model_metadata(model)
    finally:
        client.close()
    return any(i.get("name") == packed.PACKED_INPUT for i in meta.get("inputs", []))


def build_requests(spec: Dict[str, Any]) -> List[list]:
    """按规格生成请求的 InferInput 列表（在发压进程内生成，避免跨进程传 protobuf 对象）。

    spec["target"]：ensemble / floor（原始历史）或 engine（经同一前处理得到的六个输入）。"""
    from algorithm.serving.config import BenchmarkConfig
    from algorithm.serving.workload import make_histories

    cfg = BenchmarkConfig(**spec["benchmark"])
    mod = client_module(cfg.protocol, aio=False)
    histories = make_histories(spec["catalog"], cfg, spec["count"], spec["max_seq_length"], spec["seed"])
    requests = []
    if spec.get("kind", "ensemble") != "engine":
        for h in histories:
            arr = h.reshape(1, -1).astype(np.int64)
            inp = mod.InferInput(HISTORY_INPUT, list(arr.shape), "INT64")
            inp.set_data_from_numpy(arr)
            requests.append([inp])
        return requests
    from algorithm.models.catalog import load_catalog
    from algorithm.serving.runtime.preprocess import Preprocessor

    contract = EngineContract(**spec["contract"])
    pre = Preprocessor(load_catalog(spec["catalog"]), contract)
    for h in histories:
        feeds, _ = pre.encode_one(h)
        if spec.get("packed"):  # 与前处理交给引擎的相同：6 个输入拼成 1 个
            x = packed.pack(feeds, contract)
            inp = mod.InferInput(packed.PACKED_INPUT, list(x.shape), "INT64")
            inp.set_data_from_numpy(x)
            requests.append([inp])
            continue
        inputs = []
        for s in contract.inputs:
            inp = mod.InferInput(s.name, list(feeds[s.name].shape), s.triton_dtype[len("TYPE_"):])
            inp.set_data_from_numpy(feeds[s.name])
            inputs.append(inp)
        requests.append(inputs)
    return requests


def error_kind(exc: BaseException) -> str:
    status = getattr(exc, "status", None)
    s = status() if callable(status) else status
    if s:
        return str(s).replace("StatusCode.", "")
    return type(exc).__name__


async def run_schedule(spec: Dict[str, Any], requests: List[list]) -> Dict[str, Any]:
    """一个发压进程：开环（按 offsets 计划时刻发送）或闭环（concurrency 个协程轮流发送）。"""
    mod = client_module(spec["protocol"], aio=True)
    client = mod.InferenceServerClient(url=spec["url"])
    model = spec["model"]
    timeout = spec["timeout_s"]
    prefix = spec.get("id_prefix", "r")
    n = len(requests)
    intended = np.full(n, np.nan)
    sent = np.full(n, np.nan)
    done = np.full(n, np.nan)
    failed = np.full(n, np.nan)  # 失败（含过载被拒）的时刻：被拒得快不快
    errors: Dict[str, int] = {}
    error_samples: Dict[str, str] = {}
    cpu0, wall0 = time.process_time(), time.monotonic()
    kwargs = {"client_timeout": timeout} if spec["protocol"] == "grpc" else {}

    async def one(i: int) -> None:
        sent[i] = time.monotonic()
        try:
            await client.infer(model, requests[i], request_id=f"{prefix}-{i}", **kwargs)
            done[i] = time.monotonic()
        except Exception as e:  # 记下错误类型与一条样例，继续
            failed[i] = time.monotonic()
            kind = error_kind(e)
            errors[kind] = errors.get(kind, 0) + 1
            error_samples.setdefault(kind, str(e)[:300])

    start = spec["start_at"]

    async def drive() -> None:
        if spec["mode"] == "open":
            offsets = np.asarray(spec["offsets"])
            tasks = []
            for i in range(n):
                intended[i] = start + offsets[i]
                delay = intended[i] - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(i)))
            await asyncio.gather(*tasks)
        else:
            await asyncio.sleep(max(0.0, start - time.monotonic()))
            deadline = start + spec["duration_s"]
            counter = iter(range(n))

            async def loop() -> None:
                for i in counter:
                    if time.monotonic() >= deadline:
                        break
                    intended[i] = time.monotonic()
                    await one(i)

            await asyncio.gather(*(loop() for _ in range(spec["concurrency"])))

    # 限时（从计划起点算，Benchmark.deadline_s）：每个请求都有 timeout_s 的超时，整段却仍可能不结束（客户端库或通道卡住）；
    # 超过就取消没有回答的请求并报错，而不是让整轮测量无声地停住
    limit = spec.get("deadline_s")
    try:
        if limit:
            await asyncio.wait_for(drive(), timeout=max(1.0, start + limit - time.monotonic()))
        else:
            await drive()
    except asyncio.TimeoutError:
        pending = int(np.sum(~np.isnan(sent) & np.isnan(done) & np.isnan(failed)))
        raise StalledError(f"发压进程 {prefix}：计划起点之后 {limit:.0f} s 仍有 {pending} 个请求既没有回答也没有出错"
                           f"（每个请求的超时是 {timeout} s）") from None
    finally:
        try:
            await asyncio.wait_for(client.close(), timeout=5.0)
        except Exception:  # noqa: BLE001  关不掉的连接不该盖住上面的结果或错误
            pass
    wall = time.monotonic() - wall0
    return {"intended": intended, "sent": sent, "done": done, "failed": failed, "errors": errors,
            "error_samples": error_samples, "start_at": start, "id_prefix": prefix, "cpu_util": (time.process_time() - cpu0) / max(wall, 1e-9)}


_BARRIER = None


def init_worker(barrier) -> None:
    global _BARRIER
    _BARRIER = barrier


def worker(spec: Dict[str, Any]) -> Dict[str, Any]:
    """先生成请求，再在屏障处等所有发压进程就绪，然后同时开始（各进程的计划起点相差不到几毫秒）。"""
    requests = build_requests(spec["requests"])
    spec = dict(spec)
    gc.collect()
    gc.freeze()  # 请求对象与导入的模块不再被扫描：客户端的 GC 停顿不算进服务的延迟
    if _BARRIER is not None:
        try:
            _BARRIER.wait(timeout=spec.get("deadline_s"))
        except threading.BrokenBarrierError:
            raise StalledError(f"发压进程 {spec.get('id_prefix', '')}：其它发压进程 {spec.get('deadline_s')} s 内没有"
                               "准备好（生成请求时出错或崩溃）") from None
    spec["start_at"] = time.monotonic() + 0.2
    try:
        return asyncio.run(run_schedule(spec, requests))
    finally:
        gc.unfreeze()
