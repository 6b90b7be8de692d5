"""团队自己的模型经 model.source=module / exported / onnx 进入构建：服务的回答与模型本身一致；坏模型在构建时被命名的异常拒绝，
build_dir 里不留半成品。真实的内嵌 Triton，小模型、小码本。"""
import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, TESTS_DIR, tiny_config

from algorithm.errors import CatalogError, ModelContractError, ModelExportError
from algorithm.models.catalog import load_catalog, synthetic_catalog
from algorithm.models.config import UGTConfig
from algorithm.serving.build import build
from algorithm.serving.config import CatalogConfig, ExportConfig
from algorithm.serving.runtime.postprocess import MASKED_SCORE
from algorithm.serving.runtime.preprocess import Preprocessor

FOREIGN = os.path.join(TESTS_DIR, "fixtures", "foreign_models.py")
EXAMPLE = os.path.join(REPO_ROOT, "examples", "pooled_cnn", "model.py")
SMALL = [8, 8, 16]


def _load(path, name):
    from algorithm.serving.model_source import import_factory

    return import_factory(f"{path}:{name}")()


def _config(build_dir, model: UGTConfig, **kw):
    # 小形状：导出验证与门禁都在几秒内
    kw.setdefault("export", ExportConfig(precision="fp32", max_batch_size=16, max_seq_length=64,
                                         validation_shapes=[[1, 3], [5, 37], [16, 64]]))
    kw.setdefault("catalog", CatalogConfig(num_items=600, seed=2))
    return tiny_config(build_dir, model=model, **kw)


def _expected(model_fn, catalog, contract, history, top_k):
    """模型本身对同一条前处理后的历史的回答，按目录映射成物品（丢掉不对应物品的码与重复，与服务的规则相同）。"""
    feeds = Preprocessor(catalog, contract).encode_batch([history])
    rec, scores = model_fn(feeds)
    items, found = catalog.lookup_codes(rec[0])
    keep = found & (scores[0] > MASKED_SCORE)
    seen, out_items, out_scores = set(), [], []
    for i, s, k in zip(items, scores[0], keep):
        if k and int(i) not in seen:
            seen.add(int(i))
            out_items.append(int(i))
            out_scores.append(float(s))
    return np.array(out_items[:top_k], dtype=np.int64), np.array(out_scores[:top_k], dtype=np.float32)


def _serve_and_compare(cfg, result, catalog, model_fn, histories):
    from algorithm.serving.client import RecommendClient
    from algorithm.serving.server import EmbeddedTritonServer

    contract = cfg.contract()
    with EmbeddedTritonServer(result.repository, cfg.server, ready_models=[cfg.export.model_name]) as server:
        client = RecommendClient(server.grpc_url, cfg.export.model_name)
        try:
            for h in histories:
                got = client.recommend(h)
                want_items, want_scores = _expected(model_fn, catalog, contract, h, contract.top_k)
                n = len(want_items)
                assert n > 0
                np.testing.assert_array_equal(got.item_ids[:n], want_items)
                assert (got.item_ids[n:] == -1).all()
                np.testing.assert_allclose(got.scores[:n], want_scores, rtol=0, atol=1e-4)
        finally:
            client.close()


def _histories(catalog, n=6, seed=0):
    rng = np.random.default_rng(seed)
    return [catalog.item_ids[rng.integers(0, len(catalog), size=int(L))] for L in rng.integers(1, 60, size=n)]


def test_module_source_serves_what_the_model_returns(tmp_path):
    """示例模型（卷积 + 池化，码本 32/32/64，有 attach_catalog）经 model.factory=文件:函数，无检查点。"""
    logs = []
    model_cfg = UGTConfig(name="pooled_cnn", source="module", factory=f"{EXAMPLE}:build", codebook_sizes=[32, 32, 64])
    cfg = _config(str(tmp_path / "b"), model_cfg, catalog=CatalogConfig(num_items=2000, seed=5))
    result = build(cfg, log=logs.append, gpus=[])
    text = "\n".join(logs)
    assert "constrained_decoding: 开" in text and "decoder_kv_cache: 关" in text
    with open(os.path.join(result.repository, "build_info.json")) as f:
        info = json.load(f)
    assert info["user_model"]["source"] == "module" and info["gates"]["passed"]
    flops = {int(k): v for k, v in info["user_model"]["flops_by_length"].items()}
    assert flops[64] > flops[1] > 0  # 卷积的 FLOPs 随长度增长
    catalog = load_catalog(result.catalog)
    model = _load(EXAMPLE, "build").eval().attach_catalog(catalog.semantic_ids)

    def run(feeds):
        with torch.no_grad():
            rec, sc = model(*[torch.from_numpy(feeds[n]) for n in cfg.contract().input_names])
        return rec.numpy(), sc.numpy()

    _serve_and_compare(cfg, result, catalog, run, _histories(catalog))


def test_onnx_source_serves_what_the_onnx_file_returns(tmp_path):
    """团队已导出的 ONNX（码本 8/8/16，没有目录约束）经 model.source=onnx；对照 ONNX Runtime 直接跑这个文件。"""
    from algorithm.serving.runtime.engines.onnxruntime import ort_session

    catalog = synthetic_catalog(600, SMALL, seed=2)
    cat_path = catalog.save(str(tmp_path / "catalog.npz"))
    model = _load(FOREIGN, "bag").eval()
    cfg0 = _config(str(tmp_path / "b"), UGTConfig(name="bag", codebook_sizes=SMALL, source="onnx", path="x.onnx"))
    contract = cfg0.contract()
    onnx_path = str(tmp_path / "bag.onnx")
    feeds = contract.random_inputs(2, 16, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)
    axes = {s.name: s.dynamic_axes for s in contract.inputs + contract.outputs}
    torch.onnx.export(model, args, onnx_path, dynamo=False, input_names=list(contract.input_names),
                      output_names=list(contract.output_names), dynamic_axes=axes, opset_version=18)
    logs = []
    cfg = _config(str(tmp_path / "b"), UGTConfig(name="bag", codebook_sizes=SMALL, source="onnx", path=onnx_path),
                  catalog=CatalogConfig(path=cat_path))
    result = build(cfg, log=logs.append, gpus=[])
    assert "constrained_decoding: 关：模型没有 attach_catalog" in "\n".join(logs)
    sess = ort_session(onnx_path)
    names = [i.name for i in sess.get_inputs()]

    def run(feeds):
        rec, sc = sess.run(list(contract.output_names), {n: feeds[n] for n in names})
        return rec, sc

    _serve_and_compare(cfg, result, catalog, run, _histories(catalog, seed=1))


def test_exported_source_builds_and_gates_against_the_program(tmp_path):
    """torch.export 的 .pt2 经 model.source=exported：门禁对照这个程序（fp32），构建信息写明来源与 FLOPs 的算法。"""
    model = _load(FOREIGN, "bag").eval()
    cfg0 = _config(str(tmp_path / "b"), UGTConfig(name="bag", codebook_sizes=SMALL, source="exported", path="x"))
    contract = cfg0.contract()
    feeds = contract.random_inputs(2, 16, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)
    b, s = torch.export.Dim("batch", max=64), torch.export.Dim("seq_len", max=1024)
    ep = torch.export.export(model, args, dynamic_shapes=tuple({0: b, 1: s} for _ in args))
    pt2 = str(tmp_path / "bag.pt2")
    torch.export.save(ep, pt2)
    cfg = _config(str(tmp_path / "b"), UGTConfig(name="bag", codebook_sizes=SMALL, source="exported", path=pt2),
                  catalog=CatalogConfig(num_items=600, seed=2))
    result = build(cfg, log=lambda s: None, gpus=[])
    with open(os.path.join(result.repository, "build_info.json")) as f:
        info = json.load(f)
    assert info["user_model"]["source"] == "exported" and info["gates"]["passed"]
    assert "flop_counter" in info["user_model"]["flops_method"]


def _assert_nothing_left(build_dir):
    parent = os.path.dirname(build_dir)
    assert not os.path.exists(build_dir), os.listdir(build_dir)
    assert not [f for f in os.listdir(parent) if "-staging-" in f]


@pytest.mark.parametrize("factory, error, words", [
    ("wrong_shape", ModelContractError, ["scores", "[1, 50]", "[1, 50, 1]"]),
    ("wrong_dtype", ModelContractError, ["recommendations", "int64", "int32"]),
    ("lost_batch", ModelContractError, ["recommendations", "丢了动态 batch"]),
    ("not_exportable", ModelExportError, ["torch.export", "data-dependent", "foreign_models.py"]),
])
def test_bad_models_are_refused_before_anything_is_written(tmp_path, factory, error, words):
    build_dir = str(tmp_path / "b")
    cfg = _config(build_dir, UGTConfig(name="bad", source="module", factory=f"{FOREIGN}:{factory}",
                                       codebook_sizes=SMALL), catalog=CatalogConfig(num_items=600, seed=2))
    with pytest.raises(error) as e:
        build(cfg, log=lambda s: None, gpus=[])
    for w in words:
        assert w in str(e.value), str(e.value)
    _assert_nothing_left(build_dir)


def test_catalog_with_other_codebook_sizes_is_refused(tmp_path):
    cat_path = synthetic_catalog(600, [8, 8, 32], seed=2).save(str(tmp_path / "catalog.npz"))
    build_dir = str(tmp_path / "b")
    cfg = _config(build_dir, UGTConfig(name="bag", source="module", factory=f"{FOREIGN}:bag", codebook_sizes=SMALL),
                  catalog=CatalogConfig(path=cat_path))
    with pytest.raises(CatalogError, match=r"\[8, 8, 32\].*\[8, 8, 16\]"):
        build(cfg, log=lambda s: None, gpus=[])
    _assert_nothing_left(build_dir)


def test_bad_onnx_with_fixed_batch_is_refused(tmp_path):
    """导出时没给动态轴的 ONNX：声明里 batch 固定，构建写明哪个输入、哪一轴。"""
    model = _load(FOREIGN, "bag").eval()
    cfg0 = _config(str(tmp_path / "b"), UGTConfig(name="bag", codebook_sizes=SMALL, source="onnx", path="x"))
    contract = cfg0.contract()
    feeds = contract.random_inputs(2, 16, np.random.default_rng(0))
    args = tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)
    onnx_path = str(tmp_path / "fixed.onnx")
    torch.onnx.export(model, args, onnx_path, dynamo=False, input_names=list(contract.input_names),
                      output_names=list(contract.output_names), opset_version=18)
    build_dir = str(tmp_path / "b")
    cfg = _config(build_dir, UGTConfig(name="bag", codebook_sizes=SMALL, source="onnx", path=onnx_path),
                  catalog=CatalogConfig(num_items=600, seed=2))
    with pytest.raises(ModelContractError, match="encoder_l1_ids: 第 0 轴.*固定为 2.*动态 batch"):
        build(cfg, log=lambda s: None, gpus=[])
    _assert_nothing_left(build_dir)


def test_checkpoint_is_a_state_dict_or_a_whole_module(tmp_path):
    """checkpoint=：state_dict（weights_only=True）装进工厂的模型；整个保存的模块按 pickle 读，日志写明。"""
    from algorithm.serving.model_source import load_module

    trained = _load(FOREIGN, "bag")
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)  # 与工厂的初始权重不同
    sd, whole = str(tmp_path / "sd.pt"), str(tmp_path / "whole.pt")
    torch.save(trained.state_dict(), sd)
    torch.save(trained, whole)
    for path, says_pickle in ((sd, False), (whole, True)):
        logs = []
        cfg = _config(str(tmp_path / "b"), UGTConfig(name="bag", source="module", factory=f"{FOREIGN}:bag",
                                                     codebook_sizes=SMALL), checkpoint=path)
        model = load_module(cfg, logs.append)
        for (name, a), b in zip(trained.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
        assert any("weights_only=False" in s for s in logs) == says_pickle


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_example_model_runs_in_the_gpu_build_precisions(dtype):
    """GPU 上的 fp16 构建把整个模型转成 fp16：示例的 forward 不能把 fp32 的 mask 混进去（否则卷积报 dtype 不一致）。"""
    from algorithm.serving.model_source import load_module_file

    net = load_module_file(EXAMPLE).build().eval().to(dtype)
    rng = np.random.default_rng(0)
    b, n = 3, 17
    ids = [torch.from_numpy(rng.integers(0, v, (b, n))) for v in (32, 32, 64)]
    pos = torch.arange(n).expand(b, n)
    with torch.no_grad():
        rec, scores = net(*ids, pos, torch.zeros(b, n, dtype=torch.long), torch.ones(b, n))
    assert rec.shape == (b, 50, 3) and rec.dtype == torch.int64 and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
