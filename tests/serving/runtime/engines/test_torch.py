"""torch 引擎：torch.export 的 .pt2 在 CPU 上（eager 与 torch.compile）与 PyTorch fp32 一致；GPU 测试在没有 GPU 时跳过。"""
import numpy as np
import pytest
import torch

from algorithm.errors import InternalError
from algorithm.models.catalog import synthetic_catalog
from algorithm.models.ugt import build_model
from algorithm.serving.config import EngineConfig, ExportConfig
from algorithm.serving.export_onnx import torch_reference
from algorithm.serving.engines.torch import export_torch_program
from algorithm.serving.runtime.engines.torch import GroupedTorchRunner, PackedTorchRunner, TorchRunner
from conftest import tiny_config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("torch")
    cfg = tiny_config(str(d), engine=EngineConfig(kind="torch", device="cpu", compile_mode="none"))
    catalog = synthetic_catalog(400, cfg.model.codebook_sizes, seed=4)
    model = build_model(cfg.model, seed=2).attach_catalog(catalog.semantic_ids)
    return cfg, model, export_torch_program(model, str(d / "m.pt2"), cfg)


@pytest.mark.parametrize("mode", ["none", pytest.param("default", marks=pytest.mark.slow)])
def test_torch_engine_matches_fp32_reference_on_cpu(exported, mode):
    cfg, model, path = exported
    runner = TorchRunner.load(path, cfg.model.contract(), "cpu", compile_mode=mode, cuda_graphs=False,
                              cache_dir=str(cfg.build_dir) + "/cache")
    rng = np.random.default_rng(3)
    for b, n in ((3, 40), (1, 1), (6, 17)):  # 第二、三个形状不同：动态形状编译不应重编或出错
        feeds = cfg.model.contract().random_inputs(b, n, rng)
        rec, scores = runner.run(feeds)
        ref = torch_reference(model, feeds, cfg.model.contract())
        assert np.array_equal(rec, ref[0])
        np.testing.assert_allclose(scores, ref[1], atol=1e-4)


def test_fp16_export_runs_and_int8_is_a_serve_time_transform(exported, tmp_path):
    cfg, model, _ = exported
    cfg16 = tiny_config(str(tmp_path), export=ExportConfig(precision="fp16", max_batch_size=16, max_seq_length=256),
                        engine=EngineConfig(kind="torch", device="cpu", compile_mode="none"))
    path = export_torch_program(model, str(tmp_path / "h.pt2"), cfg16)
    runner = TorchRunner.load(path, cfg.model.contract(), "cpu", compile_mode="none", cuda_graphs=False)
    feeds = cfg.model.contract().random_inputs(2, 9, np.random.default_rng(0))
    rec, scores = runner.run(feeds)
    assert rec.shape == (2, 50, 3) and scores.dtype == np.float32 and np.isfinite(scores).all()
    # int8：.pt2 在 CPU 上按 fp32 导出，加载后由 torchao 量化（没有 torchao 时给出写明缺什么的错误）
    cfg8 = tiny_config(str(tmp_path), export=ExportConfig(precision="int8", max_batch_size=16, max_seq_length=256),
                       engine=EngineConfig(kind="torch", device="cpu", compile_mode="none"))
    path8 = export_torch_program(model, str(tmp_path / "q.pt2"), cfg8)
    pytest.importorskip("torchao", reason="torch 引擎的 int8 需要 torchao")
    from algorithm.serving.runtime.engines.torch import int8_transform

    runner8 = TorchRunner.load(path8, cfg.model.contract(), "cpu", compile_mode="none", cuda_graphs=False,
                               transform=int8_transform("dynamic"))
    rec8, scores8 = runner8.run(feeds)
    assert rec8.shape == (2, 50, 3) and np.isfinite(scores8).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="需要 CUDA GPU")
def test_cuda_graph_buckets_match_eager_on_gpu(exported):
    cfg, model, path = exported
    runner = TorchRunner.load(path, cfg.model.contract(), "cuda", compile_mode="none", cuda_graphs=True,
                              batch_buckets=[2, 8], seq_buckets=[64, 256])
    assert isinstance(runner, GroupedTorchRunner) and len(runner.slots) == 4
    feeds = cfg.model.contract().random_inputs(3, 50, np.random.default_rng(1))
    rec, scores = runner.run(feeds)
    ref = torch_reference(model, feeds, cfg.model.contract())
    assert np.array_equal(rec, ref[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="需要 CUDA GPU")
@pytest.mark.parametrize("group_streams", [False, True])
def test_length_groups_of_one_execute_match_eager_on_gpu(exported, group_streams):
    """一次 run_many 的几组（不同长度桶；group_streams 时在各自的流上同时重放）各自等于参考；连续多次
    execute 不串数据（同一暂存区、同一流被下一次复用）。group_streams 时各长度桶的图在各自的捕获流上捕获：
    共用捕获流的图共用 cuBLAS 工作区，同时重放会互相踩（H100 上服务器因此卡死过）。"""
    cfg, model, path = exported
    contract = cfg.model.contract()
    runner = TorchRunner.load(path, contract, "cuda", compile_mode="none", cuda_graphs=True,
                              batch_buckets=[2, 8, 16], seq_buckets=[64, 256], group_streams=group_streams)
    assert runner.group_streams == group_streams
    if group_streams:
        assert len({id(s) for s in runner._capture_streams.values()}) == 2
    rng = np.random.default_rng(5)
    for i in range(8):  # 小组与大组交替：大组的矩阵乘更可能用到工作区
        shapes = ((5, 30), (2, 200)) if i % 2 == 0 else ((16, 60), (13, 250))  # 导出的 batch 上限是 16
        feeds = [contract.random_inputs(b, n, rng) for b, n in shapes]
        outs, timing = runner.run_many(stage_groups(runner, contract, feeds))
        assert timing["device_ms"] > 0
        assert_matches_reference(model, contract, feeds, outs)


def stage_groups(runner, contract, feeds):
    """每组请求写进它那个桶的暂存区（与 EngineModel 按长度分组后做的相同）。"""
    staged = []
    for f in feeds:
        b, n = f["encoder_mask"].shape
        st = runner.staging(b, n)
        for name in contract.input_names:
            st.feeds[name][:b, :n] = f[name]
        staged.append(st)
    return staged


def assert_matches_reference(model, contract, feeds, outs):
    for f, (rec, scores) in zip(feeds, outs):
        b = f["encoder_mask"].shape[0]
        ref = torch_reference(model, f, contract)
        assert np.array_equal(rec[:b], ref[0])
        np.testing.assert_allclose(scores[:b], ref[1], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="需要 CUDA GPU")
def test_packed_rows_graphs_match_reference_on_gpu(exported, tmp_path):
    """拼行的程序（engine.pack_rows）：每个 (行数桶, 历史数桶, 宽) 一张图；混合长度、多行请求的几次 execute 连续重放，
    每条历史等于逐条填充的 fp32 参考（同一暂存区被下一次复用也不串数据）。"""
    import dataclasses

    from algorithm.serving.runtime import batching, rowpack
    from algorithm.serving.runtime.buckets import round_up

    cfg, model, _ = exported
    contract = cfg.model.contract()
    cfgp = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, pack_rows=True))
    path = export_torch_program(model, str(tmp_path / "packed.pt2"), cfgp)
    runner = TorchRunner.load(path, contract, "cuda", compile_mode="none", cuda_graphs=True,
                              batch_buckets=[2, 8, 16], seq_buckets=[64, 256])
    assert isinstance(runner, PackedTorchRunner) and runner.packs_rows
    assert len(runner.slots) == 2 * 6  # 每个宽：行数 <= 历史数的 6 种 (行数桶, 历史数桶)
    rng = np.random.default_rng(9)
    for i in range(6):
        shapes = ((1, 30), (2, 200), (1, 5)) if i % 2 == 0 else ((4, 60), (1, 250), (3, 17), (1, 64))
        reqs = [contract.random_inputs(b, n, rng) for b, n in shapes]
        batch, errors = batching.collect(reqs, contract)
        assert not errors
        p, st = runner.stage_packed(batch)
        assert st.feeds is runner.slots[(round_up(p.rows, [2, 8, 16]), round_up(p.histories, [2, 8, 16]), 256)].host_in
        outs, timing = runner.run_many([st])
        rec, scores = outs[0]
        assert timing["device_ms"] > 0 and p.width == 256
        for j, start, n in rowpack.split(batch, p):
            ref = torch_reference(model, reqs[j], contract)
            assert np.array_equal(rec[start:start + n], ref[0])
            np.testing.assert_allclose(scores[start:start + n], ref[1], atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="需要 CUDA GPU")
@pytest.mark.parametrize("group_streams", [False, True])
def test_two_batches_in_flight_on_the_same_buckets_keep_their_own_buffers_on_gpu(exported, group_streams):
    """流水线（triton.engine_pipeline_depth=2，lanes=2）：第二批在第一批还没 finish 时写暂存区并启动，落在同样的桶上；
    两套页锁定暂存区 / 输出区互不覆盖，两批各自等于参考。lanes=1 时同样的顺序会让第二批覆盖第一批的暂存区（这里不测）。"""
    cfg, model, path = exported
    contract = cfg.model.contract()
    runner = TorchRunner.load(path, contract, "cuda", compile_mode="none", cuda_graphs=True,
                              batch_buckets=[2, 8, 16], seq_buckets=[64, 256], group_streams=group_streams, lanes=2)
    rng = np.random.default_rng(13)
    for _ in range(4):
        batches = [[contract.random_inputs(b, n, rng) for b, n in ((5, 30), (2, 200))] for _ in range(2)]
        # 两批都启动了再取：第二批的暂存与启动发生在第一批的 GPU 工作之后、finish 之前
        pending = [runner.launch(stage_groups(runner, contract, feeds)) for feeds in batches]
        for feeds, p in zip(batches, pending):
            outs, timing = runner.finish(p)
            assert timing["device_ms"] > 0 and timing["gap_ms"] >= 0  # 同一流上上一批的结束到这一批的开始
            assert_matches_reference(model, contract, feeds, outs)
    # 同一次 execute 的两组落到同一张图（各拿到一套暂存区，按暂存区看不出来）：运行器拒绝，而不是给出错的结果
    same = stage_groups(runner, contract, [contract.random_inputs(3, 30, rng), contract.random_inputs(4, 40, rng)])
    with pytest.raises(InternalError, match="同一张图"):
        runner.launch(same)
