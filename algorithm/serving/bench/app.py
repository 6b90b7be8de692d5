"""scripts/benchmark.py 背后的流程：找到（或构建）与当前配置相符的引擎产物，按当前 triton/engine 设置生成
一个压测用的仓库（加上地板模型），启动内嵌服务器（开着追踪的输出文件），重复 benchmark.repeats 次整套测量，
测引擎离线吞吐，写报告；multirun 时维护一张跨运行的汇总表。

构建变体：决定引擎产物的选项变了就要重新构建。哪些是产物选项在 config.py 的字段上声明（artifact_field），
ARTIFACT_KEYS 与变体的键都由声明得出。每个变体有自己的构建目录
<build_dir>/variants/<名字>-<哈希>，存在且相符时复用；<build_dir>/model_repository 正好相符时也复用。
所以 `python scripts/benchmark.py -m precision=fp32,int8` 会各构建一次（第二次起复用）、各测一次、写一张对比表。
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import os
from typing import Any, Dict, List, Optional

import numpy as np

from algorithm.errors import StalledError
from algorithm.serving.bench.report import summary_table, write_report
from algorithm.serving.bench.suite import Benchmark, headline, run_once, strip_private
from algorithm.serving.bench.tail import fmt_spread
from algorithm.serving.build import paths
from algorithm.serving.config import ServingConfig, artifact_paths, artifact_values
from algorithm.serving.runtime import shedding
from algorithm.serving.workload import sample_lengths

log = logging.getLogger(__name__)
# 声明为产物选项的全部叶子（改了必须重新构建；其余如 triton.*、server.* 只需重新生成仓库）。
# 带条件的（如 benchmark.length_*）只在条件成立时进变体的键
ARTIFACT_KEYS = artifact_paths()


def _get(d: Dict[str, Any], dotted: str):
    for k in dotted.split("."):
        d = d[k]
    return d


def artifact_key(config: ServingConfig) -> Dict[str, Any]:
    """config 上起作用的产物选项 -> 值（点分路径为键）。"""
    return artifact_values(config)


def variant_dir(config: ServingConfig) -> str:
    key = artifact_key(config)
    digest = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:8]
    name = f"{config.model.name}-{config.engine.kind}-{config.export.precision}-{digest}"
    return os.path.join(os.path.abspath(config.build_dir), "variants", name)


def _built_matches(repo: str, config: ServingConfig) -> bool:
    info = os.path.join(repo, "build_info.json")
    if not os.path.isfile(info):
        return False
    # 旧的 build_info 里没有的产物选项算不相符（重建）；值经 JSON 比较（列表、元组一致）
    want = json.loads(json.dumps(artifact_key(config), default=str))
    try:
        with open(info) as f:
            built = json.load(f)["config"]
        return all(_get(built, k) == v for k, v in want.items())
    except (KeyError, TypeError, ValueError):
        return False


def ensure_built(config: ServingConfig, log_fn=print) -> str:
    """与 config 的产物相符的已构建仓库：先看 <build_dir>/model_repository，再看变体目录，都没有就构建变体。"""
    from algorithm.serving.build import build

    base = paths(config)["repository"]
    if _built_matches(base, config):
        return base
    vdir = variant_dir(config)
    vrepo = os.path.join(vdir, "model_repository")
    marker = os.path.join(vdir, "variant_key.json")
    # 变体用共享的检查点构建（build_info 里的 checkpoint 与请求的不同），所以按请求时的产物选项记一份
    if os.path.isfile(marker) and os.path.isfile(os.path.join(vrepo, "build_info.json")):
        with open(marker) as f:
            if json.load(f) == json.loads(json.dumps(artifact_key(config), default=str)):
                log_fn(f"复用构建变体 {vdir}")
                return vrepo
    log_fn(f"没有与当前产物选项相符的构建：构建变体 {vdir}")
    shared = paths(config)["checkpoint"]
    # 同一模型与训练设置的检查点在变体之间共用（变体通常只差引擎或精度）
    # 用户的模型（model.source != reference）只用它自己给的 checkpoint
    ck = config.checkpoint or (shared if config.model.source == "reference" and os.path.isfile(shared) else "")
    vconfig = dataclasses.replace(config, build_dir=vdir, checkpoint=ck)
    build(vconfig, log=log_fn)
    with open(marker, "w") as f:
        json.dump(artifact_key(config), f, default=str)
    return vrepo


def repository_for_run(config: ServingConfig, out_dir: str, built_repo: str) -> str:
    """用构建好的引擎与目录，按当前 triton/engine 配置在 out_dir 下生成一个仓库（加上地板模型）。"""
    from algorithm.serving.engines import hosting as engine_hosting
    from algorithm.serving.repository import build_repository
    from algorithm.serving.triton_config import ENGINE, PREPROCESS

    hosting = engine_hosting(config)
    artifact = os.path.join(built_repo, ENGINE, "1", hosting.filename)
    extra = [artifact + ".data"] if os.path.exists(artifact + ".data") else []
    if config.engine.kind == "torch" and not config.engine.compile_cache_dir:
        # 编译缓存跟着构建目录走（不跟着每次压测的输出目录）：重启与多实例复用；规则同 engines/torch.compile_cache_dir
        from algorithm.serving.engines import engine_module

        cache = engine_module("torch").compile_cache_dir(dataclasses.replace(config, build_dir=os.path.dirname(built_repo)))
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, compile_cache_dir=cache))
    return build_repository(config, os.path.join(out_dir, "model_repository"), artifact,
                            os.path.join(built_repo, PREPROCESS, "1", "catalog.npz"),
                            info={"config": dataclasses.asdict(config), "base": built_repo},
                            extra_engine_files=extra, include_floor=True)


def model_flops(config: ServingConfig, built_repo: str, lengths: np.ndarray):
    """每请求的平均 FLOPs 与算法。参考模型：与 flops_per_request 相同的公式（测试对照），按引擎实际的解码方式计；
    用户的模型：构建时 torch.utils.flop_counter 在几个长度上数的值（build_info.json），按长度线性插值；
    ONNX 来源没有可数的 PyTorch 模型：0（不报告 MFU）。"""
    from algorithm.serving.bucket_plan import model_cost

    if config.model.source == "reference":
        return (float(np.mean(model_cost(config.model, config.export.decoder_kv_cache)(lengths))),
                "参考模型的 FLOPs 公式（algorithm.models.ugt.flops_per_request）")
    with open(os.path.join(built_repo, "build_info.json")) as f:
        user = json.load(f).get("user_model", {})
    table = user.get("flops_by_length") or {}
    if not table:
        return 0.0, user.get("flops_method", "无")
    xs = np.array(sorted(int(k) for k in table), dtype=np.float64)
    ys = np.array([table[str(int(x))] for x in xs], dtype=np.float64)
    return float(np.mean(np.interp(lengths, xs, ys))), user["flops_method"]


def benchmark_from_config(config: ServingConfig, out_dir: str, overrides: List[str] = ()) -> Dict[str, Any]:
    from tqdm import tqdm

    from algorithm.serving.bench import trace as trace_mod
    from algorithm.serving.server import EmbeddedTritonServer
    from algorithm.serving.triton_config import ENGINE, FLOOR, POSTPROCESS, PREPROCESS, packs_engine_inputs

    from algorithm.serving.engines import resolve_auto

    config = resolve_auto(config)
    b = config.benchmark
    out_dir = os.path.abspath(b.output_dir or out_dir)
    os.makedirs(out_dir, exist_ok=True)
    built = ensure_built(config)
    repo = repository_for_run(config, out_dir, built)
    lengths = sample_lengths(b, 4096, config.export.max_seq_length, b.seed)
    flops, flops_method = model_flops(config, built, lengths)
    contract = config.contract()
    meta = {"overrides": list(overrides), "engine": config.engine.kind, "precision": config.export.precision,
            "model_preset": config.model.name, "triton": dataclasses.asdict(config.triton),
            "engine_config": dataclasses.asdict(config.engine), "built_repository": built,
            "model_flops_per_request": flops, "model_flops_method": flops_method,
            "mean_history_length": float(lengths.mean()),
            "shedding": shedding.describe(config, hosted=packs_engine_inputs(config))}
    contract_kwargs = {"max_seq_length": contract.max_seq_length, "codebook_sizes": list(contract.codebook_sizes),
                       "num_token_types": contract.num_token_types, "top_k": contract.top_k}
    target = config.export.model_name if b.target == "ensemble" else ENGINE
    offline = sorted({1, *config.triton.preferred_batch_sizes}) if b.offline_samples else []
    catalog = os.path.join(repo, PREPROCESS, "1", "catalog.npz")
    slo_ms = b.slo_ms or config.export.target_latency_ms

    def suite(url: str, metrics_url: Optional[str], http_url: Optional[str], trace_file: Optional[str],
              floor: Optional[str], rss_fn=None, crash_fn=None, own_pids_fn=None) -> Dict[str, Any]:
        bench = Benchmark(url, target, b, catalog, config.export.max_seq_length, contract_kwargs,
                          progress=True, metrics_url=metrics_url, kind=b.target)
        if own_pids_fn is not None:
            bench.own_pids = own_pids_fn
        tracer = None
        if trace_file and http_url and (b.trace_rate or b.soak_trace_rate) and b.target == "ensemble":
            tracer = trace_mod.Tracer(http_url, trace_file, b.trace_rate or b.soak_trace_rate, target,
                                      [PREPROCESS, ENGINE, POSTPROCESS])
        report: Dict[str, Any] = {"model": target, "url": url, "slo_ms": slo_ms,
                                  "benchmark": dataclasses.asdict(b), "device": bench.gpu.name or "CPU", **meta}
        sla_tracer = None
        if tracer is not None and b.trace_rate and b.sla_search:
            version = trace_mod.triton_version(http_url)
            traced_sla, note = trace_mod.sla_point_policy(b.trace_sla_point, version)
            sla_tracer = tracer if traced_sla else None
            if version:
                report["triton_version"] = ".".join(map(str, version))
            if note:
                report["trace_note"] = note
                log.warning(note)
        # 每次重复：各并发、各速率、轻负载、SLA 搜索、地板，再加 SLA 速率上的追踪点（测的话）
        steps = b.repeats * (len(b.concurrency) + len(b.rates) + 3 + (1 if sla_tracer is not None else 0)) + 1
        bar = tqdm(total=steps, desc="压测", unit="步", dynamic_ncols=True)

        def step(label: str) -> None:
            bar.set_postfix_str(label)
            bar.update()

        report["runs"] = []
        try:
            bench.warmup()
            measure_runs(bench, b, report, lambda: run_once(bench, b, slo_ms, floor, tracer if b.trace_rate else None,
                                                            step, sla_tracer=sla_tracer))
            crashed = crash_fn() if crash_fn else []
            if crashed:  # 服务器崩溃过（日志里的信号或 glibc 的堆错误）：卡住的原因写进报告
                report["server_crash"] = crashed
                if report.get("incomplete"):
                    report["incomplete"] += f"；tritonserver 崩溃过（日志：{crashed[0]}）"
                log.error("tritonserver 的日志里有崩溃的痕迹：%s", "；".join(crashed[:3]))
            report["headline"] = headline(report["runs"])
            if report.get("incomplete"):
                return report  # 服务器或发压端卡住过：后面的几步（浸泡、离线）不再做，已测的照样写报告
            if b.perf_analyzer:
                from algorithm.serving.bench.perf_analyzer import run_perf_analyzer

                report["perf_analyzer"] = run_perf_analyzer(url, target, catalog, b, config.export.max_seq_length,
                                                            out_dir)
            if b.soak_s or b.overload_s:
                from algorithm.serving.bench import soak as soak_mod

                sla, note = soak_sla_rate(report, b)
                rate = b.soak_rate or b.soak_fraction * sla
                if note:
                    report["soak_note"] = note
                    tqdm.write(note)
                if rate > 0:
                    report["soak_sla_rate"] = sla
                    if b.soak_s:
                        bar.set_postfix_str("浸泡")
                        report["soak"] = soak_mod.soak(bench, rate, b.soak_s, b.soak_window_s, rss_fn, log=tqdm.write,
                                                       tracer=tracer, trace_rate=b.soak_trace_rate)
                    if b.overload_s:
                        bar.set_postfix_str("过载")
                        report["overload"] = soak_mod.overload(bench, b.overload_factor * sla, b.overload_s, slo_ms,
                                                               log=tqdm.write)
            # 离线吞吐放在最后：它在本进程里再加载一份引擎（GPU 上占显存与上下文），不能干扰服务的测量
            if offline:
                from algorithm.serving.bench.offline import offline_engine_throughput

                bar.set_postfix_str("引擎离线吞吐")
                try:
                    with bench.gpu:  # 同时记 GPU 的忙时时钟与功耗：离线数字在两次运行之间差很多时分得出是不是机器降频
                        report["offline_engine"] = offline_engine_throughput(repo, offline, b, config.export.max_seq_length,
                                                                             samples=b.offline_samples)
                    report["offline_engine"]["gpu"] = bench.gpu.result()
                except Exception as e:  # noqa: BLE001  离线那一步失败（例如显存不够）不能让前面测好的服务数字丢掉
                    log.error("引擎离线吞吐失败：%s: %s", type(e).__name__, e)
                    report["offline_engine"] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        finally:
            bar.close()
            _add_overhead(report)
        return report

    if b.url:
        report = suite(b.url, None, None, None, None)
    else:
        trace_file = os.path.join(out_dir, "trace", "trace.json") if (b.trace_rate or b.soak_trace_rate) else None
        if trace_file:
            os.makedirs(os.path.dirname(trace_file), exist_ok=True)
        with EmbeddedTritonServer(repo, config.server, ready_models=[config.export.model_name, FLOOR],
                                  log_path=os.path.join(out_dir, "tritonserver.log"),
                                  extra_args=trace_mod.server_args(trace_file) if trace_file else None) as server:
            url = server.grpc_url if b.protocol == "grpc" else server.http_url
            from algorithm.serving.bench.soak import process_tree_rss_mb

            report = suite(url, server.metrics_url, server.http_url, trace_file, FLOOR,
                           rss_fn=lambda: process_tree_rss_mb(server.process.pid), crash_fn=server.crash_lines,
                           own_pids_fn=server.own_pids)
            report["mps"] = dict(server.mps_state)  # 这次是否开了 CUDA MPS 与原因（server.mps=auto 时由仓库决定）
    add_flops(report, flops, b.peak_tflops)
    report["files"] = write_report(report, out_dir)
    print(summary_table(report))
    m = report["sla_mfu"]
    print(f"模型 FLOPs：每请求 {flops / 1e9:.3g} GFLOP（{flops_method}）" + (
        f"；SLA 点 {m['model_tflops_per_s']:.3g} TFLOP/s" + (f"，MFU {m['mfu']:.2%}" if m["mfu"] is not None else "")
        if m["model_tflops_per_s"] is not None else "；不报告算力与 MFU"))
    print(f"报告：{report['files']['json']}\n      {report['files']['csv']}\n      {report['files']['png']}")
    return report


def measure_runs(bench: Benchmark, b, report: Dict[str, Any], once) -> None:
    """重复 b.repeats 次整套测量，结果追加到 report["runs"]。某次卡住（StalledError）时不再继续：
    report["incomplete"] 写明第几次、哪一步、服务器当时的状态，那次已测完的负载点放在 report["interrupted_points"]；
    之前几次的结果照样进报告（中位数只按完成的几次算）。"""
    from tqdm import tqdm

    points: List[Dict[str, Any]] = []
    bench.on_point = points.append
    try:
        for i in range(b.repeats):
            if b.repeats > 1:
                tqdm.write(f"== 第 {i + 1}/{b.repeats} 次")
            points.clear()
            try:
                report["runs"].append(once())
            except StalledError as e:
                if e.partial_run is not None:  # 卡在 SLA 测完之后（开着追踪的点）：这次的 SLA 等照样算进中位数
                    e.partial_run["stalled"] = str(e)
                    report["runs"].append(e.partial_run)
                report["incomplete"] = f"第 {i + 1}/{b.repeats} 次重复中断：{e}"
                report["interrupted_points"] = strip_private(list(points))
                log.error("压测中断，已完成 %d 次重复%s：%s", i, "（中断的那次 SLA 已测完，算进结果）"
                          if e.partial_run is not None else "", e)
                return
    finally:
        bench.on_point = None


def soak_sla_rate(report: Dict[str, Any], b) -> "tuple[float, str]":
    """浸泡与过载所依据的 SLA 速率与一句说明（没有说明时为空）。依次：本次确认过的 SLA 速率（各次重复的中位数）；
    给了 benchmark.soak_rate 时由 soak_rate / soak_fraction 反推；都没有时用 SLA 搜索得到、但没有通过独立重测的速率
    （各次的中位数），并写明“未确认”——主机抖动大的机器上确认常常失败（2026-11-27 第 4 台），浸泡因此整段落空不如照测。"""
    sla = (report.get("headline") or {}).get("sla_rate", {}).get("median")
    if sla:
        return float(sla), ""
    if b.soak_rate:
        return b.soak_rate / b.soak_fraction, ""
    found = [r["sla"]["search_rate"] for r in report.get("runs", []) if (r.get("sla") or {}).get("search_rate")]
    if found:
        sla = float(np.median(found))
        return sla, (f"SLA 速率没有经独立重测确认：浸泡 / 过载按搜索得到的 {sla:.1f}/s（未确认）计算；"
                     f"要固定速率用 benchmark.soak_rate")
    return 0.0, "没有做浸泡 / 过载：没有 benchmark.soak_rate，本次也没有任何达标的 SLA 速率"


def _add_overhead(report: Dict[str, Any]) -> None:
    """服务开销 = 引擎离线吞吐 b64（与服务同一路径）/ SLA 点的服务吞吐。"""
    off = report.get("offline_engine") or {}
    h = report.get("headline") or {}
    served = (h.get("sla_throughput") or {}).get("median")
    sizes = [k for k in off if k.isdigit()]
    if not served or not sizes:
        return
    big = off[max(sizes, key=int)]
    report["serving_overhead"] = {"offline_batch": big["batch"], "offline_throughput": big["throughput"],
                                  "served_throughput_at_sla": served,
                                  "served_over_offline": served / max(big["throughput"], 1e-9)}


def add_flops(report: Dict[str, Any], flops_per_request: float, peak_tflops: float) -> None:
    """模型 FLOPs/请求 x 吞吐 = 实际算力；给了峰值就再除以峰值得 MFU（SLA 点中位数与离线引擎各一份）。"""
    def mfu(throughput: Optional[float]) -> Dict[str, Optional[float]]:
        if throughput is None or not flops_per_request:  # 没有可数的 FLOPs（ONNX 来源）
            return {"model_tflops_per_s": None, "mfu": None}
        t = throughput * flops_per_request / 1e12
        return {"model_tflops_per_s": t, "mfu": t / peak_tflops if peak_tflops else None}

    report["peak_tflops"] = peak_tflops or None
    h = report.get("headline") or {}
    report["sla_mfu"] = mfu((h.get("sla_throughput") or {}).get("median"))
    off = report.get("offline_engine") or {}
    for section in (off, off.get("grouped") or {}):
        for k, v in section.items():
            if k.isdigit():
                v.update(mfu(v["throughput"]))


def update_sweep_summary(sweep_dir: str, run_dir: str, report: Dict[str, Any], overrides: List[str]) -> str:
    """multirun：把本次运行加入 sweep 目录下的 summary.json / summary.csv / summary.md（一行一个变体）。"""
    os.makedirs(sweep_dir, exist_ok=True)
    store = os.path.join(sweep_dir, "summary.json")
    rows = json.load(open(store)) if os.path.exists(store) else []
    h = report.get("headline") or {}
    off = report.get("offline_engine") or {}
    big = off.get(max((k for k in off if k.isdigit()), key=int, default=""), {}) if off else {}
    piped = (off.get("pipelined") or {}).get(str(big["batch"])) if big else None  # 同一 batch 两批同时在途
    clock = (off.get("gpu") or {}).get("sm_clock_mhz")
    closed = h.get("closed_loop") or {}
    top_c = max(closed, key=int) if closed else None
    rows.append({"run": os.path.basename(run_dir), "overrides": " ".join(overrides),
                 "engine": report.get("engine"), "precision": report.get("precision"),
                 "sla_rate": fmt_spread(h.get("sla_rate")), "sla_p99_ms": fmt_spread(h.get("sla_p99_ms")),
                 "sla_gpu_util": fmt_spread(h.get("sla_gpu_util")),
                 # GPM 的 SM 活跃比例（Hopper 起；读不到时 -）：与 NVML 利用率并列，开 MPS 时两者会分开
                 "sla_sm_active": fmt_spread(h.get("sla_gpu_sm_active")),
                 "sla_power_w": fmt_spread(h.get("sla_gpu_power_w"), 0),  # 忙时功耗：没有 GPM 时做了多少事的旁证
                 "sla_avg_batch": fmt_spread(h.get("sla_avg_batch"), 2),
                 "light_p99_over_p50": fmt_spread(h.get("light_p99_over_p50"), 2),
                 f"closed_c{top_c}_throughput" if top_c else "closed_throughput":
                     fmt_spread(closed[top_c]["throughput"]) if top_c else "-",
                 "offline_max_batch_throughput": f"{big['throughput']:.1f}" if big else "-",
                 "offline_max_batch_pipelined": f"{piped['throughput']:.1f}" if piped else "-",
                 # 离线那段时间 GPU 忙时的 SM 时钟：同一个 multirun 里几行的离线差很多时先看它（机器降频）
                 "offline_sm_clock_mhz": f"{clock:.0f}" if clock is not None else "-",
                 "sla_rate_median": (h.get("sla_rate") or {}).get("median"),
                 # 中断过的运行：中位数只按完成的几次（h["repeats"]）算
                 "completed_repeats": h.get("repeats"),
                 "note": "中断：" + report["incomplete"][:120] if report.get("incomplete") else ""})
    with open(store, "w") as f:
        json.dump(rows, f, indent=2, ensure_ascii=False)
    # 表里的“变体”列只写各行之间不同的覆盖（相同的前缀只在 summary.json / csv 的 overrides 里）
    split = [dict(o.split("=", 1) if "=" in o else (o, "") for o in r["overrides"].split()) for r in rows]
    keys = list(dict.fromkeys(k for d in split for k in d))
    differ = [k for k in keys if len({d.get(k) for d in split}) > 1]
    for r, d in zip(rows, split):
        r["variant"] = " ".join(f"{k}={d[k]}" for k in differ if k in d) or "-"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(sweep_dir, "summary.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerows(rows)
    md_cols = [c for c in cols if c != "overrides"]
    md = ["| " + " | ".join(md_cols) + " |", "|" + " --- |" * len(md_cols)]
    md += ["| " + " | ".join("-" if r.get(c) is None else str(r.get(c)) for c in md_cols) + " |" for r in rows]
    path = os.path.join(sweep_dir, "summary.md")
    with open(path, "w") as f:
        f.write("\n".join(md) + "\n")
    return path


__all__ = ["ARTIFACT_KEYS", "ensure_built", "repository_for_run", "benchmark_from_config", "update_sweep_summary",
           "variant_dir"]
