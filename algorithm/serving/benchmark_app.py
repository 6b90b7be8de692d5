"""scripts/benchmark.py 背后的流程：按当前配置重建仓库的配置（复用已构建的引擎与目录）、
启动内嵌服务器、跑整套压测、写报告；multirun 时维护一张跨运行的汇总表。"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, List

import numpy as np

from algorithm.serving.benchmark import run_suite, sample_lengths, summary_table
from algorithm.serving.build import paths
from algorithm.serving.config import ServingConfig
from algorithm.serving.errors import ConfigError

# 这些字段决定引擎产物；改了它们必须重新 build，而 triton.* 等只需重建配置
_ARTIFACT_KEYS = ("model", "engine.kind", "export.precision", "catalog")


def _get(d: Dict[str, Any], dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def repository_for_run(config: ServingConfig, out_dir: str) -> str:
    """用构建好的引擎与目录，按当前 triton/export 配置在 out_dir 下生成一个仓库（原子写入）。"""
    from algorithm.serving.repository import build_repository
    from algorithm.serving.triton_config import ENGINE, PREPROCESS, engine_hosting

    base = paths(config)["repository"]
    info_path = os.path.join(base, "build_info.json")
    if not os.path.isfile(info_path):
        raise ConfigError(f"没有找到构建好的仓库 {base}：先运行 python scripts/build.py（与压测相同的 model/engine/precision）")
    with open(info_path) as f:
        built = json.load(f)["config"]
    from dataclasses import asdict

    now = asdict(config)
    diff = [k for k in _ARTIFACT_KEYS if _get(built, k) != _get(now, k)]
    if diff:
        raise ConfigError(f"已构建的仓库与当前配置在 {diff} 上不同：先用相同的覆盖运行 scripts/build.py")
    hosting = engine_hosting(config)
    artifact = os.path.join(base, ENGINE, "1", hosting.filename)
    extra = [artifact + ".data"] if os.path.exists(artifact + ".data") else []
    return build_repository(config, os.path.join(out_dir, "model_repository"), artifact,
                            os.path.join(base, PREPROCESS, "1", "catalog.npz"), info={"config": now, "base": base},
                            extra_engine_files=extra)


def benchmark_from_config(config: ServingConfig, out_dir: str, overrides: List[str] = ()) -> Dict[str, Any]:
    from algorithm.models.ugt import flops_per_request
    from algorithm.serving.server import EmbeddedTritonServer

    b = config.benchmark
    out_dir = os.path.abspath(b.output_dir or out_dir)
    os.makedirs(out_dir, exist_ok=True)
    repo = repository_for_run(config, out_dir)
    lengths = sample_lengths(b, 4096, config.export.max_seq_length, b.seed)
    flops = float(np.mean([flops_per_request(config.model, int(n)) for n in lengths]))
    meta = {"overrides": list(overrides), "engine": config.engine.kind, "precision": config.export.precision,
            "model_preset": config.model.name, "triton": vars(config.triton),
            "model_flops_per_request": flops, "mean_history_length": float(lengths.mean())}
    contract = config.model.contract()
    contract_kwargs = {"max_seq_length": contract.max_seq_length, "codebook_sizes": list(contract.codebook_sizes),
                       "num_token_types": contract.num_token_types, "top_k": contract.top_k}
    target = config.export.model_name if b.target == "ensemble" else "ugt_engine"
    offline = sorted({1, *config.triton.preferred_batch_sizes}) if b.offline_samples else []
    if b.url:
        report = run_suite(b.url, target, b, repo, config.export.max_seq_length, config.export.target_latency_ms,
                           out_dir, offline, meta, contract_kwargs)
    else:
        with EmbeddedTritonServer(repo, config.server, ready_models=[config.export.model_name],
                                  log_path=os.path.join(out_dir, "tritonserver.log")) as server:
            url = server.grpc_url if b.protocol == "grpc" else server.http_url
            report = run_suite(url, target, b, repo, config.export.max_seq_length, config.export.target_latency_ms,
                               out_dir, offline, meta, contract_kwargs)
    add_flops(report, flops, b.peak_tflops)
    with open(report["files"]["json"], "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False, default=float)
    print(summary_table(report))
    print(f"报告：{report['files']['json']}\n      {report['files']['csv']}\n      {report['files']['png']}")
    return report


def add_flops(report: Dict[str, Any], flops_per_request: float, peak_tflops: float) -> None:
    """模型 FLOPs/请求 x 吞吐 = 实际算力；给了峰值就再除以峰值得 MFU（SLA 点与离线引擎各一份）。"""
    def fill(d: Dict[str, Any], throughput: float) -> None:
        d["model_tflops_per_s"] = throughput * flops_per_request / 1e12
        d["mfu"] = d["model_tflops_per_s"] / peak_tflops if peak_tflops else None

    report["peak_tflops"] = peak_tflops or None
    sla = report.get("sla") or {}
    if sla.get("max_rate"):
        fill(sla, sla["throughput"])
    for k, v in (report.get("offline_engine") or {}).items():
        if k.isdigit():
            fill(v, v["throughput"])


def update_sweep_summary(sweep_dir: str, run_dir: str, report: Dict[str, Any], overrides: List[str]) -> str:
    """multirun：把本次运行加入 sweep 目录下的 summary.json / summary.csv / summary.md。"""
    os.makedirs(sweep_dir, exist_ok=True)
    store = os.path.join(sweep_dir, "summary.json")
    rows = json.load(open(store)) if os.path.exists(store) else []
    sla = report.get("sla") or {}
    best_closed = max(report.get("closed_loop", []), key=lambda p: p["throughput"], default=None)
    rows.append({"run": os.path.basename(run_dir), "overrides": " ".join(overrides),
                 "sla_max_rate": sla.get("max_rate"), "sla_p99_ms": sla.get("p99_ms"),
                 "sla_avg_batch": sla.get("avg_batch"), "sla_gpu_util": sla.get("gpu_util"),
                 "closed_best_throughput": best_closed["throughput"] if best_closed else None,
                 "closed_best_p99_ms": best_closed["latency_ms"]["p99"] if best_closed else None})
    with open(store, "w") as f:
        json.dump(rows, f, indent=2, ensure_ascii=False)
    cols = list(rows[0])
    with open(os.path.join(sweep_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    fmt = lambda v: "-" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    md = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    md += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    path = os.path.join(sweep_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path
