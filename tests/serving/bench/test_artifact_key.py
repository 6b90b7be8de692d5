"""构建变体的键由字段上的产物声明得出：每个产物选项改了都换变体，其余选项改了不换；清单从 dataclass 推出，
新加的字段自动被检查（找不到合法的另一个值时测试失败，提醒补候选值）。"""
import dataclasses
import json
import os

import pytest

from algorithm.errors import ConfigError
from algorithm.models import config as model_config
from algorithm.serving import config as config_module
from algorithm.serving.bench import app
from algorithm.serving.config import ServingConfig, artifact_paths, leaf_paths

# 变体的基准配置：默认配置；让全部带条件的产物选项都起作用的一份（torch fp8、规划长度桶）；
# 填好工厂与路径的一份（model.source 换成 module / exported 才合法）
BASES = {
    "default": {},
    "conditional": {"engine": {"kind": "torch", "pack_rows": True, "seq_bucket_plan": 3}, "export": {"precision": "fp8"}},
    "user_model": {"model": {"factory": "pkg.mod:make", "path": "model.pt2"}},
}
# 字符串字段的候选值：两个配置模块里各可选值的元组，再加几个自由文本
WORDS = sorted({w for m in (config_module, model_config) for v in vars(m).values()
                if isinstance(v, tuple) and all(isinstance(x, str) for x in v) for w in v}
               | {"x", "", "true", "false", "cpu", "cuda", "none", "default", "max-autotune", "dynamic",
                  "weight_only", "bf16", "all", "timed", "error", "skip"})


def _base(name: str, tmp: str) -> ServingConfig:
    d = ServingConfig().to_dict()
    for section, values in BASES[name].items():
        d[section].update(values)
    d["build_dir"] = tmp
    return ServingConfig.from_dict(d)


def _get(d, path):
    for k in path.split("."):
        d = d[k]
    return d


def _candidates(v):
    """与 v 同类型、不同的几个值（依次尝试，第一个让配置合法的就用）。"""
    if isinstance(v, bool):
        return [not v]
    if isinstance(v, int):
        return [v + 1, v * 2, v - 1]
    if isinstance(v, float):
        return [v * 2, v / 2, v + 1.0]
    if isinstance(v, str):
        return [w for w in WORDS if w != v]
    if isinstance(v, list):
        if not v:
            return [[1], [[1, 5]]]
        out = []
        if isinstance(v[-1], (int, float)) and not isinstance(v[-1], bool):
            out += [v + [v[-1] * 2], [v[0] + 1] + v[1:]]
        return out + [v[:-1]]
    raise AssertionError(f"没有 {type(v).__name__} 的候选值")


def _changed(config: ServingConfig, path: str, must: bool = True):
    """把 path 换成另一个合法的值；找不到时 must 则失败（补 _candidates），否则返回 None。"""
    d = config.to_dict()
    old = _get(d, path)
    *parents, leaf = path.split(".")
    for new in _candidates(old):
        e = json.loads(json.dumps(d))
        target = e
        for k in parents:
            target = target[k]
        target[leaf] = new
        try:
            changed = ServingConfig.from_dict(e)
        except (ConfigError, TypeError, ValueError):
            continue
        if _get(changed.to_dict(), path) != old:
            return changed
    if must:
        raise AssertionError(f"{path}：找不到与 {old!r} 不同的合法值，给 _candidates 补一个")
    return None


def _change_where_active(path: str, tmp: str):
    """(基准, 改过的)：path 在基准上起作用、且能换成另一个合法的值的第一个基准配置。"""
    for name in BASES:
        base = _base(name, tmp)
        if path in artifact_paths(config=base):
            changed = _changed(base, path, must=False)
            if changed is not None:
                return base, changed
    raise AssertionError(f"{path}：没有让它起作用、又能换值的基准配置，给 BASES 或 _candidates 补一个")


@pytest.mark.parametrize("path", artifact_paths())
def test_every_artifact_option_gives_a_new_variant(path, tmp_path):
    base, changed = _change_where_active(path, str(tmp_path))
    assert app.variant_dir(changed) != app.variant_dir(base), path


def _inactive_paths():
    """在某个基准配置上不起作用的叶子（不是产物选项，或条件不成立）。"""
    return [p for p in leaf_paths() if any(p not in artifact_paths(config=_base(n, "build")) for n in BASES)]


@pytest.mark.parametrize("path", _inactive_paths())
def test_other_options_keep_the_variant(path, tmp_path):
    """不是产物选项（或条件不成立）的叶子：在每个它不起作用的基准上改了，变体都不变（至少一个基准能改）。
    build_dir 例外：变体目录就在它下面，只比名字。"""
    checked = 0
    for name in BASES:
        base = _base(name, str(tmp_path))
        if path in artifact_paths(config=base):
            continue
        changed = _changed(base, path, must=False)
        if changed is None:
            continue
        checked += 1
        if path == "build_dir":
            assert os.path.basename(app.variant_dir(changed)) == os.path.basename(app.variant_dir(base))
        else:
            assert app.variant_dir(changed) == app.variant_dir(base), (path, name)
    assert checked, f"{path}：没有能换值的基准配置，给 BASES 或 _candidates 补一个"


def test_load_time_options_are_among_the_others():
    others = set(_inactive_paths())
    assert {"engine.compile_mode", "engine.cuda_graphs", "engine.native", "engine.num_threads",
            "triton.instance_count", "server.mps", "benchmark.rates"} <= others


def test_serving_and_benchmark_sections_are_not_artifact_options():
    """triton.* 与 server.* 只进仓库与服务；benchmark.* 只有长度分布与种子（带条件）进产物。"""
    paths = artifact_paths()
    assert not [p for p in paths if p.startswith(("triton.", "server."))]
    assert {p for p in paths if p.startswith("benchmark.")} == {"benchmark.seed", "benchmark.length_median",
                                                               "benchmark.length_sigma"}
    assert not {"benchmark.length_median", "benchmark.seed"} & set(artifact_paths(config=ServingConfig()))
    planned = ServingConfig(engine=config_module.EngineConfig(seq_bucket_plan=4))
    assert {"benchmark.length_median", "benchmark.length_sigma", "benchmark.seed"} <= set(artifact_paths(config=planned))
    int8 = ServingConfig(export=config_module.ExportConfig(precision="int8"))
    assert "benchmark.length_median" in artifact_paths(config=int8) and "benchmark.seed" not in artifact_paths(config=int8)


def test_options_that_shape_an_engine_file_are_declared():
    """TensorRT 计划与 ONNX 导出的选项，以及原先手写清单里（除 engine.native）的全部选项，都声明为产物选项。"""
    paths = set(app.ARTIFACT_KEYS)
    assert paths == set(artifact_paths())
    opt = {f"engine.{f.name}" for f in dataclasses.fields(config_module.EngineConfig) if f.name.startswith("opt_")}
    assert len(opt) >= 2
    named = {"engine.trt_seq_splits", "engine.fp32_layers", "engine.workspace_gb", "engine.seq_bucket_plan",
             "export.opset_version"} | opt
    assert named <= paths, named - paths
    before = {"engine.kind", "export.precision", "export.max_batch_size", "export.max_seq_length",
              "export.decoder_kv_cache", "engine.pack_rows", "checkpoint", "seed"}
    assert before <= paths, before - paths
    for section in ("model", "train"):
        assert {p for p in leaf_paths() if p.startswith(section + ".")} <= paths
    assert "engine.native" not in paths and "engine.compile_mode" not in paths


def test_an_old_build_info_without_a_new_option_does_not_match(tmp_path):
    """旧构建的 build_info.json 缺某个产物选项（或结构不对、不是 JSON）：算不相符（重建），不抛异常。"""
    cfg = _base("default", str(tmp_path))
    repo = tmp_path / "repo"
    repo.mkdir()
    info = repo / "build_info.json"
    full = cfg.to_dict()
    info.write_text(json.dumps({"config": full}))
    assert app._built_matches(str(repo), cfg)
    old = json.loads(json.dumps(full))
    del old["engine"]["fp32_layers"]
    info.write_text(json.dumps({"config": old}))
    assert not app._built_matches(str(repo), cfg)
    for broken in ({"config": {**full, "engine": "onnxruntime"}}, {}, {"config": None}):
        info.write_text(json.dumps(broken))
        assert not app._built_matches(str(repo), cfg)
    info.write_text("{")
    assert not app._built_matches(str(repo), cfg)
