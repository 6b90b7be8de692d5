"""perf_analyzer 交叉检查：装有它时，用同样分布的原始历史在同一模型上跑闭环并发扫描，并列它的数字。"""
from __future__ import annotations

import csv
import json
import os
from typing import Any, Dict, Optional

from algorithm.interfaces import HISTORY_INPUT
from algorithm.serving.config import BenchmarkConfig
from algorithm.serving.workload import make_histories


def _perf_analyzer_exe() -> Optional[str]:
    """pip 包 perf_analyzer 自带二进制（perf_analyzer/bin/perf_analyzer）；它的入口脚本用装它时的解释器，
    换了环境会找不到包，所以优先直接用包里的二进制，其次 PATH 上的。"""
    import importlib.util
    import shutil

    spec = importlib.util.find_spec("perf_analyzer")
    if spec and spec.origin:
        exe = os.path.join(os.path.dirname(spec.origin), "bin", "perf_analyzer")
        if os.access(exe, os.X_OK):
            return exe
    return shutil.which("perf_analyzer")


def run_perf_analyzer(grpc_url: str, model_name: str, catalog_path: str, cfg: BenchmarkConfig,
                      max_seq_length: int, out_dir: str) -> Dict[str, Any]:
    """若装有 perf_analyzer，用同样分布的原始历史在同一模型上跑闭环并发扫描，返回它的数字。"""
    import subprocess


    exe = _perf_analyzer_exe()
    if not exe:
        return {"available": False, "reason": "未找到 perf_analyzer（pip install perf_analyzer；它的 wheel 需要 glibc 2.38+）"}
    if cfg.target != "ensemble":
        return {"available": False, "reason": "perf_analyzer 交叉检查只对 ensemble 目标实现"}
    os.makedirs(out_dir, exist_ok=True)
    histories = make_histories(catalog_path, cfg, 200, max_seq_length, cfg.seed + 500)
    data_path = os.path.join(out_dir, "perf_analyzer_input.json")
    with open(data_path, "w") as f:
        json.dump({"data": [{HISTORY_INPUT: {"content": h.tolist(), "shape": [len(h)]}} for h in histories]}, f)
    rows = []
    # 各并发共用的参数（报告里写这一段；concurrency 为空时也有定义）
    base = [exe, "-m", model_name, "-u", grpc_url, "-i", "grpc", "--input-data", data_path,
            "--measurement-interval", str(int(cfg.duration_s * 1000)), "--percentile=99",
            "--stability-percentage", "20", "--max-trials", "6"]
    for c in cfg.concurrency:
        csv_path = os.path.join(out_dir, f"perf_analyzer_c{c}.csv")
        cmd = base + ["--concurrency-range", str(c), "-f", csv_path]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not os.path.exists(csv_path):
            # 例如 P99 在 max_trials 个窗口内不稳定：记下原因，继续下一个并发
            rows.append({"concurrency": c, "error": (proc.stdout[-1200:] + proc.stderr[-800:]).strip()})
            continue
        with open(csv_path) as f:
            r = next(csv.DictReader(f))
        rows.append({"concurrency": c, "throughput": float(r["Inferences/Second"]),
                     **{f"p{q}_ms": float(r[f"p{q} latency"]) / 1000 for q in (50, 90, 95, 99)}})
    return {"available": True, "command": " ".join(base), "points": rows}
