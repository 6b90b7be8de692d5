"""Triton Python 模型背后的逻辑（model_repository/*/1/model.py 只做请求解析与响应封装）。

每个 execute 接受“一次 execute 的全部请求”（每个请求是 {输入名: numpy 数组}），返回同样长度的结果列表，
每项是 {输出名: 数组} 或一个异常（只让这一个请求失败，其它请求照常返回）。无需服务器即可单测。
三个模型都按整个请求列表向量化（一次查目录、一次校验、每个输入一次拷贝），不逐请求做能批量做的事。
前/后处理只依赖 numpy（不导入 torch / onnx），生产容器保持轻量。
"""
from __future__ import annotations

import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from algorithm.errors import EngineOutputError, InternalError, OverloadError
from algorithm.interfaces import (ITEM_IDS_OUTPUT, POST_IN_REC, POST_IN_SCORES, SCORES_OUTPUT, SEMANTIC_IDS_OUTPUT,
                                  UNKNOWN_COUNT_OUTPUT, ContractError)
from algorithm.models.catalog import load_catalog
from algorithm.serving.config import ServingConfig
from algorithm.serving.runtime import batching, packed, rowpack, shedding
from algorithm.serving.runtime.engines.base import EngineRunner
from algorithm.serving.runtime.params import RuntimeSpec
from algorithm.serving.runtime.postprocess import Postprocessor
from algorithm.serving.runtime.preprocess import Preprocessor

Result = Union[Dict[str, np.ndarray], Exception]


class PreprocessModel:
    def __init__(self, model_dir: str, config: ServingConfig, spec: RuntimeSpec, shed: bool = False):
        """shed：做过载丢弃（runtime/shedding.py；Triton 里的 model.py 传 True，进程内没有服务器的队列）。"""
        catalog = load_catalog(os.path.join(model_dir, spec.catalog_file))
        self.contract = config.contract()
        self.pre = Preprocessor(catalog, self.contract, config.catalog.unknown_item_policy,
                                config.triton.max_history_items,
                                spec.seq_buckets if spec.pad_in_preprocess else ())
        self.pack_inputs = spec.pack_inputs
        # 过载丢弃要打包输入里的时刻列（runtime/shedding.py）
        self.admission = (shedding.Admission(shedding.state_path(model_dir), config.export.target_latency_ms,
                                             shedding.queue_depth(config))
                          if shed and spec.pack_inputs and config.triton.load_shedding else None)

    def execute(self, requests: Sequence[Mapping[str, Optional[np.ndarray]]]) -> List[Result]:
        if self.admission is not None:
            refused = self.admission.check(len(requests))
            if refused is not None:  # 过载：不编码，整次 execute 的请求都拒绝
                return [refused] * len(requests)
        results = self.pre.encode_requests(requests)
        if self.pack_inputs:  # 引擎的 6 个输入拼成 1 个张量再交出（runtime/packed.py）
            stamp = shedding.now_us() if self.admission is not None else None
            results = [r if isinstance(r, Exception) else
                       {packed.PACKED_INPUT: packed.pack(r, self.contract, stamp),
                        UNKNOWN_COUNT_OUTPUT: r[UNKNOWN_COUNT_OUTPUT]}
                       for r in results]
        return results


class PostprocessModel:
    def __init__(self, model_dir: str, config: ServingConfig, spec: RuntimeSpec):
        catalog = load_catalog(os.path.join(model_dir, spec.catalog_file))
        self.post = Postprocessor(catalog, config.model.top_k)

    def execute(self, requests: Sequence[Mapping[str, np.ndarray]]) -> List[Result]:
        """所有请求的引擎输出拼成一批，后处理一次，再按行拆回。形状不符的请求单独失败。"""
        results: List[Result] = [None] * len(requests)  # type: ignore[list-item]
        good, recs, scores = [], [], []
        for i, req in enumerate(requests):
            rec, sc = req.get(POST_IN_REC), req.get(POST_IN_SCORES)
            if rec is None or sc is None or rec.ndim != 3 or rec.shape[-1] != 3 or sc.shape != rec.shape[:2]:
                results[i] = EngineOutputError(f"引擎输出形状不符：{POST_IN_REC} "
                                        f"{None if rec is None else list(rec.shape)}，{POST_IN_SCORES} "
                                        f"{None if sc is None else list(sc.shape)}")
                continue
            good.append(i)
            recs.append(rec)
            scores.append(sc)
        if not good:
            return results
        items, sc, sem = self.post(np.concatenate(recs), np.concatenate(scores))
        row = 0
        for i, rec in zip(good, recs):
            b = rec.shape[0]
            results[i] = {ITEM_IDS_OUTPUT: items[row:row + b], SCORES_OUTPUT: sc[row:row + b],
                          SEMANTIC_IDS_OUTPUT: sem[row:row + b]}
            row += b
        return results


class ExecuteStats:
    """引擎一次 execute 的计时（毫秒）与形状；累计值导出为 Triton 自定义指标（runtime/glue.py）。"""

    # gpu_gap_ms：这一批开始前这个实例的 GPU 空了多久（上一批的结束到这一批的开始，CUDA 事件；torch 运行器在 GPU 上才有）
    FIELDS = ("executes", "requests", "rows", "groups", "padded_tokens", "valid_tokens", "host_ms", "device_ms",
              "copy_back_ms", "respond_ms", "execute_ms", "gpu_gap_ms")

    def __init__(self):
        self.totals = {f: 0.0 for f in self.FIELDS}
        self.last: Dict[str, float] = {}

    def add(self, d: Dict[str, float]) -> None:
        self.last = d
        for k in self.FIELDS:
            self.totals[k] += d.get(k, 0.0)


class EngineModel:
    """引擎运行器：整批校验（越界 id 到不了设备）、按长度分组、写进暂存区、各组背靠背运行、按请求拆回。"""

    def __init__(self, model_dir: str, config: ServingConfig, spec: RuntimeSpec, device_id: int = 0,
                 runner: Optional[EngineRunner] = None, lanes: int = 1, instance: str = "engine", shed: bool = False):
        from algorithm.serving.runtime.engines import load_runner

        self.contract = config.contract()
        self.spec = spec
        self.seq_buckets = tuple(spec.seq_buckets)
        self.runner = runner or load_runner(os.path.join(model_dir, spec.engine_file), self.contract, spec, device_id,
                                            lanes=lanes)
        self.stats = ExecuteStats()
        self.load = (shedding.EngineLoad(shedding.state_path(model_dir), config.export.target_latency_ms,
                                         shedding.queue_depth(config), instance)
                     if shed and spec.pack_inputs and config.triton.load_shedding else None)

    def _unpack(self, requests: Sequence[Mapping[str, np.ndarray]], results: List[Result]) -> list:
        """打包的请求拆回 6 个输入；拆不开的请求（形状不对、缺输入）只让它自己失败：结果里记下错误，返回值里是 None
        （execute 只把拆开的交给 collect，再把批里的下标映射回原来的请求）。"""
        out = []
        stamps: List[Optional[int]] = []
        for i, req in enumerate(requests):
            x = req.get(packed.PACKED_INPUT)
            try:
                if x is None:
                    raise ContractError(f"缺少输入 {packed.PACKED_INPUT}；请求中的输入：{sorted(req) or '无'}")
                out.append(packed.unpack(x, self.contract))
                stamps.append(packed.stamp(x, self.contract))
            except ContractError as e:
                results[i] = e
                out.append(None)
                stamps.append(None)
        self._shed(out, stamps, results)
        return out

    def _shed(self, unpacked: list, stamps: List[Optional[int]], results: List[Result]) -> None:
        """量出各请求在引擎前等了多久（前处理写下的时刻）；等待超过上限的 ENGINE_FACTOR 倍的请求拒绝（UNAVAILABLE）。
        时刻不可信（不在最近一分钟内：直接发给引擎、伪造的列）的请求当作没有时刻，不参与量等待。"""
        if self.load is None:
            return
        waits = self.load.waits_ms(stamps)
        valid = np.asarray([s is not None for s in stamps]) & (waits >= -1.0) & (waits < 60_000.0)
        if not valid.any():
            return
        self.load.record_wait(max(float(waits[valid].max()), 0.0))  # 马上发布：前处理在这批做完之前就能看到
        late, limit = self.load.too_late(np.where(valid, waits, 0.0))
        for i in np.nonzero(late)[0]:
            if unpacked[i] is not None:
                unpacked[i] = None
                results[i] = OverloadError(f"过载：在引擎前排队 {waits[i]:.0f} ms，超过上限 {limit:.0f} ms 的 "
                                           f"{shedding.ENGINE_FACTOR:g} 倍；请稍后重试")
                self.load.shed += 1

    def execute(self, requests: Sequence[Mapping[str, np.ndarray]]) -> List[Result]:
        """校验、暂存、启动并等结果：submit + complete。"""
        return self.complete(self.submit(requests))

    def submit(self, requests: Sequence[Mapping[str, np.ndarray]]) -> "_Ticket":
        """前一半：整批校验、分组（或拼行）、写暂存区、启动，不等 GPU。流水线（triton.engine_pipeline_depth，
        runtime/glue.Pipeline）在这批还在 GPU 上时就返回去接下一批；同步的运行器（EngineRunner.launch 的默认）在这里就算完。"""
        t0 = time.perf_counter()
        results: List[Result] = [None] * len(requests)  # type: ignore[list-item]
        if self.spec.pack_inputs:
            unpacked = self._unpack(requests, results)
            keep = [i for i, r in enumerate(unpacked) if r is not None]
            batch, errors = batching.collect([unpacked[i] for i in keep], self.contract)
            errors = {keep[j]: e for j, e in errors.items()}
            if batch is not None:
                batch.index = np.asarray([keep[int(j)] for j in batch.index], dtype=np.int64)
        else:
            batch, errors = batching.collect(requests, self.contract)
        for i, e in errors.items():
            results[i] = e
        t = _Ticket(results, t0)
        if batch is None:
            return t
        if self.runner.packs_rows:  # 拼行的 torch 程序（engine.pack_rows）：全部历史一组、一次启动
            p, st = self.runner.stage_packed(batch)
            staged, padded = [st], p.rows * p.width
            splits = [rowpack.split(batch, p)]
        else:
            cost = self.runner.cost if self.spec.plan_groups else None
            groups = batching.plan_groups(batch, self.seq_buckets, self.contract.max_seq_length, cost)
            staged = []
            for g in groups:  # 两组落到同一张图（不应发生）由运行器的 launch 拒绝
                st = self.runner.staging(g.rows, g.length)
                batching.fill(batch, g, st.feeds)
                staged.append(st)
            padded = sum(s.shape[0] * s.shape[1] for s in staged)
            splits = [batching.split_rows(batch, g) for g in groups]
        t.t_launch = time.perf_counter()
        t.runner = self.runner
        try:
            t.pending = self.runner.launch(staged)
        except Exception as e:  # 引擎失败：这些请求都得到错误，服务继续
            t.fail(batch, e)
            return t
        t.batch, t.splits, t.groups, t.padded = batch, splits, len(staged), padded
        return t

    def complete(self, t: "_Ticket") -> List[Result]:
        """后一半：等这批做完（只等它），按请求拆回结果，记一次 execute 的计时。"""
        if t.batch is None:
            return t.results
        batch = t.batch
        try:
            outs, timing = t.runner.finish(t.pending)
        except Exception as e:
            t.fail(batch, e)
            return t.results
        t_run = time.perf_counter()
        results = t.results
        for (rec, scores), rows in zip(outs, t.splits):
            for i, start, n in rows:
                results[i] = {"recommendations": rec[start:start + n], "scores": scores[start:start + n]}
        t_end = time.perf_counter()
        if self.load is not None:
            self.load.record_rate(len(batch.index), (t_end - t.t0) * 1e3)
        # 流水线时 execute_ms 是从 submit 开始到这里的墙钟时间（含排在前一批之后等 GPU 的时间）
        self.stats.add({"executes": 1, "requests": len(batch.index), "rows": batch.total_rows,
                        "groups": t.groups, "padded_tokens": t.padded,
                        "valid_tokens": float(batch.flat["encoder_mask"].sum()),
                        "host_ms": (t.t_launch - t.t0) * 1e3, "device_ms": timing.get("device_ms", 0.0),
                        "copy_back_ms": timing.get("copy_back_ms", 0.0), "respond_ms": (t_end - t_run) * 1e3,
                        "execute_ms": (t_end - t.t0) * 1e3, "gpu_gap_ms": timing.get("gap_ms", 0.0)})
        return results


class _Ticket:
    """submit 交给 complete 的一批：各请求的结果（校验错误已填好）、批、拆分方式、启动后的待取结果。batch 为 None =
    没有要等的（全部校验失败或引擎已失败）。"""

    def __init__(self, results: List[Result], t0: float):
        self.results, self.t0 = results, t0
        self.batch = None
        self.splits: list = []
        self.pending = None
        self.runner = None  # 启动这批的运行器：由它取回（runner 是可换的属性，测试换成计时的替身）
        self.groups = self.padded = 0
        self.t_launch = t0

    def fail(self, batch, e: Exception) -> None:
        err = RuntimeError(f"引擎执行失败：{type(e).__name__}: {e}")
        for i in batch.index:
            self.results[int(i)] = err
        self.batch = None


def serving_error_code(exc: Exception) -> str:
    """错误归类：过载 -> UNAVAILABLE（HTTP 503，可重试）；用户的输入错误 -> INVALID_ARG（HTTP 400）；
    其余（引擎故障、内部错误）-> INTERNAL。"""
    if isinstance(exc, OverloadError):
        return "UNAVAILABLE"
    if isinstance(exc, InternalError):
        return "INTERNAL"
    if isinstance(exc, (ContractError, ValueError)):
        return "INVALID_ARG"
    return "INTERNAL"
