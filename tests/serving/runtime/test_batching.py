"""引擎的一次 execute 当作一批：向量化校验（坏请求单独失败、错误写明输入名）、分组与代价合并、
向量化写入暂存区与逐请求合并结果相同、整批与逐个请求的 top-50 完全相同。"""
import numpy as np

from algorithm.interfaces import ContractError, EngineContract
from algorithm.serving.runtime import batching
from algorithm.serving.runtime.engines.base import EngineRunner
from algorithm.serving.runtime.models import EngineModel
from algorithm.serving.runtime.packed import PACKED_INPUT, pack, unpack

C = EngineContract(max_seq_length=64, codebook_sizes=(16, 32, 64))


def req(rng, n, b=1):
    return C.random_inputs(b, n, rng)


def test_collect_isolates_bad_requests_and_names_the_input(rng):
    good = [req(rng, n) for n in (3, 9, 1)]
    bad_range = req(rng, 5)
    bad_range["encoder_l2_ids"][0, 2] = 32
    nan_mask = req(rng, 4)
    nan_mask["encoder_mask"][0, 1] = np.nan
    empty_row = req(rng, 4)
    empty_row["encoder_mask"][:] = 0
    wrong_dtype = req(rng, 4)
    wrong_dtype["encoder_positions"] = wrong_dtype["encoder_positions"].astype(np.int32)
    missing = req(rng, 4)
    del missing["encoder_token_types"]
    too_long = req(rng, 65)
    reqs = [good[0], bad_range, good[1], nan_mask, empty_row, wrong_dtype, missing, too_long, good[2]]
    batch, errors = batching.collect(reqs, C)
    assert batch.index.tolist() == [0, 2, 8]
    assert set(errors) == {1, 3, 4, 5, 6, 7}
    assert all(isinstance(e, ContractError) for e in errors.values())
    assert "encoder_l2_ids" in str(errors[1]) and "encoder_mask" in str(errors[3])
    assert "没有有效位置" in str(errors[4]) and "encoder_positions" in str(errors[5])
    assert "encoder_token_types" in str(errors[6]) and "64" in str(errors[7])


def naive_merge(reqs, length):
    """旧的逐请求合并（对照）：每个请求的每个输入逐个拷贝进零填充的批。"""
    total = sum(r["encoder_mask"].shape[0] for r in reqs)
    out = {s.name: np.zeros((total, length), dtype=s.dtype) for s in C.inputs}
    row = 0
    for r in reqs:
        b, n = r["encoder_mask"].shape
        for name in C.input_names:
            out[name][row:row + b, :n] = r[name]
        row += b
    return out


def test_fill_matches_naive_merge(rng):
    reqs = [req(rng, n, b) for n, b in ((7, 1), (3, 2), (12, 1), (1, 3))]
    batch, errors = batching.collect(reqs, C)
    assert not errors
    groups = batching.plan_groups(batch, (), C.max_seq_length)
    for g in groups:
        bufs = {s.name: np.zeros((g.rows, g.length), dtype=s.dtype) for s in C.inputs}
        batching.fill(batch, g, bufs)
        members = [reqs[int(batch.index[j])] for j in g.members]
        ref = naive_merge(members, g.length)
        for name in C.input_names:
            np.testing.assert_array_equal(bufs[name], ref[name])
        rows = [n for _, _, n in batching.split_rows(batch, g)]
        assert sum(rows) == g.rows


def test_groups_by_length_and_merges_when_cheaper(rng):
    reqs = [req(rng, n) for n in (10, 12, 30, 60)]
    batch, _ = batching.collect(reqs, C)
    plain = batching.plan_groups(batch, (16, 32, 64), 64)
    assert [g.length for g in plain] == [16, 32, 64]
    # 每次启动固定 1 s、按行几乎不花钱：全部合成一组最便宜
    merged = batching.plan_groups(batch, (16, 32, 64), 64, cost=lambda rows, length: 1.0 + 1e-3 * rows * length)
    assert [g.length for g in merged] == [64] and merged[0].rows == 4
    # 长度的代价很高：保持分开
    apart = batching.plan_groups(batch, (16, 32, 64), 64, cost=lambda rows, length: rows * length ** 2)
    assert [g.length for g in apart] == [16, 32, 64]


class CountingRunner(EngineRunner):
    """包一层 onnxruntime 运行器，记录每组的形状。"""

    def __init__(self, inner):
        self.inner, self.shapes = inner, []
        self.contract = inner.contract

    def staging(self, rows, length):
        return self.inner.staging(rows, length)

    def compute(self, staged):
        self.shapes += [s.shape for s in staged]
        return self.inner.run_many(staged)


def test_batched_execute_equals_one_by_one(built, catalog):
    """整批（混合长度、含坏请求）与逐个请求的结果完全相同：top-50 列表一致，分数在 fp32 舍入内。"""
    from algorithm.models.train import SyntheticSequences
    from algorithm.serving.pipeline import InProcessPipeline

    pipe = InProcessPipeline(built[1].repository)
    eng: EngineModel = pipe.engine
    data = SyntheticSequences(catalog, seed=21)
    rng = np.random.default_rng(21)
    hs = [data.sample(1, int(n), random_lengths=False)[0][0] for n in rng.integers(1, 256, size=24)]
    feeds = pipe.pre.execute([{"history_item_ids": h.reshape(1, -1)} for h in hs])
    for f in feeds:
        f.pop("num_unknown_items")
    assert eng.spec.pack_inputs and set(feeds[0]) == {PACKED_INPUT}  # 默认：前处理交给引擎的是打包的 1 个张量
    raw = unpack(feeds[0][PACKED_INPUT], eng.contract)
    raw["encoder_l1_ids"] = raw["encoder_l1_ids"] + 10 ** 6  # 拆回之后照样逐项校验、只让它自己失败
    bad = {PACKED_INPUT: pack(raw, eng.contract)}
    mixed = feeds[:12] + [bad] + feeds[12:]
    eng.runner = CountingRunner(eng.runner)
    together = eng.execute(mixed)
    assert isinstance(together[12], ContractError) and "encoder_l1_ids" in str(together[12])
    assert len(eng.runner.shapes) < len(feeds), "应按长度组成批，而不是逐个请求运行"
    together = together[:12] + together[13:]
    for f, t in zip(feeds, together):
        one = eng.execute([f])[0]
        assert np.array_equal(one["recommendations"], t["recommendations"])
        np.testing.assert_allclose(one["scores"], t["scores"], atol=1e-5)
    s = eng.stats.totals
    assert s["executes"] >= 25 and s["requests"] >= 24 + 24 and s["host_ms"] > 0


def test_packed_engine_inputs_give_the_same_answers(built, catalog):
    """打包的 1 个张量（runtime/packed.py）与以前的 6 个张量：同一批请求的结果完全相同；拆不开的请求只让它自己失败。"""
    import copy
    import dataclasses

    from algorithm.models.train import SyntheticSequences
    from algorithm.serving.pipeline import InProcessPipeline

    pipe = InProcessPipeline(built[1].repository)
    eng: EngineModel = pipe.engine
    six = copy.copy(eng)  # 同一个运行器，只是收 6 个张量
    six.spec = dataclasses.replace(eng.spec, pack_inputs=False)
    data = SyntheticSequences(catalog, seed=5)
    hs = [data.sample(1, n, random_lengths=False)[0][0] for n in (3, 40, 200, 17, 1)]
    packed_feeds = [{PACKED_INPUT: f[PACKED_INPUT]} for f in pipe.pre.execute([{"history_item_ids": h.reshape(1, -1)}
                                                                              for h in hs])]
    plain = [unpack(f[PACKED_INPUT], eng.contract) for f in packed_feeds]
    assert plain[1]["encoder_mask"].dtype == np.float32 and plain[1]["encoder_l3_ids"].dtype == np.int64
    bad = {PACKED_INPUT: np.ones((1, 14), np.int64)}  # 宽度既不是 6 的倍数，也不是 6 的倍数加 1（时间戳列）
    got = eng.execute(packed_feeds[:2] + [bad, {}] + packed_feeds[2:])
    assert isinstance(got[2], ContractError) and PACKED_INPUT in str(got[2]) and "encoder_l1_ids" in str(got[2])
    assert isinstance(got[3], ContractError) and "缺少输入" in str(got[3])
    want = six.execute(plain)
    for g, w in zip(got[:2] + got[4:], want):
        assert np.array_equal(g["recommendations"], w["recommendations"])
        np.testing.assert_array_equal(g["scores"], w["scores"])


def test_preprocess_vectorized_equals_per_request(built, catalog):
    from algorithm.serving.runtime.preprocess import PreprocessError, Preprocessor

    pre = Preprocessor(catalog, built[0].contract())
    rng = np.random.default_rng(3)
    ids = catalog.item_ids
    reqs = []
    for n in (1, 5, 40, 300):
        h = rng.choice(ids, n)
        h[1::7] = -3  # 未知 id：跳过并计数
        reqs.append({"history_item_ids": h.reshape(1, -1), "history_behavior_types": (np.arange(n) % 3).reshape(1, -1)})
    reqs.append({"history_item_ids": np.array([[-1, -2]])})  # 全部未知
    reqs.append({"history_behavior_types": np.zeros((1, 3), np.int64)})  # 缺少历史
    out = pre.encode_requests(reqs)
    for r, o in zip(reqs[:4], out[:4]):
        feeds, unknown = pre.encode_one(r["history_item_ids"][0], r["history_behavior_types"][0])
        for k, v in feeds.items():
            np.testing.assert_array_equal(o[k], v)
        assert int(o["num_unknown_items"][0, 0]) == unknown
    assert isinstance(out[4], PreprocessError) and "都不在目录中" in str(out[4])
    assert isinstance(out[5], PreprocessError) and "history_item_ids" in str(out[5])


def test_pack_round_trip_and_errors(rng):
    f = req(rng, 7, b=2)
    x = pack(f, C)
    assert x.shape == (2, 6 * 7) and x.dtype == np.int64
    back = unpack(x, C)
    for s in C.inputs:
        assert back[s.name].dtype == s.dtype
        np.testing.assert_array_equal(back[s.name], f[s.name])
    for wrong in (x.astype(np.float32), x[:, :-1], x.reshape(-1), np.zeros((1, 0), np.int64)):
        try:
            unpack(wrong, C)
        except ContractError as e:
            assert PACKED_INPUT in str(e)
        else:
            raise AssertionError(f"应拒绝 {wrong.dtype} {wrong.shape}")
