"""Triton 配置：经 ModelConfig protobuf 生成、能解析回来、与黄金文件一致；实例组与名字校验。"""
import os

import pytest
from make_golden import golden_configs

from algorithm.serving.config import EngineConfig, TritonConfig
from algorithm.serving.errors import ConfigError
from algorithm.serving.triton_config import build_model_configs, parse_pbtxt, to_pbtxt, validate_model_name
from conftest import REPO_ROOT, TESTS_DIR, tiny_config

GOLDEN = os.path.join(TESTS_DIR, "golden")


@pytest.mark.parametrize("fname, mc", list(golden_configs()), ids=lambda x: x if isinstance(x, str) else "")
def test_configs_match_golden_and_parse_back(fname, mc):
    text = to_pbtxt(mc)
    with open(os.path.join(GOLDEN, fname)) as f:
        assert text == f.read(), f"{fname} 与黄金文件不同；若是有意修改，运行 python tests/make_golden.py 并审阅 diff"
    assert parse_pbtxt(text) == mc


def test_instance_group_follows_machine_and_config():
    gpu = tiny_config("b", engine=EngineConfig(kind="torch", device="auto"))
    g = build_model_configs(gpu, gpus=[0, 1, 2])["ugt_engine"].instance_group[0]
    assert g.kind == g.KIND_GPU and list(g.gpus) == [0, 1, 2]
    pinned = tiny_config("b", engine=EngineConfig(kind="torch"), triton=TritonConfig(gpus=[1], preferred_batch_sizes=[8]))
    assert list(build_model_configs(pinned, gpus=[0, 1])["ugt_engine"].instance_group[0].gpus) == [1]
    g = build_model_configs(tiny_config("b", engine=EngineConfig(kind="torch", device="auto")), gpus=[])["ugt_engine"]
    assert g.instance_group[0].kind == g.instance_group[0].KIND_CPU
    with pytest.raises(ConfigError, match="GPU"):
        build_model_configs(tiny_config("b", engine=EngineConfig(kind="tensorrt")), gpus=[])
    with pytest.raises(ConfigError, match="onnxruntime"):
        build_model_configs(tiny_config("b", triton=TritonConfig(instance_kind="gpu", preferred_batch_sizes=[8])),
                            gpus=[0])


def test_queue_policy_and_batching_from_config():
    cfg = tiny_config("b", triton=TritonConfig(preferred_batch_sizes=[2, 4], max_queue_delay_us=500,
                                               max_queue_size=7, queue_timeout_us=1234))
    db = build_model_configs(cfg, gpus=[])["ugt_engine"].dynamic_batching
    assert list(db.preferred_batch_size) == [2, 4] and db.max_queue_delay_microseconds == 500
    assert db.default_queue_policy.max_queue_size == 7
    assert db.default_queue_policy.default_timeout_microseconds == 1234
    # 任何队列策略都会关掉 Triton 的预取（见 _set_batching）：前/后处理没有策略，超时也不许请求覆盖
    assert not db.default_queue_policy.allow_timeout_override
    for name in ("ugt_preprocess", "ugt_postprocess"):
        assert not build_model_configs(cfg, gpus=[])[name].dynamic_batching.HasField("default_queue_policy")
    off = tiny_config("b", triton=TritonConfig(preferred_batch_sizes=[2, 4], max_queue_size=0, queue_timeout_us=0))
    assert not build_model_configs(off, gpus=[])["ugt_engine"].dynamic_batching.HasField("default_queue_policy")


def test_prepost_batching_can_be_turned_off_for_comparison():
    """默认前/后处理有动态批处理；关掉时（只为对照旧行为）它们的配置里没有 dynamic_batching，引擎不受影响。"""
    on = build_model_configs(tiny_config("b", triton=TritonConfig(preferred_batch_sizes=[4])), gpus=[])
    off = build_model_configs(tiny_config("b", triton=TritonConfig(preferred_batch_sizes=[4], prepost_batching=False)), gpus=[])
    for name in ("ugt_preprocess", "ugt_postprocess"):
        assert on[name].HasField("dynamic_batching") and not off[name].HasField("dynamic_batching")
    assert off["ugt_engine"].dynamic_batching == on["ugt_engine"].dynamic_batching


@pytest.mark.parametrize("name", ["a/b", "..", "../x", "", "a b", "x" * 200, "/abs"])
def test_model_names_are_validated(name):
    with pytest.raises(ConfigError):
        validate_model_name(name)


def test_python_models_import_without_torch_or_onnx():
    """前/后处理进程只需要 numpy：导入它们不能拉进 torch / onnx / onnxruntime。"""
    import subprocess
    import sys

    code = ("import sys; import algorithm.serving.runtime.models, algorithm.serving.runtime.glue, algorithm.serving.runtime.params; "
            "bad = [m for m in ('torch', 'onnx', 'onnxruntime', 'tritonclient') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT)
