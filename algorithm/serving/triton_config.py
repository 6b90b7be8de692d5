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
from typing import Dict, List, Optional, Sequence

from algorithm.errors import ConfigError, MissingDependencyError
from algorithm.interfaces import (BEHAVIOR_INPUT, POST_IN_REC, POST_IN_SCORES, UNKNOWN_COUNT_OUTPUT,
                                  EngineContract, EnsembleContract, TensorSpec)
from algorithm.serving.config import ServingConfig
from algorithm.serving.engines import engine_module, hosting as engine_hosting, resolve_auto
from algorithm.serving.runtime import packed, params

PREPROCESS = "ugt_preprocess"
ENGINE = "ugt_engine"
POSTPROCESS = "ugt_postprocess"
FLOOR = "ugt_floor"  # 压测的地板模型（只在压测生成的仓库里）
UNKNOWN_COUNT = UNKNOWN_COUNT_OUTPUT
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
    """动态批处理；引擎另有队列策略：超过 max_queue_size 立即拒绝，排队超过 queue_timeout_us 拒绝。

    只有引擎按 preferred_batch_sizes / max_queue_delay_us 攒批；前/后处理是逐请求的 CPU 工作，
    等待只增加延迟，所以它们不等（delay 0：执行时队列里有几个就一起处理几个）。

    队列策略只放在引擎上（max_queue_size 与 queue_timeout_us 都为 0 时引擎也不放）：Triton 的动态批处理器在模型有
    任何队列策略时不预取（scheduler_utils.cc 的 support_prefetching_），所有实例都忙时它睡在一个 500 ms 的
    cv.wait_for 里，实例空闲时没有人唤醒它，只有下一个成功入队的请求会（dynamic_batch_scheduler.cc 的
    WaitForPayloadSlotAvailable；max_queue_size 满时被拒的请求不算，所以只用排队超时）。过载时请求堆在引擎（最慢的一步）前，所以丢弃放在那里就够了；前/后处理不要策略，
    保留预取。"""
    t = config.triton
    if not engine and not t.prepost_batching:
        return  # 只为对照旧行为（config.TritonConfig.prepost_batching）
    db = mc.dynamic_batching
    # 只读子消息不会让它出现在配置里：前/后处理什么字段都不设，以前 config.pbtxt 里就没有 dynamic_batching，Triton 对它们
    # 逐个请求调用 execute（H100 上 c=64 时后处理平均 batch 1.0、排队约 3 ms，引擎一次吐出约 16 个响应）
    db.SetInParent()
    if engine:
        db.preferred_batch_size.extend(sorted(t.preferred_batch_sizes))
        db.max_queue_delay_microseconds = t.max_queue_delay_us
    if engine and (t.max_queue_size or t.queue_timeout_us):
        qp = db.default_queue_policy
        qp.timeout_action = pb().ModelQueuePolicy.REJECT
        qp.default_timeout_microseconds = t.queue_timeout_us
        qp.max_queue_size = t.max_queue_size


def _set_instance_group(mc, count: int, kind: str, gpus: Sequence[int] = ()) -> None:
    g = mc.instance_group.add()
    g.count = count
    g.kind = pb().ModelInstanceGroup.Kind.Value(kind)
    if kind == "KIND_GPU":
        g.gpus.extend(gpus)


WARMUP_SEQ_LEN = 8
# 预热样本里 mask 的数据文件（全 1）：放在 <模型>/warmup/ 下（repository.build_repository 写出）
WARMUP_MASK_FILE = "mask_ones"
WARMUP_PACKED_FILE = "packed_zeros_mask_ones"


def warmup_files(contract: EngineContract) -> Dict[str, bytes]:
    """引擎预热样本引用的数据文件：6 个输入时 mask 的全 1，打包时整个样本（runtime/packed.py）。"""
    import numpy as np

    return {WARMUP_MASK_FILE: np.ones(WARMUP_SEQ_LEN, dtype=np.float32).tobytes(),
            WARMUP_PACKED_FILE: packed.warmup_bytes(contract, WARMUP_SEQ_LEN)}


def _set_warmup(mc, contract: EngineContract, seq_len: int = WARMUP_SEQ_LEN, packed_inputs: bool = False) -> None:
    """引擎加载后先跑一个 batch=1 的样本（id 全 0、mask 全 1：引擎拒绝没有有效位置的行），
    避免首个请求承担初始化。"""
    w = mc.model_warmup.add()
    w.name = "warmup_b1"
    w.batch_size = 1
    if packed_inputs:
        inp = w.inputs[packed.PACKED_INPUT]
        inp.data_type = pb().DataType.Value("TYPE_INT64")
        inp.dims.extend([len(contract.inputs) * seq_len])
        inp.input_data_file = WARMUP_PACKED_FILE
        return
    for spec in contract.inputs:
        inp = w.inputs[spec.name]
        inp.data_type = _dtype(spec)
        inp.dims.extend([seq_len])
        if spec.name == "encoder_mask":
            inp.input_data_file = WARMUP_MASK_FILE
        else:
            inp.zero_data = True


def runtime_spec(config: ServingConfig, on_gpu: bool = False) -> params.RuntimeSpec:
    """服务进程需要、只有构建时才能决定的事实（托管方式、设备、有效的桶）。"""
    hosting = engine_hosting(config)
    torch_kind = config.engine.kind == "torch"
    cache = ""
    int8_mode, compile_mode = config.engine.int8_mode, config.engine.compile_mode
    if torch_kind:
        cache = engine_module("torch").compile_cache_dir(config)
        int8_mode, compile_mode = engine_module("torch").int8_modes(config, "cuda" if on_gpu else "cpu")
    return params.RuntimeSpec(
        engine_kind=config.engine.kind, engine_file=hosting.filename, device="cuda" if on_gpu else "cpu",
        # 只有 torch 引擎（CUDA Graph 按桶捕获）与原生后端需要按桶填充；onnxruntime 运行器按实际最长填充
        seq_buckets=tuple(config.seq_buckets()) if (torch_kind or not hosting.python_runner) else (),
        batch_buckets=tuple(config.batch_buckets()),
        pad_in_preprocess=not hosting.python_runner, catalog_file="catalog.npz", compile_cache_dir=cache,
        num_threads=config.engine.num_threads, compile_mode=compile_mode,
        cuda_graphs=config.engine.cuda_graphs, plan_groups=config.engine.plan_groups,
        group_streams=config.engine.group_streams, precision=config.export.precision, int8_mode=int8_mode,
        pack_inputs=packs_engine_inputs(config))


def packs_engine_inputs(config: ServingConfig) -> bool:
    """前处理 -> 引擎是否走打包的 1 个张量（runtime/packed.py）：只在 python 运行器托管引擎时。"""
    return engine_hosting(config).python_runner and config.triton.pack_engine_inputs


def _set_runtime(mc, config: ServingConfig, on_gpu: bool = False) -> None:
    mc.parameters[params.PARAM_KEY].string_value = params.encode(config, runtime_spec(config, on_gpu))


# ---------------- 四个模型 ----------------

def preprocess_config(config: ServingConfig, contract: EngineContract):
    mc = pb().ModelConfig(name=PREPROCESS, backend="python", max_batch_size=config.export.max_batch_size)
    # 历史也标为 optional：请求只带行为类型时，前处理照样执行并给出“缺少 history_item_ids”的错误；
    # 若它是必需的，ensemble 会因该步永远凑不齐输入而报 “unexpected deadlock”，看不出缺了什么
    for spec in EnsembleContract(contract.top_k).inputs:
        _add_input(mc, spec.name, spec.triton_dtype, [-1], optional=True, ragged=True)
    if packs_engine_inputs(config):
        _add_output(mc, packed.PACKED_INPUT, "TYPE_INT64", [-1])
    else:
        for spec in contract.inputs:
            _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    _add_output(mc, UNKNOWN_COUNT, "TYPE_INT64", [1])
    _set_batching(mc, config, engine=False)
    _set_instance_group(mc, config.triton.preprocess_instance_count, "KIND_CPU")
    _set_runtime(mc, config)
    return mc


def engine_config(config: ServingConfig, contract: EngineContract, gpus: Sequence[int]):
    hosting = engine_hosting(config)
    mc = pb().ModelConfig(name=ENGINE, max_batch_size=config.export.max_batch_size)
    if hosting.python_runner:
        mc.backend = "python"
    else:
        mc.platform = hosting.platform
        mc.default_model_filename = hosting.filename
    if packs_engine_inputs(config):
        _add_input(mc, packed.PACKED_INPUT, "TYPE_INT64", [-1], ragged=True)
    else:
        for spec in contract.inputs:
            # python 运行器自己把不同长度的请求填充成一批，所以允许 ragged；原生后端要求同形状（前处理按桶填充）
            _add_input(mc, spec.name, spec.triton_dtype, spec.dims_without_batch, ragged=hosting.python_runner)
    for spec in contract.outputs:
        _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    _set_batching(mc, config)
    on_gpu = _engine_on_gpu(config, gpus)
    if on_gpu:
        _set_instance_group(mc, config.triton.instance_count, "KIND_GPU", list(config.triton.gpus) or list(gpus))
        module = engine_module(config.engine.kind)
        if hasattr(module, "instance_profiles"):
            # 计划文件里有几个优化 profile 就全部交给实例，按输入形状选用
            mc.instance_group[0].profile.extend(module.instance_profiles(config))
    else:
        _set_instance_group(mc, config.triton.instance_count, "KIND_CPU")
    if config.triton.warmup:
        _set_warmup(mc, contract, packed_inputs=packs_engine_inputs(config))
    if hosting.python_runner:
        _set_runtime(mc, config, on_gpu)
    return mc


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
    for spec in EnsembleContract(contract.top_k).postprocess_outputs:
        _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    _set_batching(mc, config, engine=False)
    _set_instance_group(mc, config.triton.postprocess_instance_count, "KIND_CPU")
    _set_runtime(mc, config)
    return mc


def ensemble_config(config: ServingConfig, contract: EngineContract):
    name = validate_model_name(config.export.model_name)
    mc = pb().ModelConfig(name=name, platform="ensemble", max_batch_size=config.export.max_batch_size)
    public = EnsembleContract(contract.top_k)
    # 都标为 optional：缺失时由前处理报错（见 preprocess_config）。试过把历史标为必需（2026-11-27，Triton 2.51）：完全没有
    # 输入时 Triton 的错误会写明 "missing required input(s) ['history_item_ids']"，但只带行为类型的请求个数够（1 个），
    # Triton 放行后 ensemble 的前处理一步永远凑不齐输入，得到 "unexpected deadlock"，反而看不出缺了什么
    for spec in public.inputs:
        _add_input(mc, spec.name, spec.triton_dtype, [-1], optional=True)
    for spec in public.outputs:
        _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    steps = mc.ensemble_scheduling
    pre = steps.step.add(model_name=PREPROCESS, model_version=-1)
    for spec in public.inputs:
        pre.input_map[spec.name] = spec.name
    engine_inputs = [packed.PACKED_INPUT] if packs_engine_inputs(config) else list(contract.input_names)
    for n in engine_inputs:
        pre.output_map[n] = n
    pre.output_map[UNKNOWN_COUNT] = UNKNOWN_COUNT
    eng = steps.step.add(model_name=ENGINE, model_version=-1)
    for n in engine_inputs:
        eng.input_map[n] = n
    rec, scores = contract.output_names
    eng.output_map[rec] = POST_IN_REC
    eng.output_map[scores] = POST_IN_SCORES
    post = steps.step.add(model_name=POSTPROCESS, model_version=-1)
    post.input_map[POST_IN_REC] = POST_IN_REC
    post.input_map[POST_IN_SCORES] = POST_IN_SCORES
    for spec in public.postprocess_outputs:
        post.output_map[spec.name] = spec.name
    return mc


def floor_config(config: ServingConfig, contract: EngineContract):
    """压测的地板模型：与 ensemble 同样的公开输入输出，一个 python 模型，不做计算（model_repository/ugt_floor）。"""
    mc = pb().ModelConfig(name=FLOOR, backend="python", max_batch_size=config.export.max_batch_size)
    public = EnsembleContract(contract.top_k)
    for spec in public.inputs:
        _add_input(mc, spec.name, spec.triton_dtype, [-1], optional=spec.name == BEHAVIOR_INPUT, ragged=True)
    for spec in public.outputs:
        _add_output(mc, spec.name, spec.triton_dtype, spec.dims_without_batch)
    mc.dynamic_batching.max_queue_delay_microseconds = 0
    _set_instance_group(mc, config.triton.preprocess_instance_count, "KIND_CPU")
    _set_runtime(mc, config)
    return mc


def build_model_configs(config: ServingConfig, gpus: Optional[Sequence[int]] = None,
                        include_floor: bool = False) -> Dict[str, object]:
    """四个模型的 ModelConfig（纯函数，便于与黄金文件比较）。gpus=None 时检测本机。
    include_floor：再加上压测的地板模型 ugt_floor（只用于压测生成的仓库）。"""
    config = resolve_auto(config)
    contract = config.contract()
    gpus = detect_gpus() if gpus is None else list(gpus)
    configs = [preprocess_config(config, contract), engine_config(config, contract, gpus),
               postprocess_config(config, contract), ensemble_config(config, contract)]
    if include_floor:
        configs.append(floor_config(config, contract))
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
