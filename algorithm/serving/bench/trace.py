"""Triton 追踪（TIMESTAMPS 级）与客户端时间戳对齐：每个被追踪的请求的时间花在哪里。

服务器启动时带 `--trace-config triton,file=<文件>`、`level=OFF`（server_args）；测量期间经追踪 API
（POST /v2/trace/setting）打开 TIMESTAMPS、按 trace_rate 采样，结束后关掉。Triton 每攒够 log_frequency 个
追踪就写一个 <文件>.<序号>，其余的在关掉追踪/服务器退出时写出。

对齐：客户端的时间用 time.monotonic()（CLOCK_MONOTONIC），Triton 的时间戳是 steady_clock 的纳秒，同一台机器上
是同一个钟；每个请求带 request_id（loadgen），ensemble 的追踪按它对应到客户端记录，各步的子追踪按 parent_id 挂上。

一个请求的阶段（毫秒，首尾相接、加起来等于客户端看到的延迟）：
  schedule_lag   计划发送 -> 实际发送（发压端落后）
  client_to_server 发送 -> ensemble REQUEST_START（gRPC 传输与前端解析）
  <步>.gap       上一步结束（或 ensemble 开始）-> 本步 QUEUE_START（ensemble 调度）
  <步>.queue     QUEUE_START -> COMPUTE_START（动态批处理排队）
  <步>.compute   COMPUTE_START -> COMPUTE_END（execute：输入、推理、输出）
  ensemble_tail  最后一步结束 -> ensemble REQUEST_END
  server_to_client REQUEST_END -> 客户端收到（响应序列化、gRPC 发送、客户端解析）

另外（不参与上面首尾相接的和）：<步>.compute 按 COMPUTE_INPUT_END、COMPUTE_OUTPUT_START 拆成 input / infer / output
（compute_split）。python backend 里 input 是父进程把输入放进共享内存，infer 是与存根的往返（含存根解包请求、
model.py 的 execute、打包响应），output 是父进程取回输出：与引擎自己量的 execute 毫秒对照，差就是存根的开销。
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import urllib.request
from typing import Any, Dict, List, Optional

import numpy as np

log = logging.getLogger(__name__)


def server_args(trace_file: str, log_frequency: int = 50) -> List[str]:
    """tritonserver 的启动参数：追踪写到 trace_file，初始关闭（由 Tracer.session 在测量时打开）。"""
    return [f"--trace-config=triton,file={trace_file}", f"--trace-config=triton,log-frequency={log_frequency}",
            "--trace-config=level=OFF", "--trace-config=rate=1000", "--trace-config=count=-1"]


# Triton 2.51（r24.10）的追踪在高速率下会破坏堆：TraceManager::TraceRelease 在持有锁时删掉了锁所在的对象
# （server#7795；PR #8144 修复，最早在 2.57 = r25.04）。崩溃处理函数在信号里再分配内存，于是进程不退出、卡在 malloc 的锁上：
# 请求不再回答、日志里只有一行 “Signal (11) received.”（2026-11-28 H200 上那次卡住的服务器日志，本机 2.51 上以每个请求都追踪复现）
SAFE_TRACE_VERSION = (2, 57)


def triton_version(http_url: str, timeout: float = 5.0) -> Optional[tuple]:
    """服务器元数据（GET /v2）里的版本，例如 (2, 51, 0)；读不到时 None。"""
    try:
        with urllib.request.urlopen(f"http://{http_url}/v2", timeout=timeout) as r:
            version = json.loads(r.read()).get("version", "")
        return tuple(int(x) for x in version.split(".")[:3])
    except (OSError, ValueError, AttributeError):
        return None


def sla_point_policy(mode: str, version: Optional[tuple]) -> "tuple[bool, str]":
    """SLA 速率上要不要开追踪（benchmark.trace_sla_point），以及一句说明（不测或自担风险时写进报告）。"""
    shown = ".".join(map(str, version)) if version else "未知"
    if mode == "off":
        return False, "SLA 速率上的追踪点：benchmark.trace_sla_point=off，没有测"
    safe = version is not None and version[:2] >= SAFE_TRACE_VERSION
    if mode == "on":
        return True, "" if safe else (f"SLA 速率上照样开追踪（trace_sla_point=on），但 Triton {shown} 的高速率追踪可能让服务器崩溃后"
                                      "卡死（server#7795，2.57 修复）")
    if safe:
        return True, ""
    return False, (f"SLA 速率上的追踪点没有测：Triton {shown} 的追踪在高速率下会让服务器崩溃后卡死（server#7795，2.57 修复；"
                   "2026-11-28 两次卡住都是它）；要测用 benchmark.trace_sla_point=on，或用 Triton >= 2.57（生产镜像 25.10）")


class Tracer:
    def __init__(self, http_url: str, trace_file: str, rate: int, ensemble: str, steps: List[str]):
        self.http_url = http_url
        self.trace_file = trace_file
        self.rate = int(rate)
        self.ensemble = ensemble
        self.steps = list(steps)
        self._seen: set = set()

    def _post(self, settings: Dict[str, Any]) -> None:
        req = urllib.request.Request(f"http://{self.http_url}/v2/trace/setting", data=json.dumps(settings).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            r.read()

    @contextlib.contextmanager
    def session(self, rate: Optional[int] = None):
        """测量期间打开 TIMESTAMPS 追踪（每 rate 个请求一个，默认构造时的 rate），结束后关掉（关掉时 Triton 写出余下的追踪）。"""
        try:
            self._post({"trace_level": ["TIMESTAMPS"], "trace_rate": str(int(rate or self.rate)), "trace_count": "-1"})
        except OSError as e:
            log.warning("打开追踪失败（%s）：这个点没有分解", e)
            yield
            return
        try:
            yield
        finally:
            try:
                self._post({"trace_level": ["OFF"]})
            except OSError as e:
                log.warning("关闭追踪失败：%s", e)

    # ------------------------------------------------------------ 解析

    def _read_new(self) -> List[dict]:
        entries: List[dict] = []
        for path in sorted(glob.glob(self.trace_file + "*")):
            if path in self._seen:
                continue
            try:
                with open(path) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if not text:
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                continue  # 还在写：下次再读
            self._seen.add(path)
            entries.extend(data if isinstance(data, list) else [data])
        return entries

    def breakdown(self, point: Dict[str, Any], rate: Optional[int] = None) -> Dict[str, Any]:
        """把这个点期间写出的追踪与它的客户端时间戳对齐，给出中位请求、最慢 1% 与最慢一个请求的分解。"""
        traces = merge_entries(self._read_new())
        client = index_client(point.get("_client", {}).get("results", []))
        rows = join(traces, client, self.ensemble, self.steps)
        return summarize(rows, self.steps) | {"offered_rate": point.get("offered_rate"),
                                              "trace_rate": int(rate or self.rate)}


def merge_entries(entries: List[dict]) -> Dict[int, dict]:
    """Triton 把一个追踪分成几条记录（元数据一条、时间戳一条或多条），按 id 合并。"""
    out: Dict[int, dict] = {}
    for e in entries:
        if "id" not in e:
            continue
        t = out.setdefault(int(e["id"]), {"timestamps": {}})
        for k, v in e.items():
            if k == "timestamps":
                for ts in v:
                    t["timestamps"].setdefault(ts["name"], int(ts["ns"]))
            elif k != "id":
                t[k] = v
    return out


def index_client(results: List[Dict[str, Any]]) -> Dict[str, tuple]:
    """request_id -> (计划发送, 实际发送, 完成)（秒，monotonic）。"""
    idx: Dict[str, tuple] = {}
    for r in results:
        prefix = r.get("id_prefix", "r")
        for i, (a, b, c) in enumerate(zip(r["intended"], r["sent"], r["done"])):
            if not np.isnan(c):
                idx[f"{prefix}-{i}"] = (float(a), float(b), float(c))
    return idx


def join(traces: Dict[int, dict], client: Dict[str, tuple], ensemble: str, steps: List[str]) -> List[Dict[str, float]]:
    children: Dict[int, Dict[str, dict]] = {}
    for t in traces.values():
        pid = t.get("parent_id")
        if pid:
            children.setdefault(int(pid), {})[t.get("model_name", "")] = t
    rows = []
    for tid, t in traces.items():
        if t.get("model_name") != ensemble or t.get("parent_id"):
            continue
        c = client.get(str(t.get("request_id", "")))
        ts = t["timestamps"]
        if c is None or "REQUEST_START" not in ts or "REQUEST_END" not in ts:
            continue
        intended, sent, done = (x * 1e9 for x in c)
        row = {"latency": (done - intended) / 1e6, "schedule_lag": (sent - intended) / 1e6,
               "client_to_server": (ts["REQUEST_START"] - sent) / 1e6}
        prev = ts["REQUEST_START"]
        complete = True
        for step in steps:
            ch = children.get(tid, {}).get(step)
            if ch is None:
                complete = False
                break
            s = ch["timestamps"]
            q0 = s.get("QUEUE_START", s.get("REQUEST_START"))
            c0, c1 = s.get("COMPUTE_START"), s.get("COMPUTE_END")
            if q0 is None or c0 is None or c1 is None:
                complete = False
                break
            row[f"{step}.gap"] = (q0 - prev) / 1e6
            row[f"{step}.queue"] = (c0 - q0) / 1e6
            row[f"{step}.compute"] = (c1 - c0) / 1e6
            ci, co = s.get("COMPUTE_INPUT_END"), s.get("COMPUTE_OUTPUT_START")
            if ci is not None and co is not None:
                row[f"{step}.compute.input"] = (ci - c0) / 1e6
                row[f"{step}.compute.infer"] = (co - ci) / 1e6
                row[f"{step}.compute.output"] = (c1 - co) / 1e6
            prev = c1
        if not complete:
            continue
        row["ensemble_tail"] = (ts["REQUEST_END"] - prev) / 1e6
        row["server_to_client"] = (done - ts["REQUEST_END"]) / 1e6
        rows.append(row)
    return rows


def stage_names(steps: List[str]) -> List[str]:
    names = ["schedule_lag", "client_to_server"]
    for s in steps:
        names += [f"{s}.gap", f"{s}.queue", f"{s}.compute"]
    return names + ["ensemble_tail", "server_to_client"]


def summarize(rows: List[Dict[str, float]], steps: List[str]) -> Dict[str, Any]:
    names = stage_names(steps)
    if not rows:
        return {"traced": 0, "note": "没有对齐上的追踪（追踪未开启、未写出或 request_id 对不上）"}
    lat = np.array([r["latency"] for r in rows])
    order = np.argsort(lat)
    med = rows[int(order[len(order) // 2])]
    k = max(1, int(round(len(rows) * 0.01)))
    slow = [rows[int(i)] for i in order[-k:]]
    mean_slow = {n: float(np.mean([r[n] for r in slow])) for n in names + ["latency"]}
    split = [f"{st}.compute.{part}" for st in steps for part in ("input", "infer", "output")
             if all(f"{st}.compute.{part}" in r for r in rows)]
    return {"traced": len(rows), "stages": names, "median_request": {n: med[n] for n in names + ["latency"]},
            "slowest_1pct": {"count": k, "mean": mean_slow,
                             "latency_ms": [float(r["latency"]) for r in slow]},
            # 最慢的一个被追踪的请求（浸泡里偶发的停顿：看它停在哪一步）
            "slowest_request": {n: float(slow[-1][n]) for n in names + ["latency"] + split},
            "stage_p50": {n: float(np.median([r[n] for r in rows])) for n in names},
            "compute_split": {"p50": {n: float(np.median([r[n] for r in rows])) for n in split},
                              "slowest_1pct_mean": {n: float(np.mean([r[n] for r in slow])) for n in split}},
            "unaccounted_ms_max": float(max(abs(r["latency"] - sum(r[n] for n in names)) for r in rows))}


def format_breakdown(b: Dict[str, Any]) -> str:
    if not b or not b.get("traced"):
        return f"  追踪：{(b or {}).get('note', '无')}"
    names = b["stages"]
    med, slow = b["median_request"], b["slowest_1pct"]["mean"]
    lines = [f"  追踪（{b['offered_rate']}/s，每 {b['trace_rate']} 个请求追踪一个，对齐 {b['traced']} 个）："
             f"中位请求 {med['latency']:.2f} ms，最慢 1%（{b['slowest_1pct']['count']} 个）平均 {slow['latency']:.2f} ms",
             "    阶段                     中位请求 ms   最慢 1% 平均 ms"]
    for n in names:
        lines.append(f"    {n:<24} {med[n]:>10.2f}   {slow[n]:>12.2f}")
    split = b.get("compute_split") or {}
    if split.get("p50"):
        lines.append("    compute 的拆分（各自的中位数 / 最慢 1% 平均，ms）：" + "，".join(
            f"{n} {split['p50'][n]:.2f}/{split['slowest_1pct_mean'][n]:.2f}" for n in split["p50"]))
    return "\n".join(lines)
