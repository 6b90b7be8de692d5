"""探针：python backend 每个请求的交接成本随输入张量个数怎样变（引擎一跳有 6 个输入张量）。

两个不做计算的 python 模型，输出相同（[50,3] 与 [50]）：eng6 收引擎的 6 个输入（各 [1, L]），eng1 收把它们拼成的一个
[1, 6L]。闭环 async gRPC 压它们，从 Triton 的统计（bench/stats.ServerStats，与压测同一种算法）算每次 execute 的时间
（batch_stats 的 compute_input + infer + output）与每个请求占用实例的时间（每次 execute 的时间 x 执行数 / 请求数）。
为什么要测：H100 上 c=64 时引擎每次 execute 有 3.7 ms 在我们的 execute 之外（benchmarks/README.md 第 6 台），
如果大头是按张量算的，把 6 个输入打包成 1 个就能省下一部分。

  python tools/probe_tensor_count.py [--concurrency 16] [--seconds 6] [--repeats 3] [--instances 1]
"""
import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import numpy as np

from algorithm.interfaces import EngineContract

MODEL = """import numpy as np
import triton_python_backend_utils as pb
NAMES = {names!r}
class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            b = [pb.get_input_tensor_by_name(r, k).as_numpy() for k in NAMES][0].shape[0]
            out.append(pb.InferenceResponse([pb.Tensor("recommendations", np.zeros((b, 50, 3), np.int64)),
                                             pb.Tensor("scores", np.zeros((b, 50), np.float32))]))
        return out
"""
CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 64
input [ {inputs} ]
output [
  {{ name: "recommendations" data_type: TYPE_INT64 dims: [ 50, 3 ] }},
  {{ name: "scores" data_type: TYPE_FP32 dims: [ 50 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: 1000 }}
instance_group [ {{ count: {instances} kind: KIND_CPU }} ]
"""
MODELS = {"eng6": [(s.name, s.triton_dtype) for s in EngineContract(max_seq_length=1024).inputs],
          "eng1": [("packed", "TYPE_INT64")]}


def write_repo(root: str, instances: int) -> None:
    for name, ins in MODELS.items():
        os.makedirs(os.path.join(root, name, "1"))
        inputs = ", ".join(f'{{ name: "{n}" data_type: {t} dims: [ -1 ] allow_ragged_batch: true }}' for n, t in ins)
        with open(os.path.join(root, name, "config.pbtxt"), "w") as f:
            f.write(CONFIG.format(name=name, inputs=inputs, instances=instances))
        with open(os.path.join(root, name, "1", "model.py"), "w") as f:
            f.write(MODEL.format(names=[n for n, _ in ins]))


def request(model: str, n: int):
    import tritonclient.grpc as g

    out = []
    for name, t in MODELS[model]:
        width = 6 * n if name == "packed" else n
        dt = np.float32 if t == "TYPE_FP32" else np.int64
        x = g.InferInput(name, [1, width], "FP32" if t == "TYPE_FP32" else "INT64")
        x.set_data_from_numpy(np.ones((1, width), dt))
        out.append(x)
    return out


async def load(url: str, model: str, concurrency: int, seconds: float, lengths) -> int:
    import tritonclient.grpc.aio as aio

    client = aio.InferenceServerClient(url)
    stop = time.perf_counter() + seconds
    sent = [0]

    async def worker(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            await client.infer(model, request(model, int(lengths[i % len(lengths)])))
            i += 7
            sent[0] += 1

    await asyncio.gather(*[worker(k) for k in range(concurrency)])
    await client.close()
    return sent[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--instances", type=int, default=1)
    a = ap.parse_args()
    from algorithm.serving.bench.stats import ServerStats
    from algorithm.serving.server import EmbeddedTritonServer

    # 与压测相同的长度分布：对数正态，中位数 100，sigma 1，截到 [1, 1024]
    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(100), 1.0, 4096).astype(int), 1, 1024)
    rows = {m: [] for m in MODELS}
    with tempfile.TemporaryDirectory(prefix="ugt-probe-") as root:
        write_repo(root, a.instances)
        with EmbeddedTritonServer(root, ready_models=list(MODELS)) as server:
            stats = ServerStats(server.grpc_url)
            for rep in range(a.repeats):
                for model in MODELS:  # 交替，机器状态的漂移两边都吃到
                    before = stats.snapshot()
                    asyncio.run(load(server.grpc_url, model, a.concurrency, a.seconds, lengths))
                    d = ServerStats.delta(before, stats.snapshot())[model]
                    # 每个请求占用实例的时间 = 每次 execute 的时间（batch_stats）x 执行数 / 请求数
                    per_req = d["compute_per_execute_ms"] * d["executions"] / d["requests"]
                    row = {"repeat": rep, "model": model, "requests": d["requests"],
                           "req_per_s": round(d["requests"] / a.seconds), "batch": round(d["avg_batch"], 2),
                           "per_execute_ms": round(d["compute_per_execute_ms"], 3), "per_request_ms": round(per_req, 4)}
                    rows[model].append(row)
                    print(json.dumps(row), flush=True)
    for model, rs in rows.items():
        v = [r["per_request_ms"] for r in rs]
        print(f"{model}：每个请求 {statistics.median(v):.3f} [{min(v):.3f}–{max(v):.3f}] ms（{len(v)} 次），"
              f"吞吐 {statistics.median(r['req_per_s'] for r in rs)} req/s，平均 batch "
              f"{statistics.median(r['batch'] for r in rs)}")


if __name__ == "__main__":
    main()
