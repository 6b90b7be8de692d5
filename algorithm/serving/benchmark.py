"""用户的压测接口 run_benchmark（名字与语义来自用户的请求），以及压测子包 algorithm/serving/bench/ 的入口。

run_benchmark 保持用户的语义：一个客户端、顺序发送 num_requests 个请求，所以 p50 就是单个请求的延迟，
吞吐 = 请求数 / 墙钟时间；concurrency= 可以加并发（闭环）。要看真实到达流下的 P99、置信区间、
满足 SLA 的最高速率与时间分解，用 scripts/benchmark.py（bench/app.py）。
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from algorithm.serving.bench.suite import Benchmark  # noqa: F401  (常用名字)
from algorithm.serving.config import BenchmarkConfig
from algorithm.serving.workload import make_histories, sample_lengths  # noqa: F401


def run_benchmark(triton_url: str, model_name: str, num_requests: int = 10000, *, concurrency: int = 1,
                  catalog_path: Optional[str] = None, config: Optional[BenchmarkConfig] = None,
                  max_seq_length: int = 1024) -> Dict[str, Any]:
    """对运行中的 Triton（gRPC 地址 host:port）发 num_requests 个原始历史请求（来自真实目录）。

    concurrency=1（默认）：一个客户端顺序发送，latency_p50 等就是单个请求的延迟，throughput = 请求数 / 墙钟时间。
    concurrency>1：这么多个请求同时在途（闭环）。返回 throughput（请求/秒）、latency_p50/p90/p95/p99/p99.9（毫秒）、
    latency_p99_ci（P99 的 95% 置信区间）、error_rate、requests。
    catalog_path 缺省为 build/model_repository/ugt_preprocess/1/catalog.npz。
    """
    if concurrency < 1:
        raise ValueError(f"concurrency 应 >= 1，得到 {concurrency}")
    cfg = config or BenchmarkConfig(processes=1)
    catalog_path = catalog_path or os.path.join("build", "model_repository", "ugt_preprocess", "1", "catalog.npz")
    bench = Benchmark(triton_url, model_name, cfg, catalog_path, max_seq_length, progress=False)
    bench.warmup()
    p = bench.closed_loop(concurrency, duration_s=3600.0, count=num_requests)
    lat = p["latency_ms"]
    return {"throughput": p["throughput"], "latency_p50": lat["p50"], "latency_p90": lat["p90"],
            "latency_p95": lat["p95"], "latency_p99": lat["p99"], "latency_p99.9": lat["p99.9"],
            "latency_p99_ci": [p["p99_ci"]["low"], p["p99_ci"]["high"]], "concurrency": concurrency,
            "error_rate": p["error_rate"], "requests": p["sent"]}


__all__ = ["run_benchmark", "Benchmark", "BenchmarkConfig"]
