"""TensorRT 阶段中不需要 TensorRT 的部分：profile、校准批、fp32 层的选择、校准缓存、解析错误、缺依赖时的错误。"""
import importlib.util

import numpy as np
import pytest

from algorithm.models.catalog import synthetic_catalog
from algorithm.serving.config import EngineConfig, ExportConfig, ServingConfig
from algorithm.serving.errors import ConfigError, MissingDependencyError
from algorithm.serving.optimize_trt import (CalibratorLogic, TensorRTBuildError, build_trt_engine,
                                            calibration_batches, calibration_profile, covering_profile, keep_in_fp32,
                                            parser_errors, trt_profiles)
from algorithm.serving.triton_config import build_model_configs
from conftest import tiny_config

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def base_config(**engine) -> ServingConfig:
    return ServingConfig(export=ExportConfig(max_batch_size=64, max_seq_length=1024),
                         engine=EngineConfig(kind="tensorrt", device="cuda", **engine))


def test_profiles_cover_every_shape_once_and_set_all_six_inputs():
    cfg = base_config()
    profiles = trt_profiles(cfg)
    assert [(p.min, p.opt, p.max) for p in profiles] == [((1, 1), (32, 128), (64, 256)),
                                                         ((1, 257), (32, 512), (64, 1024))]
    for b in (1, 17, 64):
        for n in (1, 128, 256, 257, 1000, 1024):
            assert sum(p.contains(b, n) for p in profiles) == 1, (b, n)
            assert profiles[covering_profile(profiles, b, n)].contains(b, n)
    names = cfg.model.contract().input_names
    for p in profiles:
        shapes = p.shapes(names)
        assert list(shapes) == list(names) and len(names) == 6
        for lo, opt, hi in shapes.values():
            assert all(lo[i] <= opt[i] <= hi[i] for i in range(2))
    with pytest.raises(ConfigError, match="不在任何 TensorRT profile"):
        covering_profile(profiles, 65, 10)


def test_profiles_follow_config():
    one = trt_profiles(base_config(trt_seq_splits=[]))
    assert [(p.min, p.max) for p in one] == [((1, 1), (64, 1024))]
    three = trt_profiles(base_config(trt_seq_splits=[128, 512, 4096], opt_batch_size=200, opt_seq_length=64))
    assert [(p.min[1], p.max[1]) for p in three] == [(1, 128), (129, 512), (513, 1024)]  # 4096 >= 1024：忽略
    assert three[0].opt == (64, 64)  # opt batch 不超过 max_batch_size
    assert three[1].opt[1] == 256 and three[2].opt[1] == 1024  # 段内最小的长度桶
    with pytest.raises(ConfigError, match="trt_seq_splits"):
        EngineConfig(trt_seq_splits=[512, 128])


def test_planned_buckets_give_one_profile_each_tuned_at_the_bucket_length():
    """engine.seq_bucket_plan：profile 由同一个规划得出（#12），每个桶一个、opt 长度 = 桶长（前处理补到桶），
    trt_seq_splits 不用；Triton 配置列出全部 profile。"""
    cfg = base_config(seq_bucket_plan=5, trt_seq_splits=[256])
    buckets = cfg.seq_buckets()
    assert len(buckets) == 5 and buckets[-1] == 1024 and buckets != [128, 256, 512, 1024]
    profiles = trt_profiles(cfg)
    assert [p.max[1] for p in profiles] == buckets and [p.opt[1] for p in profiles] == buckets
    assert [p.min[1] for p in profiles] == [1] + [b + 1 for b in buckets[:-1]]
    for n in range(1, 1025):  # 每个长度恰好在一个 profile 里；补到桶之后的长度就是那个 profile 的 opt
        assert sum(p.contains(32, n) for p in profiles) == 1
    for b in buckets:
        assert profiles[covering_profile(profiles, 64, b)].opt[1] == b
    mc = build_model_configs(cfg, gpus=[0])["ugt_engine"]
    assert list(mc.instance_group[0].profile) == [str(i) for i in range(5)]
    # int8 校准用包含 opt_seq_length（128）的 profile，不是只覆盖最短历史的第一个；按长度切分时仍是第一个
    i = calibration_profile(cfg)
    assert profiles[i].contains(1, 128) and (i > 0 or buckets[0] >= 128)
    assert calibration_profile(base_config()) == 0
    assert calibration_profile(base_config(seq_bucket_plan=5, opt_seq_length=1000)) == 4


def test_engine_config_lists_every_profile():
    mc = build_model_configs(base_config(), gpus=[0])["ugt_engine"]
    assert mc.platform == "tensorrt_plan" and list(mc.instance_group[0].profile) == ["0", "1"]


def test_calibration_batches_have_the_calibration_profile_opt_shape():
    cfg = tiny_config("/tmp/unused", engine=EngineConfig(kind="tensorrt", device="cuda", opt_batch_size=4,
                                                          opt_seq_length=24, calibration_batches=3))
    catalog = synthetic_catalog(500, cfg.model.codebook_sizes, seed=1)
    batches = list(calibration_batches(cfg, catalog))
    contract = cfg.model.contract()
    assert len(batches) == 3
    for feeds in batches:
        assert set(feeds) == set(contract.input_names)
        assert all(v.shape == (4, 24) for v in feeds.values())
        contract.validate_inputs(feeds)  # 校准数据同样在契约范围内
    masks = np.concatenate([f["encoder_mask"] for f in batches])
    assert masks.sum(1).min() >= 1 and (masks == 0).any()  # 有填充，且没有空历史
    again = list(calibration_batches(cfg, catalog))
    assert all(np.array_equal(a["encoder_l3_ids"], b["encoder_l3_ids"]) for a, b in zip(batches, again))


def test_fp32_layer_selection():
    assert keep_in_fp32("LayerType.SOFTMAX", "/decoder/attn/Softmax")
    assert keep_in_fp32("LayerType.NORMALIZATION", "/encoder/norm1/LayerNormalization")
    assert keep_in_fp32("LayerType.TOPK", "/beam/TopK")
    assert keep_in_fp32("LayerType.ELEMENTWISE", "/beam/score_add")
    assert not keep_in_fp32("LayerType.MATRIX_MULTIPLY", "/encoder/layers.0/linear1/MatMul")
    assert not keep_in_fp32("LayerType.ELEMENTWISE", "/encoder/layers.0/Add")


def test_calibrator_logic_serves_batches_and_caches(tmp_path):
    names = ["a", "b"]
    batches = [{"a": np.zeros((2, 3), np.int64), "b": np.ones((2, 3), np.float32)} for _ in range(2)]
    put = lambda arr: (arr, arr.ctypes.data)  # noqa: E731  假设备：指针即主机地址
    logic = CalibratorLogic(batches, str(tmp_path / "c" / "x.calib"), put)
    assert logic.get_batch_size() == 1
    ptrs = logic.get_batch(names)
    assert len(ptrs) == 2 and all(isinstance(p, int) and p for p in ptrs)
    assert [h.ctypes.data for h in logic._held] == ptrs  # 持有者保留到下一批
    assert logic.get_batch(names) is not None and logic.get_batch(names) is None
    assert logic.batches_served == 2
    assert logic.read_calibration_cache() is None
    logic.write_calibration_cache(b"TRT-calib")
    assert logic.read_calibration_cache() == b"TRT-calib"
    with pytest.raises(TensorRTBuildError, match="缺少输入"):
        CalibratorLogic([{"a": np.zeros(1)}], "", put).get_batch(names)


def test_parser_errors_are_formatted():
    class Err:
        def __init__(self, node, op, desc):
            self._n, self._o, self._d = node, op, desc

        def node_name(self):
            return self._n

        def node_operator(self):
            return self._o

        def desc(self):
            return self._d

    class Parser:
        errors = [Err("/dec/TopK", "TopK", "k exceeds 3840"), Err("", "", "bad file")]
        num_errors = 2

        def get_error(self, i):
            return self.errors[i]

    assert parser_errors(Parser()) == ["[/dec/TopK / TopK] k exceeds 3840", "bad file"]


def test_build_checks_config_before_tensorrt(tmp_path):
    cfg = base_config()
    with pytest.raises(ConfigError, match="ONNX 文件不存在"):
        build_trt_engine(str(tmp_path / "missing.onnx"), str(tmp_path / "m.plan"), cfg)
    int8 = ServingConfig(export=ExportConfig(precision="int8"), engine=EngineConfig(kind="tensorrt"))
    with pytest.raises(ConfigError, match="catalog"):
        build_trt_engine(str(tmp_path / "x.onnx"), str(tmp_path / "m.plan"), int8)


@pytest.mark.skipif(HAS_TRT, reason="装有 TensorRT：缺依赖的错误路径不适用")
def test_missing_tensorrt_gives_a_named_error(tmp_path):
    onnx = tmp_path / "m.onnx"
    onnx.write_bytes(b"not really onnx")
    with pytest.raises(MissingDependencyError, match="tritonserver"):
        build_trt_engine(str(onnx), str(tmp_path / "m.plan"), ExportConfig())  # 用户的 ExportConfig 也接受


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_TRT, reason="需要 TensorRT 10+ 与 GPU（NVIDIA 的 Triton 容器）；本机没有")
def test_tensorrt_engine_builds_and_passes_gates(tmp_path):
    from algorithm.serving.build import build

    cfg = tiny_config(str(tmp_path), engine=EngineConfig(kind="tensorrt", device="cuda"),
                      export=ExportConfig(precision="fp16", max_batch_size=16, max_seq_length=256))
    result = build(cfg, log=print, gpus=[0])
    assert result.reports["gates"]["passed"]
