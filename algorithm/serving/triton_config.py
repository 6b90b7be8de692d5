"""Triton 配置生成：每个 config.pbtxt 都经 Triton 自己的 ModelConfig protobuf 作为数据构建，
再由 protobuf 的 text_format 写出（不用字符串模板）。

仓库里的四个模型（名字都以 export.model_name 为前缀，默认 ugt_recommend）：
  <name>               ensemble：原始历史 -> top-k 物品
  ugt_preprocess       python backend（CPU）
  ugt_engine           内嵌服务器：python backend 运行器（onnxruntime / torch）；
                       NVIDIA 容器：tensorrt_plan 或 onnxruntime_onnx 原生平台
  ugt_postprocess      python backend（CPU）
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

from algorithm.interfaces import EngineContract, TensorSpec
from algorithm.serving.config import ServingConfig
from algorithm.serving.errors import ConfigError, MissingDependencyError

PREPROCESS = "ugt_preprocess"
ENGINE = "ugt_engine"
POSTPROCESS = "ugt_postprocess"
# 前处理额外输出：跳过的未知物品数
UNKNOWN_COUNT = "num_unknown_items"
# 原始历史输入（ensemble 与前处理）
from algorithm.serving.triton_models import BEHAVIOR_INPUT, HISTORY_INPUT  # noqa: E402
# 后处理的输入名（与引擎输出区分，避免与其输出 scores 同名）
POST_IN_REC = "engine_recommendations"
POST_IN_SCORES = "engine_scores"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")


def pb():
    """Triton 的 model_config_pb2（随 tritonclient 发布）。"""
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise MissingDependencyError("需要 tritonclient：pip install 'tritonclient[grpc]'") from e
    return model_config_pb2


def validate_model_name(name: str) -> str:
    """模型名只允许字母、数字、'_'、'-'（不能含路径分隔符或 '..'），用作目录名是安全的。"""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(f"模型名 {name!r} 不合法：只能含字母、数字、'_'、'-'，以字母或数字开头，最长 128")
    return name


def detect_gpus() -> List[int]:
    """本机可见的 GPU 编号（NVML；没有驱动或没有 GPU 时为空）。"""
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        try:
            return list(range(pynvml.nvmlDeviceGetCount()))
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return []


@dataclass(frozen=True)
class EngineHosting:
    """引擎的托管方式（由 engine.kind 与是否内嵌决定）。"""

    platform: str  # "" = python backend 运行器
    filename: str  # 版本目录中的引擎文件

    @property
    def python_runner(self) -> bool:
        return not self.platform


def engine_hosting(config: ServingConfig) -> EngineHosting:
    kind, native = config.engine.kind, config.engine.native
    if kind == "tensorrt":
        return EngineHosting("tensorrt_plan", "model.plan")
    if kind == "onnxruntime":
        return EngineHosting("onnxruntime_onnx", "model.onnx") if native else EngineHosting("", "model.onnx")
    return EngineHosting("", "model.pt2")


# ---------------- 小步骤：每步设置 ModelConfig 的一部分 ----------------

def _dtype(spec_or_name) -> int:
    name = spec_or_name.triton_dtype if isinstance(spec_or_name, TensorSpec) else spec_or_name
    return pb().DataType.Value(name)


def _add_input(mc, name: str, dtype: str, dims: Sequence[int], optional: bool = False, ragged: bool = False) -> None:
    i = mc.input.add()
    i.name, i.data_type = name, _dtype(dtype)
    i.dims.extend(dims)
    i.optional = optional
    i.allow_ragged_batch = ragged


def _add_output(mc, name: str, dtype: str, dims: Sequence[int]) -> None:
    o = mc.output.add()
    o.name, o.data_type = name, _dtype(dtype)
    o.dims.extend(dims)


def _set_batching(mc, config: ServingConfig, engine: bool = True) -> None:
    """动态批处理 + 队列策略：超过 max_queue_size 立即拒绝，排队超过 queue_timeout_us 拒绝。

    只有引擎按 preferred_batch_sizes / max_queue_delay_us 攒批；前/后处理是逐请求的 CPU 工作，
    等待只增加延迟，所以它们不等（delay 0：执行时队列里有几个就一起处理几个）。"""
    t = config.triton
    db = mc.dynamic_batching
    if engine:
        db.preferred_batch_size.extend(sorted(t.preferred_batch_sizes))
        db.max_queue_delay_microseconds = t.max_queue_delay_us
    qp = db.default_queue_policy
    qp.timeout_action = pb().ModelQueuePolicy.REJECT
    qp.default_timeout_microseconds = t.queue_timeout_us
    qp.allow_timeout_override = True
    qp.max_queue_size = t.max_queue_size


def _set_instance_group(mc, count: int, kind: str, gpus: Sequence[int] = ()) -> None:
    g = mc.instance_group.add()
    g.count = count
    g.kind = pb().ModelInstanceGroup.Kind.Value(kind)
    if kind == "KIND_GPU":
        g.gpus.extend(gpus)


def _set_parameters(mc, params: Dict[str, object]) -> None:
    for k, v in params.items():
        mc.parameters[k].string_value = v if isinstance(v, str) else repr(v) if not isinstance(v, (list, tuple)) \
            else ",".join(str(x) for x in v)


def _set_warmup(mc, contract: EngineContract, seq_len: int = 8) -> None:
    """引擎加载后先跑一个 batch=1 的零输入（mask 全 0 也不会产生 NaN），避免首个请求承担初始化。"""
    w = mc.model_warmup.add()
    w.name = "zeros_b1"
    w.batch_size = 1
    for spec in contract.inputs:
        inp = w.inputs[spec.name]
        inp.data_type = _dtype(spec)
        inp.dims.extend([seq_len])
        inp.zero_data = True


def seq_buckets(config: ServingConfig) -> List[int]:
    """有效的长度桶：小于 max_seq_length 的桶再加上 max_seq_length 本身。"""
    limit = config.export.max_seq_length
    return sorted({b for b in config.engine.seq_buckets if b < limit} | {limit})


def _contract_params(config: ServingConfig, contract: EngineContract) -> Dict[str, object]:
    return {"max_seq_length": config.export.max_seq_length,
            "codebook_sizes": list(contract.codebook_sizes),
            "num_token_types": contract.num_token_types, "top_k": contract.top_k}


# ---------------- 四个模型 ----------------

def preprocess_config(config: ServingConfig, contract: EngineContract):
    mc = pb().ModelConfig(name=PREPROCESS, backend="python", max_batch_size=config.export.max_batch_size)
    # 历史也标为 optional：请求只带行为类型时，前处理照样执行并给出“缺少 history_item_ids”的错误；
    # 若它是必需的，ensemble 会因该步永远凑不齐输入而报 “unexpected deadlock”，看不出缺了什么
    _add_input(mc, HISTORY_INPUT, "TYPE_INT64", [-1], optional=True, ragged=True)
    _add_input(mc, BEHAVIOR_INPUT, "TYPE_INT64", [-1], optional=True, ragged=True)
    for spec in contract.inputs:
        _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    _add_output(mc, UNKNOWN_COUNT, "TYPE_INT64", [1])
    _set_batching(mc, config, engine=False)
    _set_instance_group(mc, config.triton.preprocess_instance_count, "KIND_CPU")
    _set_parameters(mc, _contract_params(config, contract) | {
        "unknown_item_policy": config.catalog.unknown_item_policy,
        "max_history_items": config.triton.max_history_items,
        # 原生后端要求同一批的形状相同：前处理按桶填充；python 运行器自己合批，前处理不填充
        "seq_buckets": [] if engine_hosting(config).python_runner else seq_buckets(config),
        "catalog": "catalog.npz"})
    return mc


def engine_config(config: ServingConfig, contract: EngineContract, gpus: Sequence[int]):
    hosting = engine_hosting(config)
    mc = pb().ModelConfig(name=ENGINE, max_batch_size=config.export.max_batch_size)
    if hosting.python_runner:
        mc.backend = "python"
    else:
        mc.platform = hosting.platform
        mc.default_model_filename = hosting.filename
    for spec in contract.inputs:
        # python 运行器自己把不同长度的请求填充成一批，所以允许 ragged；原生后端要求同形状（前处理按桶填充）
        _add_input(mc, spec.name, spec.triton_dtype, spec.dims_without_batch, ragged=hosting.python_runner)
    for spec in contract.outputs:
        _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    _set_batching(mc, config)
    on_gpu = _engine_on_gpu(config, gpus)
    if on_gpu:
        _set_instance_group(mc, config.triton.instance_count, "KIND_GPU", list(config.triton.gpus) or list(gpus))
        if config.engine.kind == "tensorrt":
            # 计划文件里有几个优化 profile（optimize_trt.trt_profiles）就全部交给实例，按输入形状选用
            from algorithm.serving.optimize_trt import trt_profiles

            mc.instance_group[0].profile.extend(str(i) for i in range(len(trt_profiles(config))))
    else:
        _set_instance_group(mc, config.triton.instance_count, "KIND_CPU")
    if config.triton.warmup:
        _set_warmup(mc, contract)
    if hosting.python_runner:
        _set_parameters(mc, _contract_params(config, contract) | {
            "engine_kind": config.engine.kind, "engine_file": hosting.filename,
            "device": "cuda" if on_gpu else "cpu", "num_threads": config.engine.num_threads,
            "precision": config.export.precision,
            # 只有 torch 引擎（CUDA Graph 按桶捕获）需要把合并后的批填充到桶；onnxruntime 按实际最长填充
            "batch_buckets": list(config.engine.batch_buckets),
            "seq_buckets": seq_buckets(config) if config.engine.kind == "torch" else [],
            "cuda_graphs": "1" if config.engine.cuda_graphs else "0",
            "compile_mode": config.engine.compile_mode, "compile_cache_dir": _compile_cache(config)})
    return mc


def _compile_cache(config: ServingConfig) -> str:
    if config.engine.kind != "torch":
        return ""
    from algorithm.serving.torch_engine import compile_cache_dir

    return compile_cache_dir(config)


def _engine_on_gpu(config: ServingConfig, gpus: Sequence[int]) -> bool:
    kind = config.triton.instance_kind
    if config.engine.kind == "onnxruntime":
        if kind == "gpu":
            raise ConfigError("triton.instance_kind=gpu 与 engine.kind=onnxruntime 不兼容："
                              "本包的 onnxruntime 引擎在 CPU 上运行；GPU 请用 engine=torch 或 engine=tensorrt")
        return False
    if kind == "cpu":
        if config.engine.kind == "tensorrt":
            raise ConfigError("engine.kind=tensorrt 需要 GPU；triton.instance_kind 不能为 cpu")
        return False
    if config.engine.device == "cpu":
        return False
    available = list(config.triton.gpus) or list(gpus)
    if not available:
        if kind == "gpu" or config.engine.kind == "tensorrt" or config.engine.device == "cuda":
            raise ConfigError(f"engine.kind={config.engine.kind} device={config.engine.device} 需要 GPU，"
                              "但本机没有检测到 GPU，且 triton.gpus 为空")
        return False
    return True


def postprocess_config(config: ServingConfig, contract: EngineContract):
    mc = pb().ModelConfig(name=POSTPROCESS, backend="python", max_batch_size=config.export.max_batch_size)
    rec, scores = contract.outputs
    _add_input(mc, POST_IN_REC, rec.triton_dtype, rec.dims_without_batch)
    _add_input(mc, POST_IN_SCORES, scores.triton_dtype, scores.dims_without_batch)
    _add_output(mc, "item_ids", "TYPE_INT64", [contract.top_k])
    _add_output(mc, "scores", "TYPE_FP32", [contract.top_k])
    _add_output(mc, "semantic_ids", "TYPE_INT64", [contract.top_k, 3])
    _set_batching(mc, config, engine=False)
    _set_instance_group(mc, config.triton.postprocess_instance_count, "KIND_CPU")
    _set_parameters(mc, {"top_k": contract.top_k, "catalog": "catalog.npz",
                         "codebook_sizes": list(contract.codebook_sizes)})
    return mc


def ensemble_config(config: ServingConfig, contract: EngineContract):
    name = validate_model_name(config.export.model_name)
    mc = pb().ModelConfig(name=name, platform="ensemble", max_batch_size=config.export.max_batch_size)
    _add_input(mc, HISTORY_INPUT, "TYPE_INT64", [-1], optional=True)  # 缺失时由前处理报错（见 preprocess_config）
    _add_input(mc, BEHAVIOR_INPUT, "TYPE_INT64", [-1], optional=True)
    _add_output(mc, "item_ids", "TYPE_INT64", [contract.top_k])
    _add_output(mc, "scores", "TYPE_FP32", [contract.top_k])
    _add_output(mc, "semantic_ids", "TYPE_INT64", [contract.top_k, 3])
    _add_output(mc, UNKNOWN_COUNT, "TYPE_INT64", [1])
    steps = mc.ensemble_scheduling
    pre = steps.step.add(model_name=PREPROCESS, model_version=-1)
    pre.input_map[HISTORY_INPUT] = HISTORY_INPUT
    pre.input_map[BEHAVIOR_INPUT] = BEHAVIOR_INPUT
    for n in contract.input_names:
        pre.output_map[n] = n
    pre.output_map[UNKNOWN_COUNT] = UNKNOWN_COUNT
    eng = steps.step.add(model_name=ENGINE, model_version=-1)
    for n in contract.input_names:
        eng.input_map[n] = n
    eng.output_map["recommendations"] = "engine_recommendations"
    eng.output_map["scores"] = "engine_scores"
    post = steps.step.add(model_name=POSTPROCESS, model_version=-1)
    post.input_map[POST_IN_REC] = "engine_recommendations"
    post.input_map[POST_IN_SCORES] = "engine_scores"
    for n in ("item_ids", "scores", "semantic_ids"):
        post.output_map[n] = n
    return mc


def build_model_configs(config: ServingConfig, gpus: Optional[Sequence[int]] = None) -> Dict[str, object]:
    """四个模型的 ModelConfig（纯函数，便于与黄金文件比较）。gpus=None 时检测本机。"""
    contract = config.model.contract()
    gpus = detect_gpus() if gpus is None else list(gpus)
    configs = [preprocess_config(config, contract), engine_config(config, contract, gpus),
               postprocess_config(config, contract), ensemble_config(config, contract)]
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ConfigError(f"export.model_name 不能与内部模型同名：{names}")
    return {c.name: c for c in configs}


def to_pbtxt(mc) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(mc, use_short_repeated_primitives=True)


def parse_pbtxt(text: str):
    from google.protobuf import text_format

    return text_format.Parse(text, pb().ModelConfig())


def generate_triton_config(model_repository: str, config: ServingConfig,
                           gpus: Optional[Sequence[int]] = None) -> str:
    """在 model_repository 下为四个模型写 config.pbtxt（目录不存在则创建）。返回仓库路径。

    只写配置；引擎文件、目录与 model.py 由 repository.build_repository 放置（它以原子方式生成整个仓库）。
    """
    for name, mc in build_model_configs(config, gpus).items():
        d = os.path.join(model_repository, validate_model_name(name))
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "config.pbtxt"), "w") as f:
            f.write(to_pbtxt(mc))
    return model_repository
