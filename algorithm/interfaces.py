"""UGT 推理服务的接口与引擎 I/O 契约。

本文件只依赖 numpy 与标准库：Triton 的 Python 模型（前处理/后处理）也会导入它，
生产容器里不需要 torch / onnx。

契约（EngineContract）只在这里声明一次：名称、dtype、动态轴、取值范围、top-k。
ONNX 动态轴、TensorRT 优化 profile、config.pbtxt 的 dims、请求校验、
基准测试的请求生成器都由它派生。
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

# 用户请求中固定的三级语义 ID 码本大小（l1 < 1024, l2 < 4096, l3 < 16384）
DEFAULT_CODEBOOK_SIZES: Tuple[int, int, int] = (1024, 4096, 16384)
DEFAULT_TOP_K = 50
DEFAULT_NUM_TOKEN_TYPES = 8
BATCH_AXIS = "batch"
SEQ_AXIS = "seq_len"


class ContractError(ValueError):
    """输入不符合引擎契约（用户侧错误）：消息里写明输入名、期望与实际。"""


@dataclass(frozen=True)
class TensorSpec:
    """一个张量的契约。

    dims 中字符串表示动态轴（"batch"/"seq_len"），整数表示固定长度。
    value_range 为半开区间 [low, high)；None 表示不限（或仅要求有限值）。
    """

    name: str
    dtype: np.dtype
    dims: Tuple[Any, ...]
    value_range: Optional[Tuple[float, float]] = None
    allowed_values: Optional[Tuple[float, ...]] = None
    doc: str = ""

    @property
    def triton_dtype(self) -> str:
        """Triton 的数据类型名（TYPE_INT64 等）。"""
        return "TYPE_" + _NP_TO_TRITON[np.dtype(self.dtype)]

    @property
    def dynamic_axes(self) -> Dict[int, str]:
        """ONNX 风格的动态轴：{轴号: 轴名}。"""
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    @property
    def dims_without_batch(self) -> Tuple[int, ...]:
        """config.pbtxt 中的 dims（去掉 batch 轴，动态轴为 -1）。"""
        return tuple(-1 if isinstance(d, str) else int(d) for d in self.dims[1:])

    def validate(self, array: np.ndarray, where: str = "") -> None:
        """检查 dtype、秩、固定维度、取值范围；不符合时抛 ContractError。"""
        loc = f"{where}{self.name}"
        if not isinstance(array, np.ndarray):
            raise ContractError(f"{loc}: 期望 numpy 数组，得到 {type(array).__name__}")
        if array.dtype != np.dtype(self.dtype):
            raise ContractError(f"{loc}: dtype 应为 {np.dtype(self.dtype).name}，得到 {array.dtype.name}")
        if array.ndim != len(self.dims):
            raise ContractError(
                f"{loc}: 秩应为 {len(self.dims)} {list(self.dims)}，得到形状 {list(array.shape)}")
        for axis, d in enumerate(self.dims):
            if not isinstance(d, str) and array.shape[axis] != d:
                raise ContractError(f"{loc}: 第 {axis} 维应为 {d}，得到 {array.shape[axis]}")
        if array.size == 0:
            return
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            bad = np.argwhere(~np.isfinite(array))[0].tolist()
            raise ContractError(f"{loc}: 含 NaN/inf，位置 {bad}")
        if self.allowed_values is not None:
            ok = np.isin(array, np.asarray(self.allowed_values, dtype=array.dtype))
            if not ok.all():
                bad = np.argwhere(~ok)[0].tolist()
                raise ContractError(
                    f"{loc}: 取值只能是 {list(self.allowed_values)}，位置 {bad} 为 {array[tuple(bad)]}")
        if self.value_range is not None:
            lo, hi = self.value_range
            ok = (array >= lo) & (array < hi)
            if not ok.all():
                bad = np.argwhere(~ok)[0].tolist()
                raise ContractError(
                    f"{loc}: 取值应在 [{lo}, {hi}) 内，位置 {bad} 为 {array[tuple(bad)]}")


_NP_TO_TRITON = {
    np.dtype(np.int64): "INT64",
    np.dtype(np.int32): "INT32",
    np.dtype(np.float32): "FP32",
    np.dtype(np.float16): "FP16",
    np.dtype(np.bool_): "BOOL",
}


@dataclass(frozen=True)
class EngineContract:
    """UGT 引擎的 I/O 契约：六个输入 [batch, seq_len]，两个输出。

    - encoder_l1/l2/l3_ids: int64，三级语义 ID，范围 [0, codebook_size)
    - encoder_positions: int64，[0, max_seq_length)，最旧的物品为 0
    - encoder_token_types: int64，行为类型，[0, num_token_types)
    - encoder_mask: fp32，1 = 有效，0 = 填充（右侧填充）
    - recommendations: int64 [batch, top_k, 3]，按分数降序
    - scores: fp32 [batch, top_k]，beam 的对数概率之和，降序
    """

    max_seq_length: int = 1024
    codebook_sizes: Tuple[int, int, int] = DEFAULT_CODEBOOK_SIZES
    num_token_types: int = DEFAULT_NUM_TOKEN_TYPES
    top_k: int = DEFAULT_TOP_K
    inputs: Tuple[TensorSpec, ...] = field(init=False)
    outputs: Tuple[TensorSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.max_seq_length < 1:
            raise ContractError(f"max_seq_length 应 >= 1，得到 {self.max_seq_length}")
        if len(self.codebook_sizes) != 3 or min(self.codebook_sizes) < 1:
            raise ContractError(f"codebook_sizes 应为三个正整数，得到 {self.codebook_sizes}")
        v1, v2, v3 = (int(v) for v in self.codebook_sizes)
        dims = (BATCH_AXIS, SEQ_AXIS)
        i64 = np.dtype(np.int64)
        inputs = (
            TensorSpec("encoder_l1_ids", i64, dims, (0, v1), doc="一级语义 ID"),
            TensorSpec("encoder_l2_ids", i64, dims, (0, v2), doc="二级语义 ID"),
            TensorSpec("encoder_l3_ids", i64, dims, (0, v3), doc="三级语义 ID"),
            TensorSpec("encoder_positions", i64, dims, (0, self.max_seq_length), doc="位置，从 0 开始"),
            TensorSpec("encoder_token_types", i64, dims, (0, self.num_token_types), doc="行为类型"),
            TensorSpec("encoder_mask", np.dtype(np.float32), dims, allowed_values=(0.0, 1.0),
                       doc="1 有效 / 0 填充"),
        )
        outputs = (
            TensorSpec("recommendations", i64, (BATCH_AXIS, self.top_k, 3), doc="top-k 语义 ID 三元组"),
            TensorSpec("scores", np.dtype(np.float32), (BATCH_AXIS, self.top_k), doc="降序对数概率"),
        )
        object.__setattr__(self, "codebook_sizes", (v1, v2, v3))
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "outputs", outputs)

    @property
    def input_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    def input(self, name: str) -> TensorSpec:
        for s in self.inputs:
            if s.name == name:
                return s
        raise KeyError(name)

    def validate_inputs(self, feeds: Mapping[str, np.ndarray], max_batch_size: Optional[int] = None) -> None:
        """校验一组引擎输入：齐全、无多余、dtype/秩/取值正确、各输入形状一致。

        GPU 上越界 ID 会触发 device-side assert 并毁掉 CUDA 上下文，
        所以任何引擎在把数据交给设备之前都要调用它。
        """
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise ContractError(f"缺少输入 {missing}；引擎需要 {list(self.input_names)}")
        extra = [n for n in feeds if n not in self.input_names]
        if extra:
            raise ContractError(f"未知输入 {extra}；引擎只接受 {list(self.input_names)}")
        shape = None
        for spec in self.inputs:
            arr = feeds[spec.name]
            spec.validate(arr)
            if shape is None:
                shape = arr.shape
            elif arr.shape != shape:
                raise ContractError(
                    f"{spec.name}: 形状 {list(arr.shape)} 与 {self.inputs[0].name} 的 {list(shape)} 不一致")
        assert shape is not None
        if shape[0] < 1 or shape[1] < 1:
            raise ContractError(f"batch 与 seq_len 都应 >= 1，得到形状 {list(shape)}")
        empty = ~(feeds["encoder_mask"] > 0).any(axis=1)
        if empty.any():
            raise ContractError(f"encoder_mask: 第 {int(np.argmax(empty))} 行没有有效位置（全为 0）；每行至少要有一个 1")
        if shape[1] > self.max_seq_length:
            raise ContractError(f"seq_len {shape[1]} 超过 max_seq_length {self.max_seq_length}")
        if max_batch_size is not None and shape[0] > max_batch_size:
            raise ContractError(f"batch {shape[0]} 超过 max_batch_size {max_batch_size}")

    def random_inputs(self, batch: int, seq_len: int, rng: np.random.Generator,
                      lengths: Optional[np.ndarray] = None) -> Dict[str, np.ndarray]:
        """按契约生成合法的随机输入（右侧填充；lengths 为每行有效长度）。"""
        if lengths is None:
            lengths = np.full(batch, seq_len, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        mask = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float32)
        v1, v2, v3 = self.codebook_sizes
        feeds = {
            "encoder_l1_ids": rng.integers(0, v1, (batch, seq_len), dtype=np.int64),
            "encoder_l2_ids": rng.integers(0, v2, (batch, seq_len), dtype=np.int64),
            "encoder_l3_ids": rng.integers(0, v3, (batch, seq_len), dtype=np.int64),
            "encoder_positions": np.broadcast_to(np.arange(seq_len, dtype=np.int64), (batch, seq_len)).copy(),
            "encoder_token_types": rng.integers(0, self.num_token_types, (batch, seq_len), dtype=np.int64),
            "encoder_mask": mask,
        }
        for name in self.input_names:
            if name != "encoder_mask":
                feeds[name] = feeds[name] * (mask > 0)
        return feeds


# ---------------------------------------------------------------- ensemble 的公开 I/O
# 客户端看到的名字只在这里声明；Triton 配置、前/后处理、客户端、压测都从这里取。
HISTORY_INPUT = "history_item_ids"
BEHAVIOR_INPUT = "history_behavior_types"
ITEM_IDS_OUTPUT = "item_ids"
SCORES_OUTPUT = "scores"
SEMANTIC_IDS_OUTPUT = "semantic_ids"
UNKNOWN_COUNT_OUTPUT = "num_unknown_items"
# 引擎输出进入后处理时的名字（与 ensemble 的输出 scores 区分）
POST_IN_REC = "engine_recommendations"
POST_IN_SCORES = "engine_scores"


@dataclass(frozen=True)
class EnsembleContract:
    """ensemble（原始历史 -> top-k 物品）的公开契约。每个请求一条历史（batch 维为 1 或多行）。

    - history_item_ids: int64 [n]，旧 -> 新；history_behavior_types: int64 [n]，可选
    - item_ids [K] int64（不足 K 个时 -1 填充）、scores [K] fp32（降序，填充处 -inf）、
      semantic_ids [K, 3] int64、num_unknown_items [1] int64（跳过的未知物品数）
    """

    top_k: int = DEFAULT_TOP_K
    inputs: Tuple[TensorSpec, ...] = field(init=False)
    outputs: Tuple[TensorSpec, ...] = field(init=False)

    def __post_init__(self) -> None:
        i64, f32 = np.dtype(np.int64), np.dtype(np.float32)
        k = int(self.top_k)
        object.__setattr__(self, "inputs", (
            TensorSpec(HISTORY_INPUT, i64, (BATCH_AXIS, "history"), doc="物品 id，旧 -> 新"),
            TensorSpec(BEHAVIOR_INPUT, i64, (BATCH_AXIS, "history"), doc="行为类型（可选）"),
        ))
        object.__setattr__(self, "outputs", (
            TensorSpec(ITEM_IDS_OUTPUT, i64, (BATCH_AXIS, k), doc="top-k 物品 id"),
            TensorSpec(SCORES_OUTPUT, f32, (BATCH_AXIS, k), doc="降序分数"),
            TensorSpec(SEMANTIC_IDS_OUTPUT, i64, (BATCH_AXIS, k, 3), doc="top-k 语义 ID"),
            TensorSpec(UNKNOWN_COUNT_OUTPUT, i64, (BATCH_AXIS, 1), doc="跳过的未知物品数"),
        ))

    @property
    def output_names(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.outputs)

    @property
    def postprocess_outputs(self) -> Tuple[TensorSpec, ...]:
        """后处理产出的输出（未知物品数由前处理产出）。"""
        return tuple(s for s in self.outputs if s.name != UNKNOWN_COUNT_OUTPUT)


class ServingExporterInterface(abc.ABC):
    """用户指定的服务导出接口（四个方法，签名与用户请求一致）。"""

    @abc.abstractmethod
    def export_onnx(self, model: Any, save_path: str, config: Any) -> str:
        """把 PyTorch 模型导出为 ONNX：六个输入的 batch 与 seq_len 均为动态轴，
        两个输出的 batch 为动态轴；导出后在多个形状上与 PyTorch 对比验证。
        返回写出的 .onnx 路径；验证失败抛出带数字的命名异常。"""

    @abc.abstractmethod
    def optimize_tensorrt(self, onnx_path: str, engine_path: str, config: Any) -> str:
        """用 TensorRT 从 ONNX 构建引擎（所有输入的 min/opt/max profile、精度、校准）。
        返回引擎路径；没有 TensorRT 时抛出说明缺什么的错误。"""

    @abc.abstractmethod
    def generate_triton_config(self, model_repository: str, config: Any) -> str:
        """在 model_repository 下生成 ensemble 仓库（前处理 -> 引擎 -> 后处理）的全部
        config.pbtxt（经 Triton ModelConfig protobuf 生成）。返回仓库路径。"""

    @abc.abstractmethod
    def benchmark(self, triton_url: str, model_name: str, num_requests: int) -> Dict[str, float]:
        """对运行中的 Triton 做压测，至少返回 throughput（请求/秒）、
        latency_p50 / latency_p90 / latency_p99（毫秒）。"""
