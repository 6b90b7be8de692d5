"""TensorRT 10+ 引擎构建：build_trt_engine(onnx_path, engine_path, config)（用户的名字）。

- 优化 profile：六个输入都设 min/opt/max（由契约与配置推出）；按长度分成几段（engine.trt_seq_splits，或规划的长度桶），
  每段一个 profile，内核按该段的 opt 调优；Triton 的 TensorRT 后端对每批选能容纳其形状的 profile。
- 精度：fp16；int8 用熵校准器（采样的历史，形状固定为校准 profile 的 opt），校准缓存复用；
  engine.fp32_layers=true 时 softmax / 归一化 / TopK / 归约与打分路径的层钉在 fp32。
- 时序缓存（timing cache）放在引擎目录，重复构建更快。
- ONNX 解析错误逐条写进异常。

本模块导入时不需要 TensorRT；真正构建时没有 TensorRT 会抛 MissingDependencyError，说明去哪里获得。
不需要 TensorRT 的部分（profile、校准批、层的选择、缓存读写）都有单元测试。
本项目的机器上没有 TensorRT（它的库不在可达的包源上），这里的构建从未在本项目里实际运行过。
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from algorithm.serving.config import ExportConfig, ServingConfig
from algorithm.errors import ConfigError, MissingDependencyError, UGTServingError
from algorithm.serving.runtime.engines.base import EngineRunner

log = logging.getLogger(__name__)
Shape = Tuple[int, int]

TRT_HELP = ("需要 TensorRT 10 或更新版本（Python 包 tensorrt 与 libnvinfer）以及 NVIDIA GPU。最简单的是在 NVIDIA 的 "
            "Triton 容器里运行（nvcr.io/nvidia/tritonserver:25.07-py3 或更新，自带 TensorRT），或在有 GPU 的机器上 "
            "pip install tensorrt-cu12。没有 TensorRT 时可用 engine=torch（GPU）或 engine=onnxruntime（CPU）。")

# 在 fp32 里计算的层：决定排序的 softmax / TopK、数值敏感的归一化与归约
FP32_LAYER_TYPES = ("SOFTMAX", "NORMALIZATION", "TOPK", "REDUCE")
# 名字里含这些的层属于打分路径（log-softmax、beam 分数累加）或 LayerNorm 分解出的算子
FP32_NAME_HINTS = ("softmax", "score", "layernorm", "layer_norm", "log")


class TensorRTBuildError(UGTServingError, RuntimeError):
    """TensorRT 解析或构建失败；消息里带解析器 / 构建器的全部错误。"""


def _trt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise MissingDependencyError("engine=tensorrt：找不到 TensorRT。" + TRT_HELP) from e
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise MissingDependencyError(f"需要 TensorRT >= 10，当前 {trt.__version__}。" + TRT_HELP)
    return trt


# ---------------------------------------------------------------- 优化 profile（无需 TensorRT）

@dataclass(frozen=True)
class Profile:
    """一个优化 profile：所有六个输入共用的 (batch, seq_len) 的 min / opt / max。"""

    min: Shape
    opt: Shape
    max: Shape

    def contains(self, batch: int, seq_len: int) -> bool:
        return self.min[0] <= batch <= self.max[0] and self.min[1] <= seq_len <= self.max[1]

    def shapes(self, input_names: Sequence[str]) -> Dict[str, Tuple[Shape, Shape, Shape]]:
        return {n: (self.min, self.opt, self.max) for n in input_names}


def _as_serving(config) -> ServingConfig:
    if isinstance(config, ServingConfig):
        return config
    if isinstance(config, ExportConfig):
        return ServingConfig(export=config)
    raise ConfigError(f"build_trt_engine 的 config 应为 ServingConfig 或 ExportConfig，得到 {type(config).__name__}")


def trt_profiles(config) -> List[Profile]:
    """按 engine.trt_seq_splits 把 [1, max_seq_length] 切成几段，每段一个 profile（>= max_seq_length 的切点忽略）。

    batch 总是 [1, max_batch_size]，opt 取 engine.opt_batch_size（不超过 max_batch_size）；第一段的 opt 长度取 engine.opt_seq_length
    （截到段内），后面各段取段内最小的长度桶（长尾分布里段内最常见的是短的一端）。

    engine.seq_bucket_plan = N 时 profile 由同一个规划得出，trt_seq_splits 不用：规划的每个长度桶一个 profile，
    覆盖 (上一个桶, 这个桶]，opt 长度就是桶长——TensorRT 托管时前处理把每条历史补到它的桶（pad_in_preprocess），
    引擎只见到桶长，所以每个 profile 按它真正会见到的长度调优。代价：N 个 profile，构建时间与引擎文件约随 N 增长。
    """
    cfg = _as_serving(config)
    e, x = cfg.engine, cfg.export
    max_b, max_l = x.max_batch_size, x.max_seq_length
    buckets = cfg.seq_buckets()
    from_plan = bool(e.seq_bucket_plan)
    if from_plan:
        splits = [b for b in buckets if b < max_l]
    else:
        splits = sorted(s for s in set(e.trt_seq_splits) if 1 <= s < max_l)  # 不小于 max_seq_length 的切点无意义，忽略
    opt_b = min(e.opt_batch_size, max_b)
    edges = [0, *splits, max_l]
    out = []
    for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
        lo += 1
        if from_plan:
            opt_l = hi
        elif i == 0:
            opt_l = min(max(e.opt_seq_length, lo), hi)
        else:
            opt_l = next((b for b in buckets if lo <= b <= hi), hi)
        out.append(Profile((1, lo), (opt_b, opt_l), (max_b, hi)))
    return out


def covering_profile(profiles: Sequence[Profile], batch: int, seq_len: int) -> int:
    """能容纳 (batch, seq_len) 的第一个 profile 的下标；没有就报错（说明越界的维度）。"""
    for i, p in enumerate(profiles):
        if p.contains(batch, seq_len):
            return i
    raise ConfigError(f"形状 ({batch}, {seq_len}) 不在任何 TensorRT profile 内：{profiles}")


# ---------------------------------------------------------------- 精度（无需 TensorRT）

def keep_in_fp32(layer_type: str, layer_name: str) -> bool:
    """engine.fp32_layers=true 时这层是否钉在 fp32：类型属于 FP32_LAYER_TYPES，或名字属于打分路径。"""
    t = layer_type.rsplit(".", 1)[-1].upper()
    if t in FP32_LAYER_TYPES:
        return True
    name = layer_name.lower()
    return any(h in name for h in FP32_NAME_HINTS)


# ---------------------------------------------------------------- int8 校准（逻辑部分无需 TensorRT）

def calibration_profile(config, profiles: Optional[Sequence[Profile]] = None) -> int:
    """int8 校准用的 profile：包含 engine.opt_seq_length 的那个（按长度切分时是第一个；按规划的桶时第一个只覆盖最短的历史，
    只用它校准的尺度对长历史不具代表性）。profiles：已算好的 trt_profiles(config)（规划桶时每次都要重新规划）。"""
    cfg = _as_serving(config)
    profiles = profiles if profiles is not None else trt_profiles(cfg)
    length = min(max(cfg.engine.opt_seq_length, 1), cfg.export.max_seq_length)
    return covering_profile(profiles, 1, length)


def calibration_batches(config, catalog, num_batches: Optional[int] = None, seed: int = 777
                        ) -> Iterator[Dict[str, np.ndarray]]:
    """校准数据：采样历史，形状恰为校准 profile（calibration_profile）的 opt —— 动态形状下 TensorRT 用 opt 形状校准。"""
    from algorithm.serving.gates import sample_feeds

    cfg = _as_serving(config)
    profiles = trt_profiles(cfg)
    p = profiles[calibration_profile(cfg, profiles)]
    b, length = p.opt
    n = num_batches or cfg.engine.calibration_batches
    yield from sample_feeds(cfg, catalog, n * b, seed=seed, batch=b, max_len=length, pad_to=length)


class CalibratorLogic:
    """熵校准器与 TensorRT 无关的部分：按输入名交出下一批的设备指针，读写校准缓存。

    device_put(np.ndarray) -> (持有者, 设备指针)；持有者要保存到下一批，否则显存被回收。
    """

    def __init__(self, batches: Iterable[Dict[str, np.ndarray]], cache_path: str,
                 device_put: Callable[[np.ndarray], Tuple[Any, int]]):
        self._it = iter(batches)
        self.cache_path = cache_path
        self._put = device_put
        self._held: List[Any] = []
        self.batches_served = 0

    def get_batch_size(self) -> int:
        return 1  # 显式 batch 的网络：batch 维已在张量形状里，TensorRT 要求这里返回 1

    def get_batch(self, names: Sequence[str]) -> Optional[List[int]]:
        feeds = next(self._it, None)
        if feeds is None:
            return None
        missing = [n for n in names if n not in feeds]
        if missing:
            raise TensorRTBuildError(f"校准批缺少输入 {missing}")
        held, ptrs = [], []
        for n in names:
            h, ptr = self._put(np.ascontiguousarray(feeds[n]))
            held.append(h)
            ptrs.append(int(ptr))
        self._held = held
        self.batches_served += 1
        return ptrs

    def read_calibration_cache(self) -> Optional[bytes]:
        if self.cache_path and os.path.isfile(self.cache_path):
            with open(self.cache_path, "rb") as f:
                return f.read()
        return None

    def write_calibration_cache(self, cache) -> None:
        if self.cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.cache_path)), exist_ok=True)
            with open(self.cache_path, "wb") as f:
                f.write(bytes(cache))


def _torch_device_put(arr: np.ndarray):
    import torch

    t = torch.from_numpy(arr).cuda()
    return t, t.data_ptr()


def make_entropy_calibrator(trt, batches, cache_path: str):
    """TensorRT 的 IInt8EntropyCalibrator2 + CalibratorLogic；显存由 PyTorch 分配。"""
    try:
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("int8 校准需要 GPU（torch.cuda.is_available() 为 False）")
    except ImportError as e:
        raise MissingDependencyError("int8 校准用 PyTorch 分配显存：请安装带 CUDA 的 torch") from e

    class EntropyCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.logic = CalibratorLogic(batches, cache_path, _torch_device_put)

        def get_batch_size(self):
            return self.logic.get_batch_size()

        def get_batch(self, names):
            return self.logic.get_batch(names)

        def read_calibration_cache(self):
            return self.logic.read_calibration_cache()

        def write_calibration_cache(self, cache):
            self.logic.write_calibration_cache(cache)

    return EntropyCalibrator()


# ---------------------------------------------------------------- 构建

def parser_errors(parser) -> List[str]:
    """OnnxParser 的全部错误，一条一行（节点名、算子、描述）。"""
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        node = getattr(e, "node_name", lambda: "")() if callable(getattr(e, "node_name", None)) else ""
        op = getattr(e, "node_operator", lambda: "")() if callable(getattr(e, "node_operator", None)) else ""
        where = f"[{node or '?'} / {op or '?'}] " if (node or op) else ""
        out.append(where + (e.desc() if callable(getattr(e, "desc", None)) else str(e)))
    return out


class _RecordingLogger:
    """把 TensorRT 的错误记下来，构建失败时放进异常。"""

    def __init__(self, trt):
        class L(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.errors: List[str] = []

            def log(self, severity, msg):
                if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                    self.errors.append(msg)
                    log.error("TensorRT: %s", msg)
                elif severity == trt.ILogger.Severity.WARNING:
                    log.warning("TensorRT: %s", msg)

        self.logger = L()


def _pin_fp32(trt, network) -> int:
    n = 0
    float_types = (trt.float32, trt.float16)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if keep_in_fp32(str(layer.type), layer.name):
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                if layer.get_output(j).dtype in float_types:
                    layer.set_output_type(j, trt.float32)
            n += 1
    return n


def build_trt_engine(onnx_path: str, engine_path: str, config, catalog=None) -> str:
    """ONNX -> TensorRT 计划文件（engine_path），并在旁边写 <engine_path>.report.json。

    config：ServingConfig（或用户的 ExportConfig）。int8 需要 catalog（校准用的采样历史）；
    校准缓存 <engine 目录>/<名字>.calib，时序缓存 <engine 目录>/trt_timing.cache。
    """
    cfg = _as_serving(config)
    precision = cfg.export.precision
    profiles = trt_profiles(cfg)  # 先校验配置，再要求 TensorRT
    if precision == "int8" and catalog is None:
        raise ConfigError("export.precision=int8 需要 catalog（用采样的历史校准）")
    if not os.path.isfile(onnx_path):
        raise ConfigError(f"ONNX 文件不存在：{onnx_path}（先运行导出）")
    trt = _trt()
    t0 = time.time()
    rec = _RecordingLogger(trt)
    builder = trt.Builder(rec.logger)
    network = builder.create_network(0)  # TensorRT 10：总是显式 batch
    parser = trt.OnnxParser(network, rec.logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):  # 按路径解析：> 2 GB 的外部数据也能找到
        raise TensorRTBuildError(f"TensorRT 无法解析 {onnx_path}：\n" + "\n".join(parser_errors(parser)))
    names = [network.get_input(i).name for i in range(network.num_inputs)]
    contract = cfg.model.contract()
    if sorted(names) != sorted(contract.input_names):
        raise TensorRTBuildError(f"ONNX 的输入 {names} 与契约 {list(contract.input_names)} 不一致")

    bc = builder.create_builder_config()
    bc.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(cfg.engine.workspace_gb * (1 << 30)))
    engine_dir = os.path.dirname(os.path.abspath(engine_path))
    os.makedirs(engine_dir, exist_ok=True)
    timing_path = os.path.join(engine_dir, "trt_timing.cache")
    timing = bc.create_timing_cache(open(timing_path, "rb").read() if os.path.isfile(timing_path) else b"")
    bc.set_timing_cache(timing, ignore_mismatch=False)
    trt_profiles_ = []
    for p in profiles:
        op = builder.create_optimization_profile()
        for name, (lo, opt, hi) in p.shapes(names).items():
            op.set_shape(name, lo, opt, hi)
        bc.add_optimization_profile(op)
        trt_profiles_.append(op)
    pinned = 0
    calib_cache = ""
    if precision in ("fp16", "int8"):
        bc.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        bc.set_flag(trt.BuilderFlag.INT8)
        calib_cache = os.path.splitext(os.path.abspath(engine_path))[0] + ".calib"
        bc.int8_calibrator = make_entropy_calibrator(trt, calibration_batches(cfg, catalog), calib_cache)
        bc.set_calibration_profile(trt_profiles_[calibration_profile(cfg, profiles)])  # 与 calibration_batches 同一个 profile 的 opt 形状
    if precision != "fp32" and cfg.engine.fp32_layers:
        pinned = _pin_fp32(trt, network)
        bc.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    log.info("TensorRT %s：构建 %s（%d 个 profile，%d 层钉在 fp32）", trt.__version__, precision, len(profiles), pinned)
    plan = builder.build_serialized_network(network, bc)
    if plan is None:
        raise TensorRTBuildError("TensorRT 构建失败：\n" + "\n".join(rec.logger.errors or ["（无错误信息）"]))
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(plan)
    os.replace(tmp, engine_path)
    with open(timing_path, "wb") as f:
        f.write(bc.get_timing_cache().serialize())
    report = {"tensorrt": trt.__version__, "precision": precision, "onnx": os.path.abspath(onnx_path),
              "profiles": [{"min": p.min, "opt": p.opt, "max": p.max} for p in profiles],
              "fp32_layers": pinned, "timing_cache": timing_path, "calibration_cache": calib_cache or None,
              "seconds": time.time() - t0, "bytes": os.path.getsize(engine_path)}
    with open(engine_path + ".report.json", "w") as f:
        json.dump(report, f, indent=2, ensure_ascii=False)
    return engine_path


class TensorRTRunner(EngineRunner):
    """在本进程里运行计划文件（用于构建时的精度门禁；服务时由 Triton 的 tensorrt_plan 平台原生托管）。

    每批按形状选一个 profile（covering_profile），输入输出用 PyTorch 的 CUDA 张量；同步运行。
    """

    def __init__(self, plan_path: str, contract, profiles: Sequence[Profile]):
        trt = _trt()
        import torch

        if not torch.cuda.is_available():
            raise MissingDependencyError("运行 TensorRT 引擎需要 GPU")
        self.trt, self.torch, self.contract, self.profiles = trt, torch, contract, list(profiles)
        self.logger = _RecordingLogger(trt).logger
        with open(plan_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise TensorRTBuildError(f"无法反序列化 {plan_path}：\n" + "\n".join(self.logger.errors))
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self._profile = -1

    def run(self, feeds):
        torch = self.torch
        b, length = feeds["encoder_mask"].shape
        k = covering_profile(self.profiles, b, length)
        with torch.cuda.stream(self.stream):
            if k != self._profile:
                self.context.set_optimization_profile_async(k, self.stream.cuda_stream)
                self._profile = k
            keep = []
            for name in self.contract.input_names:
                t = torch.from_numpy(np.ascontiguousarray(feeds[name])).cuda()
                self.context.set_input_shape(name, tuple(t.shape))
                self.context.set_tensor_address(name, t.data_ptr())
                keep.append(t)
            outs = {}
            for spec in self.contract.outputs:
                shape = (b, *spec.dims_without_batch)
                dtype = getattr(torch, str(spec.dtype))
                outs[spec.name] = torch.empty(shape, dtype=dtype, device="cuda")
                self.context.set_tensor_address(spec.name, outs[spec.name].data_ptr())
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise TensorRTBuildError("TensorRT 执行失败：" + "; ".join(self.logger.errors[-5:]))
        self.stream.synchronize()
        rec, scores = (outs[n] for n in self.contract.output_names)
        return rec.cpu().numpy().astype(np.int64), scores.float().cpu().numpy()

    def compute(self, staged):
        t0 = time.perf_counter()
        outs = [self.run(s.feeds) for s in staged]
        return outs, {"device_ms": (time.perf_counter() - t0) * 1e3, "copy_back_ms": 0.0}


__all__ = ["TensorRTRunner", "build_trt_engine", "trt_profiles", "covering_profile", "calibration_profile", "calibration_batches", "CalibratorLogic",
           "keep_in_fp32", "parser_errors", "Profile", "TensorRTBuildError"]
