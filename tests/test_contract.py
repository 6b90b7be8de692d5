"""引擎 I/O 契约：只声明一次，各处派生。"""
import numpy as np
import pytest

from algorithm.interfaces import ContractError, EngineContract


def test_contract_names_dtypes_axes():
    c = EngineContract()
    assert c.input_names == ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "encoder_positions",
                             "encoder_token_types", "encoder_mask")
    assert c.output_names == ("recommendations", "scores")
    assert all(s.dynamic_axes == {0: "batch", 1: "seq_len"} for s in c.inputs)
    assert c.input("encoder_mask").triton_dtype == "TYPE_FP32"
    assert c.input("encoder_l3_ids").value_range == (0, 16384)
    assert c.outputs[0].dims_without_batch == (50, 3) and c.outputs[1].dims_without_batch == (50,)


def test_random_inputs_are_valid(rng):
    c = EngineContract(max_seq_length=64)
    feeds = c.random_inputs(3, 20, rng, lengths=np.array([20, 5, 1]))
    c.validate_inputs(feeds, max_batch_size=4)
    assert feeds["encoder_mask"].sum(axis=1).tolist() == [20, 5, 1]


@pytest.mark.parametrize("mutate, words", [
    (lambda f: f.__setitem__("encoder_l1_ids", f["encoder_l1_ids"] + 1024), ["encoder_l1_ids", "[0, 1024)"]),
    (lambda f: f["encoder_l3_ids"].__setitem__((1, 4), -1), ["encoder_l3_ids", "[1, 4]", "-1"]),
    (lambda f: f.__setitem__("encoder_positions", f["encoder_positions"] + 64), ["encoder_positions", "64"]),
    (lambda f: f.__setitem__("encoder_mask", f["encoder_mask"] * 0.5), ["encoder_mask"]),
    (lambda f: f.__setitem__("encoder_mask", f["encoder_mask"] * np.nan), ["NaN"]),
    (lambda f: f.__setitem__("encoder_token_types", f["encoder_token_types"].astype(np.int32)), ["int64"]),
    (lambda f: f.__setitem__("encoder_l2_ids", f["encoder_l2_ids"][0]), ["秩"]),
    (lambda f: f.pop("encoder_mask"), ["缺少"]),
    (lambda f: f.__setitem__("encoder_l2_ids", f["encoder_l2_ids"][:, :3]), ["不一致"]),
])
def test_validate_inputs_names_what_is_wrong(rng, mutate, words):
    c = EngineContract(max_seq_length=64)
    feeds = c.random_inputs(2, 10, rng)
    mutate(feeds)
    with pytest.raises(ContractError) as e:
        c.validate_inputs(feeds)
    for w in words:
        assert w in str(e.value)


def test_batch_and_length_limits(rng):
    c = EngineContract(max_seq_length=8)
    with pytest.raises(ContractError, match="max_batch_size"):
        c.validate_inputs(c.random_inputs(5, 4, rng), max_batch_size=4)
    big = EngineContract(max_seq_length=16).random_inputs(1, 12, rng)
    with pytest.raises(ContractError):
        c.validate_inputs(big)
