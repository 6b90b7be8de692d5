"""压测入口的构建变体与汇总表：决定产物的选项不同就构建到自己的目录、存在就复用；multirun 写一张对比表。"""
import dataclasses
import json
import os

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
                "offline_engine": {"64": {"batch": 64, "throughput": 100.0}}}

    sweep = str(tmp_path / "sweep")
    app.update_sweep_summary(sweep, str(tmp_path / "0"), report(10.0, "fp32"), ["precision=fp32"])
    path = app.update_sweep_summary(sweep, str(tmp_path / "1"), report(20.0, "int8"), ["precision=int8"])
    lines = open(path).read().splitlines()
    assert len(lines) == 4 and "precision=fp32" in lines[2] and "precision=int8" in lines[3]
    assert "20.0 [19.0–21.0]" in lines[3] and "100.0" in lines[3]
