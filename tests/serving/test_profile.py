"""引擎剖析（algorithm/serving/profile）在 CPU 上的检查：端到端（--quick）构建一个 engine=torch 的 ugt_tiny 仓库
（不编译、5 步训练），运行 cli.main，检查 profile.json / profile.md 的各节；GPU 专有的部分（CUDA 事件、CUDA Graph、
GPU 内核列表）在这里走 CPU 分支。不要仓库的部分（命令行、FLOPs 公式、报告与渲染）单独测。"""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

from algorithm.serving.profile import cli


def _build_torch_repo(tmp_path_factory, pack_rows: bool = False):
    from algorithm.serving.build import build
    from algorithm.serving.config import EngineConfig, ExportConfig, GateConfig, TrainConfig
    from conftest import tiny_config

    d = tmp_path_factory.mktemp("ep_build")
    cfg = tiny_config(str(d), engine=EngineConfig(kind="torch", device="cpu", compile_mode="none", pack_rows=pack_rows),
                      export=ExportConfig(precision="fp32", max_batch_size=16, max_seq_length=256,
                                          validation_shapes=[[1, 3], [3, 17]]),
                      train=TrainConfig(steps=5, batch_size=16, seq_length=16), gates=GateConfig(num_samples=16))
    t0 = time.time()
    result = build(cfg, log=lambda s: None, gpus=[])
    return result.repository, time.time() - t0


@pytest.fixture(scope="module")
def torch_repo(tmp_path_factory):
    return _build_torch_repo(tmp_path_factory)


def test_engine_profile_quick_on_cpu(torch_repo, tmp_path):
    repo, build_s = torch_repo
    out = tmp_path / "profile"
    t0 = time.time()
    data = cli.main(["--repo", repo, "--out", str(out), "--quick"])
    run_s = time.time() - t0
    print(f"\n构建 {build_s:.1f}s，剖析 {run_s:.1f}s")
    assert not data["errors"], data["errors"]
    s = data["sections"]
    assert data["stage_check_passed"] and s["stage_check"]["eager_vs_pt2_overlap"] == 1.0
    stage = next(iter(s["stages"].values()))
    names = [r["stage"] for r in stage["roofline"]]
    assert names[0] == "embed" and "cross_kv" in names and names[-1] == "step3.select"
    assert s["sdpa"]["default_ops"] and s["sdpa"]["backends"]
    assert all(r["rec_equal"] and r["score_max_abs"] < 1e-4 for r in s["self_attention"].values())
    assert s["kv_cache"] and all(r["rec_equal"] and r["overlap"] == 1.0 and r["score_max_abs"] < 1e-4
                                 for r in s["kv_cache"].values())
    assert s["environment"]["decoder_kv_cache"] is True
    assert data["sections"]["load"] and "KV 缓存" in (out / "profile.md").read_text()
    assert {r["name"] for r in s["padding"]["rows"]} >= {"仓库", "规划 4 桶"}
    assert {(r["batch"], r["pack_width"]) for r in s["padding"]["per_execute"]} >= {(2, 0), (2, 256), (4, 0), (4, 256)}
    assert all(r["token_ratio"] >= 1 for r in s["padding"]["per_execute"])
    assert s["throughput"]["gates"]["overlap"] == 1.0  # 同一 fp32 程序
    assert all(r["req_per_s"] > 0 for r in s["throughput"]["rows"])
    assert s["throughput_planned"]["seq_buckets"] == s["padding"]["planned_4"]
    assert s["throughput_planned_8"]["seq_buckets"] == [r for r in s["padding"]["rows"] if r["name"] == "规划 8 桶"][0]["buckets"]
    assert data["skipped"]["concurrency"].startswith("要 CUDA")  # 几张图在不同流上同时重放：只在 GPU 上
    runs = s["kernels_compiled"]["runs"]
    tb = [r["batch"] for r in s["throughput"]["rows"]]
    assert [r["shape"].split("x")[0] for r in runs] == [f"b{min(tb)}", f"b{max(tb)}"], runs
    assert all(r["top"] and r["launches"] >= len(r["top"]) and 0 < r["busy_ms"] for r in runs)
    try:
        import torchao  # noqa: F401
    except ImportError:
        assert "throughput_int8" in data["skipped"]
    else:
        g = s["throughput_int8_dynamic"]["gates"]
        assert g["rows"] == 32 and g["passed"] == (g["overlap"] >= 0.95 and g["top1_agreement"] >= 0.97)
        # int8 也有最小 batch 的内核（CPU 上是算子）表，与 fp16 的对照（GPU 上用来找 int8 慢在哪里）
        # int8 矩阵乘各条路的次数（CPU 上 torchao 走自己的 CPU 实现，不经过 capture_safe_int_mm，所以都是 0；GPU 上看回退）
        assert set(s["throughput_int8_dynamic"]["int_mm_paths"]) == {"compiled", "cublas_int8", "cublas_int8_tn", "cpu_int32", "fp32_fallback"}
        k8 = s["throughput_int8_dynamic"]["kernels"]
        assert [r["shape"].split("x")[0] for r in k8] == [f"b{min(tb)}"] and k8[0]["launches"] > 0
        assert "int8_dynamic，b" in (out / "profile.md").read_text()
    md = (out / "profile.md").read_text()
    assert "SDPA" in md and "离线吞吐" in md
    assert json.loads((out / "profile.json").read_text())["sections"].keys() == s.keys()
    # --only：只跑点名的节（GPU 上单独测 int8 时用），其余的写明跳过原因
    only = cli.main(["--repo", repo, "--out", str(tmp_path / "only"), "--quick", "--only", "throughput"])
    assert set(only["sections"]) == {"environment", "load", "throughput"}
    assert only["skipped"]["stages"] == "不在 --only 里" and only["stage_check_passed"] is None
    # int8 的底本与构建相同（GPU 上 bf16）；这里在 CPU 上强制 bf16，走“按底本精度重新导出”那条路
    b = cli.main(["--repo", repo, "--out", str(tmp_path / "bf16"), "--quick", "--only", "int8",
                        "--int8-base", "bf16", "--int8-modes", "weight_only"])
    try:
        import torchao  # noqa: F401
    except ImportError:
        pass
    else:
        r = b["sections"]["throughput_int8_weight_only"]
        assert r["base"] == "bf16" and r["gates"]["rows"] == 32 and r["gates"]["overlap"] > 0.9, r["gates"]
    with pytest.raises(SystemExit):  # 拼错的节名不能悄悄跳过所有节
        cli.parse_args(["--repo", repo, "--out", str(tmp_path), "--only", "throughput_int8"])


def test_load_repository_reads_both_parameter_formats(tmp_path):
    """仓库参数的两种格式：逐项的键（现在）与一个 JSON 键 ugt_serving（{"config", "runtime"}，重构中）。"""
    from algorithm.serving.config import EngineConfig
    from algorithm.serving.triton_config import parse_pbtxt, to_pbtxt
    from conftest import tiny_config
    import dataclasses

    from algorithm.serving.profile.repository import load_repository

    cfg = tiny_config(str(tmp_path / "b"), engine=EngineConfig(kind="torch", device="cpu",
                                                                 seq_buckets=[64, 128]))
    runtime = {"engine_kind": "torch", "engine_file": "model.pt2", "device": "cuda", "seq_buckets": [64, 128, 256],
               "batch_buckets": [2, 8, 16], "catalog_file": "catalog.npz", "compile_cache_dir": "/x/cache",
               "compile_mode": "default", "cuda_graphs": True}
    flat = {"engine_kind": "torch", "engine_file": "model.pt2", "device": "cuda", "seq_buckets": "64,128,256",
            "batch_buckets": "2,8,16", "compile_cache_dir": "/x/cache", "compile_mode": "default", "cuda_graphs": "1",
            "precision": "fp32", "max_seq_length": "256"}
    for name, params in (("json", {"ugt_serving": json.dumps({"config": dataclasses.asdict(cfg), "runtime": runtime})}),
                         ("flat", flat)):
        repo = tmp_path / name / "model_repository"
        (repo / "ugt_engine" / "1").mkdir(parents=True)
        (repo / "ugt_preprocess" / "1").mkdir(parents=True)
        (repo / "ugt_preprocess" / "1" / "catalog.npz").write_bytes(b"")
        mc = parse_pbtxt('name: "ugt_engine"')
        for k, v in params.items():
            mc.parameters[k].string_value = v
        (repo / "ugt_engine" / "config.pbtxt").write_text(to_pbtxt(mc))
        if name == "flat":
            (repo / "build_info.json").write_text(json.dumps({"config": dataclasses.asdict(cfg)}))
        meta = load_repository(str(repo))
        assert meta["seq_buckets"] == [64, 128, 256] and meta["batch_buckets"] == [2, 8, 16]
        assert meta["cuda_graphs"] is True and meta["compile_mode"] == "default"
        assert meta["engine_file"].endswith("ugt_engine/1/model.pt2") and meta["catalog"].endswith("catalog.npz")
        assert meta["model"]["d_model"] == cfg.model.d_model and meta["max_seq_length"] == 256
        assert meta["checkpoint"] is None  # 构建目录里没有检查点：门禁退回 .pt2 权重的 fp32


def test_engine_profile_on_packed_rows_repository(tmp_path_factory, tmp_path):
    """engine.pack_rows 的仓库（.pt2 是拼行的程序，权重名多一层 model.）：加载、分阶段对照与离线吞吐照常；
    按 [B, L] 直接调用编译函数的两节写明不适用。"""
    repo, _ = _build_torch_repo(tmp_path_factory, pack_rows=True)
    data = cli.main(["--repo", repo, "--out", str(tmp_path / "p"), "--quick",
                           "--only", "stage_check,throughput,kernels_compiled"])
    assert not data["errors"], data["errors"]
    s = data["sections"]
    assert s["load"]["packed_rows"] is True
    assert data["stage_check_passed"] and s["stage_check"]["eager_vs_pt2_overlap"] == 1.0
    assert s["throughput"]["gates"]["overlap"] == 1.0 and all(r["req_per_s"] > 0 for r in s["throughput"]["rows"])
    assert "拼行" in data["skipped"]["kernels_compiled"]


# ---- 不要仓库的部分 ----

def test_help_runs_without_loading_torch():
    """python -m algorithm.serving.profile --help 可用；命令行模块不导入 torch（各节在 main 里才导入）。"""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    r = subprocess.run([sys.executable, "-m", "algorithm.serving.profile", "--help"], capture_output=True, text=True,
                       timeout=60, cwd=REPO_ROOT, env=env)
    assert r.returncode == 0, r.stderr
    assert "--repo" in r.stdout and "--only" in r.stdout and "--int8-modes" in r.stdout
    code = "import sys, algorithm.serving.profile.cli; assert 'torch' not in sys.modules, 'cli 导入了 torch'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env=env)
    assert r.returncode == 0, r.stderr


def test_parse_args_checks_sections_and_int8_modes():
    base = ["--repo", "r", "--out", "o"]
    args = cli.parse_args(base + ["--int8-modes", "weight_only,dynamic,weight_only", "--only", "throughput,int8"])
    assert args.int8_modes == "weight_only,dynamic" and args.budget_s == 140.0 and not args.quick
    for bad in (["--int8-modes", "int4"], ["--int8-modes", ","], ["--only", "stagez"]):
        with pytest.raises(SystemExit):
            cli.parse_args(base + bad)


@pytest.mark.parametrize("kv_cache", [False, True])
def test_stage_costs_sum_to_flops_per_request(kv_cache):
    """分阶段的 FLOPs 与每请求的公式是同一套（stages 一节按这个断言）；字节数都为正。"""
    from algorithm.models.config import UGTConfig
    from algorithm.models.ugt import flops_per_request
    from algorithm.serving.profile.roofline import roofline, stage_costs

    cfg = UGTConfig()
    costs = stage_costs(cfg, 4, 64, 2, kv_cache)
    assert list(costs)[0] == "embed" and list(costs)[-1] == "step3.select"
    assert sum(c["flops"] for c in costs.values()) == pytest.approx(4 * flops_per_request(cfg, 64, kv_cache), rel=1e-9)
    assert all(c["bytes"] > 0 for c in costs.values())
    rows = roofline(costs, {k: 1e-3 for k in costs}, 989.0)
    assert [r["stage"] for r in rows] == list(costs) and sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert {r["bound"] for r in rows} <= {"compute", "memory"}


def test_report_records_results_errors_and_skips(tmp_path):
    """一节失败只记进 errors、其余照跑；不在 --only 里与预算不够的节写明原因；每次都重写 profile.json 与 profile.md。"""
    from algorithm.serving.profile.report import Report

    rep = Report(str(tmp_path), time.time(), budget_s=100.0, only=["throughput", "int8"])
    assert rep.section("environment", lambda: {"device": "cpu"}) == {"device": "cpu"}  # 总会跑
    assert rep.section("stages", lambda: 1) is None and rep.data["skipped"]["stages"] == "不在 --only 里"
    assert rep.section("throughput", lambda: 1 / 0) is None and rep.data["errors"]["throughput"].startswith("ZeroDivisionError")
    assert rep.section("throughput_int8_dynamic", lambda: {"rows": []}, need_s=1000) is None
    assert "预算" in rep.data["skipped"]["throughput_int8_dynamic"]
    data = json.loads((tmp_path / "profile.json").read_text())
    assert data["sections"] == {"environment": {"device": "cpu"}} and set(data["errors"]) == {"throughput"}
    md = (tmp_path / "profile.md").read_text()
    assert "## 跳过" in md and "## 错误" in md and "设备：cpu" in md
