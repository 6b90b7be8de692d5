"""拼行（engine.pack_rows）：拼行计划放得下、不重叠；拼行的模型与逐条填充的模型推荐相同（含行内 mask 为 0 的位置、
多行请求、行尾填充）；导出的拼行程序经 TorchRunner / EngineModel 与按长度分组的同一权重结果相同，坏请求单独失败。"""
import dataclasses

import numpy as np
import pytest
import torch

from algorithm.errors import ConfigError
from algorithm.interfaces import ContractError
from algorithm.models.catalog import synthetic_catalog
from algorithm.models.ugt import build_model
from algorithm.serving.config import EngineConfig
from algorithm.serving.engines import resolve_auto
from algorithm.serving.engines.torch import export_torch_program
from algorithm.serving.export_onnx import torch_reference
from algorithm.serving.runtime import batching, rowpack
from algorithm.serving.runtime.engines.base import EngineRunner, Staged
from algorithm.serving.runtime.engines.torch import GroupedTorchRunner, PackedTorchRunner, TorchRunner
from algorithm.serving.runtime.models import EngineModel
from algorithm.serving.triton_config import runtime_spec
from conftest import tiny_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("rowpack")
    cfg = tiny_config(str(d), engine=EngineConfig(kind="torch", device="cpu", compile_mode="none", pack_rows=True))
    catalog = synthetic_catalog(400, cfg.model.codebook_sizes, seed=4)
    model = build_model(cfg.model, seed=2).attach_catalog(catalog.semantic_ids)
    return cfg, model, d


def mixed_requests(contract, rng):
    reqs = [contract.random_inputs(b, n, rng) for b, n in ((1, 40), (2, 7), (1, 100), (3, 25), (1, 1), (1, 256))]
    reqs[0]["encoder_mask"][0, 5:9] = 0  # 行内 mask 为 0 的位置：拼进去但被屏蔽
    reqs[3]["encoder_mask"][1, 20:] = 0  # 多行请求里较短的一行：行尾填充不拼
    return reqs


def test_plan_places_every_history_without_overlap(rng):
    contract = tiny_config("/tmp/unused").contract()
    reqs = mixed_requests(contract, rng)
    batch, errors = batching.collect(reqs, contract)
    assert not errors
    p = rowpack.plan(batch, (64, 128, 256), contract.max_seq_length)
    assert p.width == 256 and p.histories == 9
    assert p.lengths.tolist() == [40, 7, 7, 100, 25, 20, 25, 1, 256]
    taken = np.zeros((p.rows, p.width), dtype=int)
    for r, o, n in zip(p.row, p.offset, p.lengths):
        taken[r, o:o + n] += 1
    assert taken.max() == 1 and taken.sum() == p.lengths.sum()
    assert p.rows == -(-int(p.lengths.sum()) // p.width)  # 这一组长度下 first-fit decreasing 正好用最少的行
    bufs = rowpack.alloc(contract, p.rows + 1, p.width, p.histories + 2)
    rowpack.fill(batch, p, bufs)
    seg, ri = bufs[rowpack.SEGMENTS], bufs[rowpack.REQUEST_INDEX]
    assert seg[p.rows:].max() == 0 and (ri[p.histories:] == -1).all()  # 多出的行与历史全是填充
    flat_l1 = bufs["encoder_l1_ids"].reshape(-1)
    for i, r, s, n in zip(range(p.histories), *[x.tolist() for x in (p.row, p.offset, p.lengths)]):
        valid = batch.flat["encoder_mask"][p.src[i]:p.src[i] + n] > 0
        assert ((seg[r, s:s + n] == i + 1) == valid).all()
        np.testing.assert_array_equal(ri[i, :n][valid], r * p.width + s + np.flatnonzero(valid))
        assert (ri[i, :n][~valid] == -1).all() and (ri[i, n:] == -1).all()
        np.testing.assert_array_equal(flat_l1[ri[i, :n][valid]],
                                      batch.flat["encoder_l1_ids"][p.src[i]:p.src[i] + n][valid])


def test_packed_model_matches_padded_model(tiny, rng):
    cfg, model, _ = tiny
    contract = cfg.contract()
    reqs = mixed_requests(contract, rng)
    batch, _ = batching.collect(reqs, contract)
    p = rowpack.plan(batch, (64, 128, 256), contract.max_seq_length)
    bufs = rowpack.alloc(contract, p.rows + 2, p.width, p.histories + 3)  # 多出的行与历史：全填充也不出 NaN
    rowpack.fill(batch, p, bufs)
    with torch.no_grad():
        rec, scores = model.forward_packed(*[torch.from_numpy(bufs[n]) for n in rowpack.input_names(contract)])
    assert torch.isfinite(scores).all()
    for i, start, n in rowpack.split(batch, p):
        ref = torch_reference(model, reqs[i], contract)
        assert np.array_equal(rec[start:start + n].numpy(), ref[0])
        np.testing.assert_allclose(scores[start:start + n].numpy(), ref[1], atol=1e-4)


def test_exported_packed_program_serves_like_grouped_runner(tiny, rng):
    """同一权重：拼行的 .pt2（TorchRunner 按输入个数认出）与按长度分组的 .pt2，经 EngineModel 的结果相同；坏请求单独失败。"""
    cfg, model, d = tiny
    contract = cfg.contract()
    packed = TorchRunner.load(export_torch_program(model, str(d / "packed.pt2"), cfg), contract, "cpu", compile_mode="none",
                              cuda_graphs=False)
    plain_cfg = dataclasses.replace(cfg, engine=dataclasses.replace(cfg.engine, pack_rows=False))
    plain = TorchRunner.load(export_torch_program(model, str(d / "plain.pt2"), plain_cfg), contract, "cpu",
                             compile_mode="none", cuda_graphs=False)
    assert isinstance(packed, PackedTorchRunner) and packed.packs_rows
    assert isinstance(plain, GroupedTorchRunner) and not plain.packs_rows
    spec = dataclasses.replace(runtime_spec(cfg), pack_inputs=False)
    eng_packed = EngineModel("", cfg, spec, runner=packed)
    eng_plain = EngineModel("", cfg, spec, runner=plain)
    reqs = mixed_requests(contract, rng)
    bad = contract.random_inputs(1, 12, rng)
    bad["encoder_l2_ids"][0, 3] = 10 ** 6
    reqs = reqs[:2] + [bad] + reqs[2:]
    got, want = eng_packed.execute(reqs), eng_plain.execute(reqs)
    assert isinstance(got[2], ContractError) and "encoder_l2_ids" in str(got[2])
    for g, w in zip(got[:2] + got[3:], want[:2] + want[3:]):
        assert np.array_equal(g["recommendations"], w["recommendations"])
        np.testing.assert_allclose(g["scores"], w["scores"], atol=1e-4)
    s = eng_packed.stats.last
    assert s["groups"] == 1 and s["requests"] == 6 and s["valid_tokens"] <= s["padded_tokens"]
    rec, _ = packed.run(contract.random_inputs(3, 30, rng))  # 门禁与离线吞吐走的 run([B, L]) 也经拼行
    assert rec.shape == (3, cfg.model.top_k, 3)


def test_pack_rows_needs_the_torch_engine():
    with pytest.raises(ConfigError, match="pack_rows"):
        EngineConfig(kind="onnxruntime", pack_rows=True)
    # auto（conf/engine/auto.yaml 默认开拼行）：选了 torch 时保留，选了 onnxruntime（没有 GPU）时关掉
    got = resolve_auto(tiny_config("/tmp/unused", engine=EngineConfig(kind="auto", pack_rows=True))).engine
    assert got.pack_rows == (got.kind == "torch")


class _FailingRunner(EngineRunner):
    """计算时抛异常的运行器（拼行与分组两条路都经过它）：引擎失败时这批请求都得到错误，服务继续。"""

    def __init__(self, packed):
        self.packs_rows = packed
        self.contract = tiny_config("/tmp/unused").contract()

    def stage_packed(self, batch):
        p = rowpack.plan(batch, (), self.contract.max_seq_length)
        return p, Staged(rowpack.alloc(self.contract, p.rows, p.width, p.histories))

    def compute(self, staged):
        raise RuntimeError("CUDA error: out of memory")


@pytest.mark.parametrize("packed", [True, False])
def test_engine_failure_fails_the_batch_but_not_bad_requests(tiny, rng, packed):
    cfg, _, _ = tiny
    contract = cfg.contract()
    spec = dataclasses.replace(runtime_spec(cfg), pack_inputs=False)
    eng = EngineModel("", cfg, spec, runner=_FailingRunner(packed))
    bad = contract.random_inputs(1, 5, rng)
    bad["encoder_l1_ids"][0, 0] = -1
    got = eng.execute([contract.random_inputs(1, 9, rng), bad, contract.random_inputs(2, 30, rng)])
    assert isinstance(got[1], ContractError)
    assert all(isinstance(got[i], RuntimeError) and "引擎执行失败" in str(got[i]) and "out of memory" in str(got[i])
               for i in (0, 2))
