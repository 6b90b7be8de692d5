"""探针：内嵌 Triton 开着请求追踪时会不会崩溃（不依赖本仓库的模型，几十秒）。

为什么有它：GPU 上的压测卡住过，都在开着追踪的高速率确认点上，服务器日志里有
`Signal (11) received.`。Triton 2.51（pytriton 0.7.0 自带）的追踪释放里有 use-after-free（server#7795，PR #8144 修于 2.57），
堆被破坏后崩溃处理函数卡在 malloc 的锁上：进程不退出、请求不再回答。这个探针用与我们同样形状的负载（两步 python 模型的
ensemble、动态批处理、异步 gRPC 并发）复现它，也用来检查换了 Triton 版本之后是否还会崩。

    .venv/bin/python tools/probe_trace_crash.py --trace-rate 1 --seconds 60    # 每个请求都追踪
    .venv/bin/python tools/probe_trace_crash.py --trace-rate 0 --seconds 60    # 对照：不追踪

输出每 5 s 的成功数与错误数，最后一行 JSON：Triton 版本、请求数、错误数、日志里的崩溃痕迹（server.crash_lines）、结束时服务器
是否还回答。退出码：0 = 没有崩溃痕迹，1 = 有。
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.request

from algorithm.serving.bench import trace as trace_mod
from algorithm.serving.config import ServerConfig
from algorithm.serving.server import EmbeddedTritonServer

STEP = '''name: "{name}"
backend: "python"
max_batch_size: 64
dynamic_batching {{ }}
instance_group [{{ kind: KIND_CPU count: 2 }}]
input [{{ name: "IN" data_type: TYPE_FP32 dims: [ 16 ] }}]
output [{{ name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] }}]
'''
ENSEMBLE = '''name: "ens"
platform: "ensemble"
max_batch_size: 64
input [{ name: "IN" data_type: TYPE_FP32 dims: [ 16 ] }]
output [{ name: "OUT" data_type: TYPE_FP32 dims: [ 16 ] }]
ensemble_scheduling { step [
 { model_name: "step_a" model_version: -1 input_map { key: "IN" value: "IN" } output_map { key: "OUT" value: "mid" } },
 { model_name: "step_b" model_version: -1 input_map { key: "IN" value: "mid" } output_map { key: "OUT" value: "OUT" } } ] }
'''
MODEL = '''import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "IN").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("OUT", x + 1)]))
        return out
'''


def write_repository(root: str) -> None:
    """两个恒等的 python 步骤（各 2 实例、动态批处理）组成的 ensemble。"""
    for name in ("step_a", "step_b"):
        os.makedirs(os.path.join(root, name, "1"))
        with open(os.path.join(root, name, "config.pbtxt"), "w") as f:
            f.write(STEP.format(name=name))
        with open(os.path.join(root, name, "1", "model.py"), "w") as f:
            f.write(MODEL)
    os.makedirs(os.path.join(root, "ens", "1"))
    with open(os.path.join(root, "ens", "config.pbtxt"), "w") as f:
        f.write(ENSEMBLE)


async def load(url: str, seconds: float, concurrency: int) -> dict:
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(url)
    x = np.ones((1, 16), np.float32)
    stats = {"ok": 0, "errors": 0, "first_error": ""}
    t0 = time.time()

    async def worker():
        while time.time() - t0 < seconds:
            inp = grpcclient.InferInput("IN", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            try:
                await client.infer("ens", [inp], client_timeout=10)
                stats["ok"] += 1
            except Exception as e:  # noqa: BLE001  卡死的服务器：超时；记下第一个，错多了就停
                stats["errors"] += 1
                stats["first_error"] = stats["first_error"] or str(e)[:200]
                if stats["errors"] > 3 * concurrency:
                    return

    async def report():
        while time.time() - t0 < seconds:
            await asyncio.sleep(5)
            print(f"t={time.time() - t0:.0f}s 成功 {stats['ok']} 错误 {stats['errors']}", flush=True)

    await asyncio.gather(report(), *[worker() for _ in range(concurrency)])
    await client.close()
    return stats


def answers(http_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2/models/ens/stats", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace-rate", type=int, default=1, help="每 N 个请求追踪一个（TIMESTAMPS）；0 = 不追踪")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ugt-trace-probe-") as tmp:
        repo = os.path.join(tmp, "models")
        write_repository(repo)
        trace_file = os.path.join(tmp, "trace", "trace.json")
        os.makedirs(os.path.dirname(trace_file))
        server = EmbeddedTritonServer(repo, ServerConfig(exit_timeout_s=5, supervise=False), ready_models=["ens"],
                                      log_path=os.path.join(tmp, "tritonserver.log"),
                                      extra_args=trace_mod.server_args(trace_file))
        with server:
            version = trace_mod.triton_version(server.http_url)
            tracer = trace_mod.Tracer(server.http_url, trace_file, max(args.trace_rate, 1), "ens", ["step_a", "step_b"])
            if args.trace_rate:
                with tracer.session(args.trace_rate):
                    stats = asyncio.run(load(server.grpc_url, args.seconds, args.concurrency))
            else:
                stats = asyncio.run(load(server.grpc_url, args.seconds, args.concurrency))
            crash = server.crash_lines()
            alive = answers(server.http_url)
        result = {"triton_version": ".".join(map(str, version)) if version else None, "trace_rate": args.trace_rate,
                  "seconds": args.seconds, "concurrency": args.concurrency, **stats, "crash_lines": crash,
                  "server_answers_after": alive}
        print(json.dumps(result, ensure_ascii=False))
        return 1 if crash else 0


if __name__ == "__main__":
    sys.exit(main())
