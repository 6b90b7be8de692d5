"""精度门禁与 onnxruntime 的低精度引擎（fp16 转换、int8 静态量化），在 CPU 上、tiny 模型上。"""
import dataclasses

import numpy as np
import onnx
import pytest

from algorithm.models.checkpoint import load_checkpoint
from algorithm.serving.config import GateConfig
from algorithm.serving.engines import build_engine_artifact
from algorithm.serving.engines.onnxruntime import int8_weight_matmuls
from algorithm.serving.gates import run_gates
from algorithm.serving.runtime.engines.onnxruntime import OnnxRuntimeRunner
from algorithm.serving.errors import AccuracyError


@pytest.fixture(scope="module")
def model(built, catalog):
    cfg, result = built
    m, _ = load_checkpoint(result.checkpoint)
    return m.attach_catalog(catalog.semantic_ids)


def with_precision(cfg, precision):
    return dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, precision=precision))


class Perturbed:
    """把 fp32 引擎的结果弄坏一点：每行 top-1 与最后一项交换，分数加噪声。"""

    def __init__(self, runner):
        self.runner = runner

    def run(self, feeds):
        rec, scores = self.runner.run(feeds)
        rec = rec.copy()
        rec[:, [0, -1]] = rec[:, [-1, 0]]
        return rec, scores + 0.3


def test_gate_stops_a_bad_engine_with_the_numbers(built, catalog, model):
    cfg, result = built
    bad = Perturbed(OnnxRuntimeRunner(result.onnx, cfg.model.contract()))
    with pytest.raises(AccuracyError) as e:
        run_gates(cfg, catalog, model, bad, GateConfig(num_samples=8), "fp16")
    report = e.value.report
    assert report["passed"] is False and report["top1_agreement"] < 0.95 and report["score_mae"] > 0.05
    assert "top1_agreement" in str(e.value) and "score_mae" in str(e.value)
    # 同一引擎不弄坏就通过，fp32 要求 top-50 完全一致
    ok = run_gates(cfg, catalog, model, bad.runner, GateConfig(num_samples=8), "fp32")
    assert ok["passed"] and ok["overlap"] == 1.0


class OneRowSwapped(Perturbed):
    """只弄坏第一批第一行的 top-1（与最后一项交换），分数不动：top-1 一致 = 1 - 1/行数。"""

    calls = 0

    def run(self, feeds):
        rec, scores = self.runner.run(feeds)
        self.calls += 1
        if self.calls == 1:
            rec = rec.copy()
            rec[0, [0, -1]] = rec[0, [-1, 0]]
        return rec, scores


def test_int8_gate_is_stricter_than_fp16(built, catalog, model):
    """issue #12 对 int8 的门禁（top-50 重合 >= 0.95、top-1 >= 0.97）比 fp16 的（0.9 / 0.95）严：同一个 top-1 一致约 0.96 的引擎
    作为 fp16 通过、作为 int8 不通过，报告里写着用的阈值。"""
    cfg, result = built
    runner = OnnxRuntimeRunner(result.onnx, cfg.model.contract())
    gates = GateConfig(num_samples=32)
    ok = run_gates(cfg, catalog, model, OneRowSwapped(runner), gates, "fp16")
    assert ok["passed"] and 0.95 <= ok["top1_agreement"] < 0.97, ok
    with pytest.raises(AccuracyError, match="top1_agreement") as e:
        run_gates(cfg, catalog, model, OneRowSwapped(runner), gates, "int8")
    assert e.value.report["thresholds"]["top1_agreement"] == ">= 0.97"


@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_onnxruntime_reduced_precision_builds_and_passes_gates(built, catalog, model, tmp_path, precision):
    cfg, result = built
    cfg = with_precision(cfg, precision)
    artifact, reports = build_engine_artifact(cfg, model, catalog, result.onnx, str(tmp_path), log=lambda s: None)
    g = reports["gates"]
    int8 = precision == "int8"
    assert g["passed"] and g["overlap"] >= (cfg.gates.int8_min_overlap if int8 else cfg.gates.min_overlap)
    assert g["top1_agreement"] >= (cfg.gates.int8_min_top1_agreement if int8 else cfg.gates.min_top1_agreement)
    assert g["speedup_vs_fp32_engine"] > 0 and g["fp32_engine_seconds"] > 0
    graph = onnx.load(artifact).graph
    if precision == "fp16":
        assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in graph.initializer)
        assert [i.type.tensor_type.elem_type for i in graph.input][-1] == onnx.TensorProto.FLOAT  # 输入类型不变
    else:
        assert sum(n.op_type == "DequantizeLinear" for n in graph.node) >= len(int8_weight_matmuls(result.onnx, cfg.model.codebook_sizes))


def test_int8_leaves_score_heads_and_attention_in_float(built):
    cfg, result = built
    chosen = set(int8_weight_matmuls(result.onnx, cfg.model.codebook_sizes))
    m = onnx.load(result.onnx)
    weights = {i.name: list(i.dims) for i in m.graph.initializer}
    matmuls = [n for n in m.graph.node if n.op_type == "MatMul"]
    heads = [n.name for n in matmuls if n.input[1] in weights and weights[n.input[1]][-1] in cfg.model.codebook_sizes]
    attention = [n.name for n in matmuls if n.input[1] not in weights]
    assert len(heads) == 3 and attention and chosen
    assert not chosen & set(heads) and not chosen & set(attention)


def test_int8_heads_are_found_by_structure_not_by_width(tmp_path):
    """FFN 的宽度恰好等于码本大小（1024）时也要量化它；打分头按“流进 LogSoftmax”认出来。"""
    from onnx import TensorProto, helper, numpy_helper

    w = lambda name, shape: numpy_helper.from_array(np.zeros(shape, np.float32), name)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h1"], name="ffn_in"),
             helper.make_node("Relu", ["h1"], ["h2"], name="act"),
             helper.make_node("MatMul", ["h2", "w2"], ["h3"], name="ffn_out"),
             helper.make_node("MatMul", ["h3", "wh"], ["logits0"], name="head"),
             helper.make_node("Add", ["logits0", "bh"], ["logits"], name="head_bias"),
             helper.make_node("LogSoftmax", ["logits"], ["logp"], name="logp", axis=-1),
             helper.make_node("MatMul", ["h3", "h3t"], ["att"], name="attention")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8]),
                     helper.make_tensor_value_info("h3t", TensorProto.FLOAT, [8, 1])],
        [helper.make_tensor_value_info("logp", TensorProto.FLOAT, [1, 1024]),
         helper.make_tensor_value_info("att", TensorProto.FLOAT, [1, 1])],
        [w("w1", (8, 1024)), w("w2", (1024, 8)), w("wh", (8, 1024)), w("bh", (1024,))])
    path = str(tmp_path / "g.onnx")
    onnx.save(helper.make_model(graph), path)
    assert set(int8_weight_matmuls(path, (1024, 4096, 16384))) == {"ffn_in", "ffn_out"}
