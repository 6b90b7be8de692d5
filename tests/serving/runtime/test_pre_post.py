"""前处理与后处理（无服务器）：未知 id 规则、截断、填充到桶、行为类型、去重与填充。"""
import numpy as np
import pytest

from algorithm.interfaces import EngineContract
from algorithm.models.catalog import synthetic_catalog
from algorithm.serving.runtime.postprocess import FILL_ITEM, Postprocessor
from algorithm.serving.runtime.buckets import round_up as bucket_length
from algorithm.serving.runtime.preprocess import PreprocessError, Preprocessor

CAT = synthetic_catalog(200, (1024, 4096, 16384), seed=9)


def pre(**kw):
    return Preprocessor(CAT, EngineContract(max_seq_length=kw.pop("max_len", 16)), **kw)


def test_encode_positions_mask_and_semantic_ids():
    items = CAT.item_ids[:5]
    feeds, unknown = pre().encode_one(items, np.array([0, 1, 2, 3, 4]))
    assert unknown == 0 and feeds["encoder_mask"].tolist() == [[1.0] * 5]
    assert feeds["encoder_positions"].tolist() == [[0, 1, 2, 3, 4]]
    assert feeds["encoder_l3_ids"][0].tolist() == CAT.semantic_ids[:5, 2].tolist()
    EngineContract(max_seq_length=16).validate_inputs(feeds)


def test_unknown_items_skip_or_error():
    items = np.concatenate([CAT.item_ids[:3], [-1, 10 ** 9]])
    feeds, unknown = pre().encode_one(items)
    assert unknown == 2 and feeds["encoder_mask"].sum() == 3
    with pytest.raises(PreprocessError, match=r"history_item_ids\[3\] = -1"):
        pre(unknown_item_policy="error").encode_one(items)
    with pytest.raises(PreprocessError, match="都不在目录中"):
        pre().encode_one(np.array([-5, -6]))


def test_truncation_keeps_most_recent():
    items = CAT.item_ids[:40]
    feeds, _ = pre(max_len=16).encode_one(items)
    assert feeds["encoder_l3_ids"][0].tolist() == CAT.semantic_ids[24:40, 2].tolist()
    assert feeds["encoder_positions"][0].tolist() == list(range(16))


def test_bucket_padding():
    assert bucket_length(5, (8, 16), 16) == 8 and bucket_length(9, (8, 16), 16) == 16
    feeds, _ = pre(seq_buckets=(8, 16)).encode_one(CAT.item_ids[:5])
    assert feeds["encoder_mask"].shape == (1, 8) and feeds["encoder_mask"].sum() == 5


@pytest.mark.parametrize("items, types, words", [
    (np.array([], dtype=np.int64), None, "历史为空"),
    (CAT.item_ids[:3].astype(np.int32), None, "int64"),
    (CAT.item_ids[:4].reshape(2, 2), None, "一维"),
    (CAT.item_ids[:3], np.array([0, 1]), "长度"),
    (CAT.item_ids[:3], np.array([0, 99, 1]), r"history_behavior_types\[1\] = 99"),
])
def test_bad_requests(items, types, words):
    with pytest.raises(PreprocessError, match=words):
        pre().encode_one(items, types)


def test_history_size_limit():
    with pytest.raises(PreprocessError, match="上限"):
        pre(max_history_items=10).encode_one(CAT.item_ids[:11])


def test_postprocess_drops_invalid_and_duplicates_and_fills():
    post = Postprocessor(CAT, top_k=4)
    rec = np.array([[CAT.semantic_ids[0], [1023, 4095, 16383], CAT.semantic_ids[1], CAT.semantic_ids[0],
                     CAT.semantic_ids[2]]])
    scores = np.array([[-1.0, -1.5, -2.0, -2.5, -3e38]], dtype=np.float32)
    items, sc, sem = post(rec, scores)
    assert items[0].tolist() == [CAT.item_ids[0], CAT.item_ids[1], FILL_ITEM, FILL_ITEM]
    assert sc[0, :2].tolist() == [-1.0, -2.0] and np.isneginf(sc[0, 2:]).all()
    assert (sem[0, 2:] == -1).all()


def test_engine_output_of_wrong_shape_is_a_server_fault():
    """引擎的输出形状不符是服务端的故障：客户端收到 INTERNAL，而不是“你的输入错了”。"""
    from algorithm.errors import EngineOutputError
    from algorithm.serving.runtime.models import serving_error_code

    with pytest.raises(EngineOutputError, match="引擎输出形状不符") as err:
        Postprocessor(CAT, top_k=4)(np.zeros((1, 4, 2), np.int64), np.zeros((1, 4), np.float32))
    assert serving_error_code(err.value) == "INTERNAL"
