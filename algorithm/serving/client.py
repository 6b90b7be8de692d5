"""客户端：把原始历史发给 ensemble（gRPC 或 HTTP），取回 top-k 物品。"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import numpy as np

from algorithm.interfaces import BEHAVIOR_INPUT, HISTORY_INPUT, UNKNOWN_COUNT_OUTPUT as UNKNOWN_COUNT


@dataclass
class Recommendation:
    item_ids: np.ndarray  # [K] int64，不足 K 个时以 -1 填充
    scores: np.ndarray  # [K] fp32，降序，填充处为 -inf
    semantic_ids: np.ndarray  # [K, 3]
    num_unknown_items: int


def _module(protocol: str):
    if protocol == "grpc":
        import tritonclient.grpc as m
    elif protocol == "http":
        import tritonclient.http as m
    else:
        raise ValueError(f"protocol 应为 grpc 或 http，得到 {protocol!r}")
    return m


def make_inputs(protocol: str, item_ids: np.ndarray, behavior_types: Optional[np.ndarray] = None):
    """一个请求的输入：item_ids [1, n]（可选 behavior_types [1, n]）。"""
    m = _module(protocol)
    arr = np.asarray(item_ids, dtype=np.int64).reshape(1, -1)
    inputs = [m.InferInput(HISTORY_INPUT, list(arr.shape), "INT64")]
    inputs[0].set_data_from_numpy(arr)
    if behavior_types is not None:
        b = np.asarray(behavior_types, dtype=np.int64).reshape(1, -1)
        inputs.append(m.InferInput(BEHAVIOR_INPUT, list(b.shape), "INT64"))
        inputs[1].set_data_from_numpy(b)
    return inputs


class RecommendClient:
    """对 ensemble 的同步客户端。url 为 host:port（gRPC 或 HTTP 端口，与 protocol 对应）。"""

    def __init__(self, url: str, model_name: str = "ugt_recommend", protocol: str = "grpc"):
        self.protocol = protocol
        self.model_name = model_name
        self.client = _module(protocol).InferenceServerClient(url=url)

    def recommend(self, item_ids: Sequence[int], behavior_types: Optional[Sequence[int]] = None,
                  timeout_s: Optional[float] = None) -> Recommendation:
        kwargs = {}
        if timeout_s is not None:
            kwargs = {"client_timeout": timeout_s} if self.protocol == "grpc" else {"timeout": int(timeout_s * 1e6)}
        r = self.client.infer(self.model_name, make_inputs(self.protocol, np.asarray(item_ids),
                                                           None if behavior_types is None else np.asarray(behavior_types)),
                              **kwargs)
        return Recommendation(r.as_numpy("item_ids")[0], r.as_numpy("scores")[0], r.as_numpy("semantic_ids")[0],
                              int(r.as_numpy(UNKNOWN_COUNT)[0, 0]))

    def recommend_many(self, histories: List[np.ndarray]) -> List[Recommendation]:
        return [self.recommend(h) for h in histories]

    def close(self) -> None:
        self.client.close()
