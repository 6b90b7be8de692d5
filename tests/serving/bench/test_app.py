"""压测入口的构建变体与汇总表：决定产物的选项不同就构建到自己的目录、存在就复用；multirun 写一张对比表。"""
import dataclasses
import json
import os

import pytest

from algorithm.serving.bench import app


def test_variants_are_built_once_and_reused(built, monkeypatch):
    cfg, result = built
    # 与已构建的仓库相同的产物选项：直接用它
    assert app.ensure_built(cfg, log_fn=lambda s: None) == result.repository
    fp16 = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, precision="fp16"))
    assert app.variant_dir(fp16) != app.variant_dir(cfg) and "fp16" in app.variant_dir(fp16)
    repo = app.ensure_built(fp16, log_fn=lambda s: None)
    assert repo.startswith(app.variant_dir(fp16))
    info = json.load(open(os.path.join(repo, "build_info.json")))
    assert info["config"]["export"]["precision"] == "fp16" and info["gates"]["passed"]
    # 第二次：复用，不再构建；Triton 设置不属于产物选项
    monkeypatch.setattr("algorithm.serving.build.build", lambda *a, **k: (_ for _ in ()).throw(AssertionError("重建了")))
    triton = dataclasses.replace(fp16, triton=dataclasses.replace(fp16.triton, max_queue_delay_us=7))
    assert app.ensure_built(triton, log_fn=lambda s: None) == repo


def test_sweep_summary_is_one_table(tmp_path):
    def report(rate, precision):
        return {"engine": "onnxruntime", "precision": precision,
                "headline": {"repeats": 2, "sla_rate": {"median": rate, "min": rate - 1, "max": rate + 1, "values": [rate - 1, rate + 1]},
                             "closed_loop": {"4": {"throughput": {"median": 3.0, "min": 2.0, "max": 4.0, "values": [2.0, 4.0]}}}},
                "offline_engine": {"64": {"batch": 64, "throughput": 100.0}, "gpu": {"sm_clock_mhz": 1700.0 + rate}}}

    sweep = str(tmp_path / "sweep")
    common = ["model=ugt_tiny", "triton.instance_count=1"]
    app.update_sweep_summary(sweep, str(tmp_path / "0"), report(10.0, "fp32"), common + ["precision=fp32"])
    path = app.update_sweep_summary(sweep, str(tmp_path / "1"), report(20.0, "int8"), common + ["precision=int8"])
    lines = open(path).read().splitlines()
    assert len(lines) == 4 and "| precision=fp32 |" in lines[2] and "| precision=int8 |" in lines[3]
    assert "20.0 [19.0–21.0]" in lines[3] and "100.0" in lines[3]
    assert "offline_sm_clock_mhz" in lines[0] and "| 1720 |" in lines[3]  # 离线那段时间忙时的 SM 时钟
    # 各行相同的覆盖不进表（在 summary.json / csv 的 overrides 里）
    assert "model=ugt_tiny" not in open(path).read()
    assert json.load(open(os.path.join(sweep, "summary.json")))[0]["overrides"].startswith("model=ugt_tiny")
    # 中断过的运行：note 列写明，完成的重复数在 completed_repeats
    cut = report(30.0, "fp16") | {"incomplete": "第 3/3 次重复中断：开环 2500/s：卡住"}
    path = app.update_sweep_summary(sweep, str(tmp_path / "2"), cut, common + ["precision=fp16"])
    last = open(path).read().splitlines()[-1]
    assert "中断：第 3/3 次重复中断" in last and "| 2 |" in last
    assert lines[3].endswith("| 2 |  | precision=int8 |")  # 没中断的行 note 为空


def test_a_stalled_repeat_keeps_the_finished_ones_and_says_where_it_stopped():
    """某次重复卡住（StalledError）：之前完成的进报告，这次已测完的点放在 interrupted_points，不再做后面的重复。"""
    from types import SimpleNamespace

    from algorithm.errors import StalledError
    from algorithm.serving.bench.suite import headline
    from algorithm.serving.config import BenchmarkConfig

    bench = SimpleNamespace(on_point=None)
    calls = []

    def once():
        calls.append(1)
        bench.on_point({"mode": "open", "offered_rate": 100.0 * len(calls), "_client": "大"})
        if len(calls) == 2:
            raise StalledError("开环 200/s：发压进程卡住；服务器的统计接口 5 s 内没有回答")
        return {"sla": {"max_rate": 100.0}}

    report = {"runs": []}
    app.measure_runs(bench, BenchmarkConfig(repeats=3), report, once)
    assert len(calls) == 2 and report["runs"] == [{"sla": {"max_rate": 100.0}}]
    assert report["incomplete"].startswith("第 2/3 次重复中断：开环 200/s") and "没有回答" in report["incomplete"]
    assert report["interrupted_points"] == [{"mode": "open", "offered_rate": 200.0}]  # 私有的客户端数据不进报告
    assert bench.on_point is None and headline(report["runs"])["sla_rate"]["median"] == 100.0


def _fake_sla_bench(stall_on_trace: bool):
    """SLA 搜索确认 300/s 的替身压测；记下每个开环点是否开着追踪。stall_on_trace：开着追踪的点卡住。"""
    from types import SimpleNamespace

    from algorithm.errors import StalledError

    points = []

    def open_loop(rate, duration_s=None, label="", hook=None, **kw):
        points.append({"rate": rate, "label": label, "traced": hook is not None})
        if hook is not None and stall_on_trace:
            raise StalledError("开环 300/s：发压进程卡住")
        return {"offered_rate": rate, "label": label}

    def sla_search(slo_ms):
        points.append({"rate": 300.0, "label": "确认", "traced": False})  # 真的 sla_search 不再接受追踪的钩子
        return {"max_rate": 300.0, "points": []}

    tracer = SimpleNamespace(session=object(), breakdown=lambda p: {"traced": 7, "point": p["label"]})
    # 没有 GPU 的采样器（handles 为空）：run_once 不取 GPU 进程快照
    bench = SimpleNamespace(open_loop=open_loop, sla_search=sla_search, on_point=None,
                            gpu=SimpleNamespace(handles=[]), own_pids=None)
    return bench, tracer, points


def test_the_sla_confirmation_is_not_traced_and_a_separate_point_is():
    """确认点不开追踪（量的是不被追踪打扰的服务）；同一速率单独一个开着追踪的点给出分解，不参与 SLA 的判定。"""
    from algorithm.serving.bench.suite import run_once
    from algorithm.serving.config import BenchmarkConfig

    bench, tracer, points = _fake_sla_bench(stall_on_trace=False)
    cfg = BenchmarkConfig(concurrency=[], rates=[], light_rate=0.0, floor=False, trace_rate=10)
    run = run_once(bench, cfg, 30.0, tracer=tracer, sla_tracer=tracer)
    assert points == [{"rate": 300.0, "label": "确认", "traced": False},
                      {"rate": 300.0, "label": "SLA 追踪", "traced": True}]
    assert run["sla"]["max_rate"] == 300.0 and run["trace"] == {"traced": 7, "point": "SLA 追踪"}
    # 不在 SLA 速率上追踪（Triton < 2.57 时的默认，trace.sla_point_policy）：没有那个点
    points.clear()
    run = run_once(bench, cfg, 30.0, tracer=tracer, sla_tracer=None)
    assert points == [{"rate": 300.0, "label": "确认", "traced": False}] and "trace" not in run


def test_a_stall_on_the_traced_point_keeps_that_repeats_sla():
    """卡在 SLA 之后开着追踪的点上：这次的 SLA 照样算进结果（2026-11-28 两次卡住都在开着追踪的确认点上，那时整次都丢了），
    报告写明卡在哪里，不再做后面的重复。"""
    from algorithm.serving.bench.suite import headline, run_once
    from algorithm.serving.config import BenchmarkConfig

    bench, tracer, points = _fake_sla_bench(stall_on_trace=True)
    cfg = BenchmarkConfig(concurrency=[], rates=[], light_rate=0.0, floor=False, trace_rate=10, repeats=3)
    report = {"runs": []}
    app.measure_runs(bench, cfg, report, lambda: run_once(bench, cfg, 30.0, tracer=tracer, sla_tracer=tracer))
    assert len(report["runs"]) == 1 and headline(report["runs"])["sla_rate"]["median"] == 300.0
    assert "开着追踪的点（300/s，SLA 已测完）" in report["incomplete"] and report["incomplete"].startswith("第 1/3 次")
    assert "trace" not in report["runs"][0] and "卡住" in report["runs"][0]["stalled"]
    assert len(points) == 2  # 没有再做第 2、3 次


def test_soak_rate_falls_back_to_the_unconfirmed_search_rate():
    """浸泡的依据：确认过的 SLA 速率 > soak_rate 反推 > 搜索得到但没确认的速率（写明未确认）> 不做（写明原因）。"""
    from algorithm.serving.config import BenchmarkConfig

    b = BenchmarkConfig()
    runs = [{"sla": {"search_rate": 562.5, "max_rate": None}}, {"sla": {"search_rate": 500.0, "max_rate": None}},
            {"sla": {"search_rate": None, "max_rate": None}}]
    confirmed = {"headline": {"sla_rate": {"median": 1125.0}}, "runs": runs}
    assert app.soak_sla_rate(confirmed, b) == (1125.0, "")
    none = {"headline": {"sla_rate": {"median": None}}, "runs": runs}
    sla, note = app.soak_sla_rate(none, b)
    assert sla == 531.25 and "未确认" in note
    fixed = dataclasses.replace(b, soak_rate=350.0, soak_fraction=0.7)
    sla, note = app.soak_sla_rate(none, fixed)
    assert sla == pytest.approx(500.0) and note == ""
    sla, note = app.soak_sla_rate({"headline": {"sla_rate": {}}, "runs": runs[2:]}, b)
    assert sla == 0.0 and "没有做浸泡" in note


def test_light_load_point_is_traced(built, tmp_path, capsys):
    """轻负载点开着追踪（issue #11 的 P99/P50 一行要能分解）：追踪与客户端对上，摘要里有这个点的分解。"""
    cfg, _ = built
    b = dataclasses.replace(cfg.benchmark, repeats=1, concurrency=[], sla_search=False, light_rate=20.0,
                            light_duration_s=1.5, floor=False, trace_rate=1, offline_samples=0, warmup_requests=5,
                            processes=1, length_median=30, output_dir=str(tmp_path / "bench"))
    report = app.benchmark_from_config(dataclasses.replace(cfg, benchmark=b), str(tmp_path))
    run = report["runs"][0]
    t = run["light_trace"]
    assert t["traced"] >= 0.9 * run["light"]["ok"] and t["trace_rate"] == 1, (t, run["light"]["ok"])
    assert t["slowest_request"]["ugt_engine.compute"] > 0 and "trace" not in run  # 没有 SLA 搜索
    out = capsys.readouterr().out
    assert "轻负载点的追踪（20.0/s" in out
    # 默认 server.mps=auto：CPU 上的引擎不开 MPS，报告与摘要写明原因
    assert report["mps"] == {"setting": "auto", "active": False, "reason": "auto：引擎实例不在 GPU 上"}
    assert "CUDA MPS：不开（auto：引擎实例不在 GPU 上）" in out


def test_soak_and_overload_run_from_the_benchmark_config(built, tmp_path, capsys):
    """benchmark.soak_s / overload_s 从压测入口跑（GPU 上是 10 分钟与 60 s）：报告里有每窗的数字与判定，摘要里有两行。"""
    cfg, _ = built
    b = dataclasses.replace(cfg.benchmark, repeats=1, concurrency=[1], sla_search=False, light_rate=0.0, floor=False,
                            trace_rate=0, offline_samples=0, warmup_requests=5, processes=1, length_median=30,
                            soak_rate=10.0, soak_fraction=0.5, soak_s=2.0, soak_window_s=1.0, overload_s=1.0,
                            soak_trace_rate=1,
                            overload_factor=1.5, output_dir=str(tmp_path / "bench"))
    report = app.benchmark_from_config(dataclasses.replace(cfg, benchmark=b), str(tmp_path))
    sk, ov = report["soak"], report["overload"]
    # 没有测 SLA：SLA 速率由 soak_rate / soak_fraction 反推，过载 = 1.5 x 20
    assert report["soak_sla_rate"] == 20.0 and ov["rate"] == 30.0 and sk["rate"] == 10.0
    assert len(sk["windows"]) == 2 and sk["errors"] == 0 and sk["windows"][-1]["rss_mb"] > 0
    # 浸泡的每窗开着追踪（每个请求都追踪）：追踪与客户端对上了，最慢一个请求的各步排队 / 计算都是非负的时长，
    # 步间的间隙只可能是很小的负数（下一步的 QUEUE_START 早于上一步的 COMPUTE_END 被记录）：对错了父子追踪就不是这样
    for w in sk["windows"]:
        t = w["trace"]
        assert t["traced"] >= 0.9 * w["ok"] and t["trace_rate"] == 1, (t, w["ok"])
        r = t["slowest_request"]
        assert all(v >= 0 for k, v in r.items() if k.endswith((".queue", ".compute"))), r
        assert all(v > -1.0 for k, v in r.items() if k.endswith(".gap")), r
        assert r["ugt_engine.compute"] > 0
        # python backend 记下 COMPUTE_INPUT_END / COMPUTE_OUTPUT_START：各步的 compute 拆成三段，都非负
        split = t["compute_split"]["p50"]
        assert {"ugt_engine.compute.input", "ugt_engine.compute.infer", "ugt_engine.compute.output"} <= set(split), split
        assert all(v >= 0 for v in split.values()), split
        # 最慢一个请求：三段加起来就是它的 compute（拆分用的是同一个请求的时间戳）
        parts = [r[f"ugt_engine.compute.{p}"] for p in ("input", "infer", "output")]
        assert sum(parts) == pytest.approx(r["ugt_engine.compute"], abs=1e-6), (parts, r)
    assert "runs" in report and not report["runs"][0].get("trace")  # trace_rate=0：SLA 点不追踪
    assert set(ov["checks"]) == {"only_refusals", "accepted_p99", "refused_fast", "no_500ms_steps"}
    saved = json.load(open(report["files"]["json"]))
    assert saved["soak"]["windows"][0]["p99_ms"] == sk["windows"][0]["p99_ms"]
    out = capsys.readouterr().out
    assert "浸泡 10/s x 2 s（2 窗）" in out and "过载 30/s x 1 s" in out and "最慢的被追踪请求在第" in out


def test_an_offline_failure_keeps_the_served_numbers(built, tmp_path, monkeypatch, capsys):
    """引擎离线那一步失败（例如 GPU 上显存不够）：报告照样写出，服务的数字都在，离线一节写明原因。"""
    from algorithm.serving.bench import offline

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(offline, "offline_engine_throughput", boom)
    # 顺带：服务器日志里的崩溃痕迹（crash_lines）经 app 的接线进报告与摘要
    from algorithm.serving.server import EmbeddedTritonServer

    monkeypatch.setattr(EmbeddedTritonServer, "crash_lines", lambda self: ["Signal (11) received."])
    cfg, _ = built
    b = dataclasses.replace(cfg.benchmark, repeats=1, concurrency=[1], sla_search=False, light_rate=0.0, floor=False,
                            trace_rate=0, offline_samples=10, warmup_requests=2, processes=1, length_median=20,
                            duration_s=1.0, output_dir=str(tmp_path / "bench"))
    report = app.benchmark_from_config(dataclasses.replace(cfg, benchmark=b), str(tmp_path))
    assert report["offline_engine"] == {"error": "RuntimeError: CUDA out of memory"}
    assert report["runs"][0]["closed_loop"][0]["ok"] > 0 and os.path.isfile(report["files"]["json"])
    out = capsys.readouterr().out
    assert "引擎离线吞吐：没有测到（RuntimeError: CUDA out of memory）" in out
    assert report["server_crash"] == ["Signal (11) received."]
    assert "！tritonserver 的日志里有崩溃的痕迹：Signal (11) received." in out


def test_gpm_sm_activity_reaches_headline_report_and_summary(tmp_path):
    """SLA 点的 GPM 读数（SM 活跃、张量核活跃）进头条的中位数 [最小–最大]、报告的 SLA 一行与 multirun 汇总表；
    没有 GPM 的运行（CPU、旧 GPU）这几处不出现或写 -。"""
    from algorithm.serving.bench.report import summary_table
    from algorithm.serving.bench.suite import headline

    runs = [{"sla": {"max_rate": 100.0, "gpu_util": 70.0, "gpu_sm_active": a, "gpu_tensor_active": a / 4,
                     "gpu_power_w": 400.0}} for a in (60.0, 80.0, 64.0)]
    h = headline(runs)
    assert h["sla_gpu_sm_active"] == {"median": 64.0, "min": 60.0, "max": 80.0, "values": [60.0, 80.0, 64.0]}
    assert h["sla_gpu_tensor_active"]["median"] == 16.0
    text = summary_table({"headline": h, "slo_ms": 30.0})
    assert "SM 活跃 64.0 [60.0–80.0] %、张量核 16.0 [15.0–20.0] %（GPM）" in text
    path = app.update_sweep_summary(str(tmp_path / "s"), str(tmp_path / "0"), {"headline": h}, ["server.mps=true"])
    head, _, row = open(path).read().splitlines()
    cols = [c.strip() for c in head.strip("|").split("|")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[cols.index("sla_sm_active")] == "64.0 [60.0–80.0]" and cells[cols.index("sla_power_w")] == "400"
    h0 = headline([{"sla": {"max_rate": 100.0, "gpu_util": 70.0}}])
    assert "GPM" not in summary_table({"headline": h0, "slo_ms": 30.0})
