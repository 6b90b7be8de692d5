"""ONNX 导出：动态轴、六个输入、多形状验证、固化长度能被发现、用户的 test_serving。"""
import json

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from algorithm.interfaces import EngineContract
from algorithm.models.config import UGTConfig
from algorithm.models.ugt import build_model
from algorithm.serving import export_onnx as ex
from algorithm.serving.config import ExportConfig
from algorithm.serving.errors import ValidationError


def _inputs(path):
    m = onnx.load(path)
    return [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]) for i in m.graph.input]


def test_export_validates_at_shapes_unlike_the_example(built):
    cfg, result = built
    report = json.load(open(result.onnx + ".report.json"))
    assert report["exporter"].startswith("torch.export") and report["passed"]
    shapes = [(s["batch"], s["seq_len"]) for s in report["shapes"]]
    assert shapes == [(1, 3), (5, 37), (16, 256)] and ex.EXAMPLE_SHAPE not in shapes
    for s in report["shapes"]:
        assert s["comparison"]["overlap"] == 1.0 and s["comparison"]["score_max_abs"] < 1e-3
    names = [n for n, _ in _inputs(result.onnx)]
    assert names == list(EngineContract().input_names)
    assert all(d == ["batch", "seq_len"] for _, d in _inputs(result.onnx))
    assert report["opset"] >= 17


def test_default_checked_shapes_include_odd_and_max():
    shapes = ExportConfig().checked_shapes()
    assert [1, 5] in shapes and [7, 37] in shapes and [64, 1024] in shapes


class MHAModel(nn.Module):
    """用 nn.MultiheadAttention 的模型：旧导出器会把示例的序列长度固化进图。"""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(1024, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, 150)

    def forward(self, l1, l2, l3, pos, types, mask):
        x = self.emb(l1)
        y, _ = self.attn(x, x, x, key_padding_mask=mask == 0, need_weights=False)
        logits = self.head(y.mean(dim=1)).view(-1, 50, 3)
        scores, _ = torch.sort(logits[..., 0], dim=-1, descending=True)
        rec = (logits.abs() * 100).long() % 1024
        return rec, scores


@pytest.fixture
def no_mha_fastpath():
    """旧导出器不支持融合的 MHA 算子：测试期间关闭 fast path。"""
    torch.backends.mha.set_fastpath_enabled(False)
    yield
    torch.backends.mha.set_fastpath_enabled(True)


def test_validation_catches_a_baked_in_length(tmp_path, monkeypatch, no_mha_fastpath):
    def no_dynamo(*a, **k):
        raise RuntimeError("强制走旧导出器")

    monkeypatch.setattr(ex, "_export_dynamo", no_dynamo)
    cfg = ExportConfig(max_batch_size=8, max_seq_length=64, validation_shapes=[[3, 41]])
    with pytest.raises(ValidationError) as e:
        ex.export_to_onnx(MHAModel().eval(), str(tmp_path / "mha.onnx"), cfg,
                          contract=EngineContract(max_seq_length=64))
    assert "batch=3 seq_len=41" in str(e.value)
    assert e.value.report is not None and e.value.report.exporter == "torchscript (legacy)"


def test_repair_graph_restores_all_six_inputs_in_order():
    from onnx import TensorProto, helper

    c = EngineContract()
    x = helper.make_tensor_value_info("encoder_mask", TensorProto.FLOAT, ["b", "s"])
    out1 = helper.make_tensor_value_info("recommendations", TensorProto.INT64, None)
    out2 = helper.make_tensor_value_info("scores", TensorProto.FLOAT, None)
    g = helper.make_graph([helper.make_node("Identity", ["encoder_mask"], ["scores"]),
                           helper.make_node("Constant", [], ["recommendations"],
                                            value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))],
                          "g", [x], [out1, out2])
    m = helper.make_model(g)
    added = ex.repair_graph(m, c)
    assert added == list(c.input_names[:5])
    assert [i.name for i in m.graph.input] == list(c.input_names)


def test_serving():
    """用户请求里的测试（MockModel），导出的图须保留六个输入。"""
    from algorithm.serving.config import ExportConfig
    from algorithm.serving.export_onnx import export_to_onnx

    config = ExportConfig()

    class MockModel(nn.Module):
        def forward(self, *args):
            return torch.randint(0, 16384, (args[0].shape[0], 50, 3)), torch.randn(args[0].shape[0], 50)

    model = MockModel()
    export_to_onnx(model, "/tmp/test.onnx", config)
    inputs = _inputs("/tmp/test.onnx")
    assert [n for n, _ in inputs] == list(EngineContract().input_names)
    assert all(d == ["batch", "seq_len"] for _, d in inputs)
    report = json.load(open("/tmp/test.onnx.report.json"))
    assert report["reference_deterministic"] is False and len(report["shapes"]) == 3
    print("Serving tests passed!")


def test_exporter_interface_export(tmp_path, rng):
    from algorithm.serving import ServingExporter

    model = build_model(UGTConfig(max_seq_length=32), seed=0)
    cfg = ExportConfig(precision="fp32", max_batch_size=4, max_seq_length=32, validation_shapes=[[3, 11]])
    path = ServingExporter().export_onnx(model, str(tmp_path / "u.onnx"), cfg)
    sess = ex.ort_session(path)
    feeds = model.cfg.contract().random_inputs(2, 19, rng)
    rec, scores = sess.run(None, feeds)
    ref = ex.torch_reference(model, feeds, model.cfg.contract())
    assert np.array_equal(rec, ref[0])
