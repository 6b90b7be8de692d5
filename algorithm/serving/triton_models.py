"""Triton Python 模型背后的逻辑（model_repository/*/1/model.py 只做请求解析与响应封装）。

每个函数接受“一批请求”（每个请求是 {输入名: numpy 数组}），返回同样长度的结果列表，
每项是 {输出名: 数组} 或一个异常（只让这一个请求失败，其它请求照常返回）。无需服务器即可单测。
前/后处理只依赖 numpy（不导入 torch / onnx），生产容器保持轻量。
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from algorithm.interfaces import ContractError, EngineContract
from algorithm.models.catalog import load_catalog
from algorithm.serving.postprocess import Postprocessor
from algorithm.serving.preprocess import PreprocessError, Preprocessor, bucket_length

# 与 triton_config 中的名字一致（这里不导入 triton_config，以免前处理进程依赖 protobuf）
HISTORY_INPUT = "history_item_ids"
BEHAVIOR_INPUT = "history_behavior_types"

Result = Union[Dict[str, np.ndarray], Exception]


def parse_parameters(model_config: Union[str, Mapping]) -> Dict[str, str]:
    """config.pbtxt 的 parameters（Triton 以 JSON 传给 initialize）-> {键: 字符串}。"""
    cfg = json.loads(model_config) if isinstance(model_config, str) else model_config
    return {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}


def _ints(s: str) -> List[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def contract_from_params(p: Mapping[str, str]) -> EngineContract:
    return EngineContract(max_seq_length=int(p["max_seq_length"]), codebook_sizes=tuple(_ints(p["codebook_sizes"])),
                          num_token_types=int(p.get("num_token_types", 8)), top_k=int(p.get("top_k", 50)))


class PreprocessModel:
    def __init__(self, model_dir: str, params: Mapping[str, str]):
        contract = contract_from_params(params)
        catalog = load_catalog(os.path.join(model_dir, params.get("catalog", "catalog.npz")))
        self.pre = Preprocessor(catalog, contract, params.get("unknown_item_policy", "skip"),
                                int(params.get("max_history_items", 100_000)), _ints(params.get("seq_buckets", "")))
        self.unknown_total = 0

    def execute(self, requests: Sequence[Mapping[str, Optional[np.ndarray]]]) -> List[Result]:
        results: List[Result] = []
        for req in requests:
            try:
                items = req.get(HISTORY_INPUT)
                if items is None:
                    raise PreprocessError(f"缺少输入 {HISTORY_INPUT}")
                behaviors = req.get(BEHAVIOR_INPUT)
                if items.ndim != 2:
                    raise PreprocessError(f"{HISTORY_INPUT}: 应为 [batch, n]，得到形状 {list(items.shape)}")
                rows, unknown = [], []
                for i in range(items.shape[0]):
                    sem, types, _, n_unknown = self.pre.clean(
                        items[i], None if behaviors is None else behaviors[i], where=f"[{i}] ")
                    rows.append((sem, types))
                    unknown.append(n_unknown)
                out = self.pre.pack(rows)
                out["num_unknown_items"] = np.asarray(unknown, dtype=np.int64).reshape(-1, 1)
                self.unknown_total += sum(unknown)
                results.append(out)
            except (ContractError, ValueError, IndexError) as e:
                results.append(e)
        return results


class PostprocessModel:
    def __init__(self, model_dir: str, params: Mapping[str, str]):
        catalog = load_catalog(os.path.join(model_dir, params.get("catalog", "catalog.npz")))
        self.post = Postprocessor(catalog, int(params.get("top_k", 50)))

    def execute(self, requests: Sequence[Mapping[str, np.ndarray]]) -> List[Result]:
        results: List[Result] = []
        for req in requests:
            try:
                items, scores, sem = self.post(req["engine_recommendations"], req["engine_scores"])
                results.append({"item_ids": items, "scores": scores, "semantic_ids": sem})
            except (KeyError, ValueError) as e:
                results.append(e)
        return results


def merge_requests(feeds: Sequence[Mapping[str, np.ndarray]], contract: EngineContract,
                   seq_buckets: Sequence[int] = ()) -> Dict[str, np.ndarray]:
    """把若干（已校验的）请求右侧填充到同一长度（再向上取整到桶）并拼成一批。"""
    longest = max(f["encoder_mask"].shape[1] for f in feeds)
    length = bucket_length(longest, seq_buckets, contract.max_seq_length)
    total = sum(f["encoder_mask"].shape[0] for f in feeds)
    out = {s.name: np.zeros((total, length), dtype=s.dtype) for s in contract.inputs}
    row = 0
    for f in feeds:
        b, n = f["encoder_mask"].shape
        for name in contract.input_names:
            out[name][row:row + b, :n] = f[name]
        row += b
    return out


class EngineModel:
    """引擎运行器：逐个请求按契约校验（越界 id 到不了设备），合并成一批，跑引擎，再按请求拆回。"""

    def __init__(self, model_dir: str, params: Mapping[str, str], device_id: int = 0):
        from algorithm.serving.engines import load_runner

        self.contract = contract_from_params(params)
        self.seq_buckets = _ints(params.get("seq_buckets", ""))
        self.runner = load_runner(
            params.get("engine_kind", "onnxruntime"), os.path.join(model_dir, params.get("engine_file", "model.onnx")),
            self.contract, device=params.get("device", "cpu"), device_id=device_id, params=params)

    def execute(self, requests: Sequence[Mapping[str, np.ndarray]]) -> List[Result]:
        results: List[Result] = [ContractError("内部错误：请求未处理")] * len(requests)
        good: List[Mapping[str, np.ndarray]] = []
        good_idx: List[int] = []
        for i, req in enumerate(requests):
            try:
                self.contract.validate_inputs(req)
                good.append(req)
                good_idx.append(i)
            except ContractError as e:
                results[i] = e
        # 按长度分组再合批：一个长历史不会把整批短历史都填充到它的长度
        groups: Dict[int, List[int]] = {}
        for j, req in enumerate(good):
            groups.setdefault(self._length_class(req["encoder_mask"].shape[1]), []).append(j)
        for members in groups.values():
            batch = merge_requests([good[j] for j in members], self.contract, self.seq_buckets)
            try:
                rec, scores = self.runner.run(batch)
            except Exception as e:  # 引擎失败：这一组的请求都得到错误，服务继续
                for j in members:
                    results[good_idx[j]] = RuntimeError(f"引擎执行失败：{type(e).__name__}: {e}")
                continue
            row = 0
            for j in members:
                b = good[j]["encoder_mask"].shape[0]
                results[good_idx[j]] = {"recommendations": rec[row:row + b], "scores": scores[row:row + b]}
                row += b
        return results

    def _length_class(self, length: int) -> int:
        """长度所属的组：有桶时为桶，否则按 2 的幂分级（16, 32, 64, ...）。"""
        if self.seq_buckets:
            return bucket_length(length, self.seq_buckets, self.contract.max_seq_length)
        return max(16, 1 << (int(length) - 1).bit_length())
