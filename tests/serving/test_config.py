"""配置：校验、元组默认值修正、Hydra 组合。"""
import os

import pytest

from algorithm.models.config import UGTConfig, preset, preset_names
from algorithm.serving.config import (ExportConfig, GateConfig, ServingConfig, TritonConfig, register_configs,
                                      to_serving_config)
from algorithm.serving.errors import ConfigError

from conftest import REPO_ROOT  # noqa: E402

CONF = os.path.join(REPO_ROOT, "conf")


def test_user_defaults_kept():
    e, t = ExportConfig(), TritonConfig()
    assert (e.model_name, e.precision, e.max_batch_size, e.max_seq_length, e.target_latency_ms) == \
        ("ugt_recommend", "fp16", 64, 1024, 30.0)
    assert (t.instance_count, t.preferred_batch_sizes, t.max_queue_delay_us) == (2, [8, 16, 32, 64], 100)


def test_preferred_batch_sizes_is_a_fresh_list():
    a, b = TritonConfig(), TritonConfig()
    a.preferred_batch_sizes.append(128)
    assert b.preferred_batch_sizes == [8, 16, 32, 64]


@pytest.mark.parametrize("kwargs, words", [
    (dict(precision="bf8"), ["export.precision", "fp32", "fp16", "int8"]),
    (dict(max_batch_size=0), ["export.max_batch_size"]),
    (dict(opset_version=13), ["export.opset_version"]),
    (dict(model_name="../evil"), ["export.model_name"]),
    (dict(validation_shapes=[[65, 10]]), ["validation_shapes"]),
])
def test_export_config_errors_name_the_field(kwargs, words):
    with pytest.raises(ConfigError) as e:
        ExportConfig(**kwargs)
    for w in words:
        assert w in str(e.value)


def test_triton_config_errors():
    with pytest.raises(ConfigError, match="preferred_batch_sizes"):
        TritonConfig(preferred_batch_sizes=[8, 0])
    with pytest.raises(ConfigError, match="instance_kind"):
        TritonConfig(instance_kind="tpu")
    with pytest.raises(ConfigError, match="preferred_batch_sizes.*max_batch_size"):
        ServingConfig(export=ExportConfig(max_batch_size=16), triton=TritonConfig(preferred_batch_sizes=[8, 32]))


def test_gate_and_cross_section_errors():
    with pytest.raises(ConfigError, match="gates.min_overlap"):
        GateConfig(min_overlap=1.5)
    from algorithm.serving.config import EngineConfig

    with pytest.raises(ConfigError, match="engine.int8_mode"):
        EngineConfig(kind="torch", int8_mode="int4")
    with pytest.raises(ConfigError, match="engine.seq_bucket_plan"):
        EngineConfig(seq_bucket_plan=-1)
    # torch 引擎接受 int8（服务时由 torchao 量化）；规划的长度桶以 max_seq_length 结尾、按 align 对齐
    cfg = ServingConfig(export=ExportConfig(precision="int8"), engine=EngineConfig(kind="torch", seq_bucket_plan=4))
    buckets = cfg.seq_buckets()
    assert buckets[-1] == cfg.export.max_seq_length and len(buckets) <= 4
    assert all(b % 16 == 0 for b in buckets) and buckets == sorted(buckets)
    assert buckets != cfg.engine.seq_buckets, "seq_bucket_plan 被忽略了：得到的是固定的桶"


def test_batch_buckets_end_at_export_max_batch():
    """大于导出 batch 上限的桶去掉、上限本身补上：否则捕获那个桶的 CUDA Graph 时只得到 torch.export 的守卫错误。"""
    from algorithm.serving.config import EngineConfig

    cfg = ServingConfig(export=ExportConfig(max_batch_size=16), engine=EngineConfig(batch_buckets=[2, 4, 8, 32, 64]),
                        triton=TritonConfig(preferred_batch_sizes=[8, 16]))
    assert cfg.batch_buckets() == [2, 4, 8, 16]
    assert ServingConfig(export=ExportConfig(max_batch_size=64)).batch_buckets() == [2, 4, 8, 16, 32, 64]


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_hydra_compose_default_and_precision_int8():
    from algorithm.serving.engines import resolve_auto

    cfg = to_serving_config(_compose([]))
    assert cfg.model.name == "ugt_tiny" and cfg.export.precision == "fp32" and cfg.engine.kind == "auto"
    cfg = to_serving_config(_compose(["precision=int8"]))
    assert cfg.export.precision == "int8"
    # 引擎默认跟着机器走：这台（CI）机器没有 GPU，auto 落到 onnxruntime；有 GPU 时是 torch（int8 经 torchao）
    import torch

    assert resolve_auto(cfg).engine.kind == ("torch" if torch.cuda.is_available() else "onnxruntime")
    assert resolve_auto(cfg) is not cfg and cfg.engine.kind == "auto"  # 不修改传入的配置


def test_hydra_validation_runs_on_compose():
    with pytest.raises(Exception, match="export.precision"):
        to_serving_config(_compose(["export.precision=fp64"]))


@pytest.mark.parametrize("name", preset_names())
def test_presets_come_from_the_hydra_model_group(name):
    cfg = to_serving_config(_compose([f"model={name}"]))
    assert cfg.model == preset(name)
    assert preset_names() == ["pooled_cnn", "ugt_base", "ugt_tiny"] and preset("ugt_tiny") == UGTConfig()  # dataclass 默认即 ugt_tiny
    assert preset("pooled_cnn").source == "module"  # 示例的用户模型：只有来源与契约


def test_triton_presets_compose_and_keys_still_override_them():
    """conf/triton 的每个预设都能组合成合法的 TritonConfig；命令行上的单个键覆盖预设（gpu_bench 的 sweep 靠这一点）。"""
    names = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "triton")) if f.endswith(".yaml"))
    assert {"default", "cpu_small", "h100"} <= set(names)
    for name in names:
        to_serving_config(_compose([f"triton={name}"]))
    h100 = to_serving_config(_compose(["triton=h100"])).triton
    assert (h100.instance_count, h100.preprocess_instance_count, h100.max_queue_delay_us) == (2, 4, 500)
    assert h100.engine_pipeline_depth == 2
    assert to_serving_config(_compose(["triton=h100", "triton.instance_count=1"])).triton.instance_count == 1
