"""服务的全部配置：Hydra 结构化配置（dataclass），构造时在 __post_init__ 中校验。

每个选项只在这里声明一次（含默认值）；conf/ 下的 YAML 组只做选择与覆盖，
scripts/ 下的 Hydra 应用直接使用这些类。ExportConfig / TritonConfig 保留用户请求里的字段与默认值。
决定构建产物的选项用 artifact_field 声明（字段的 metadata）；artifact_paths 由此得出，压测的构建变体按它判断要不要重建。
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from algorithm.errors import ConfigError
from algorithm.interfaces import EngineContract
from algorithm.models.config import UGTConfig

PRECISIONS = ("fp32", "fp16", "int8", "fp8")  # fp8：e4m3，只有 torch 引擎、Hopper（sm_90+）
SPEED_CHECKS = ("auto", "on", "off")
ENGINES = ("onnxruntime", "torch", "tensorrt", "auto")  # auto：有 GPU 用 torch，否则 onnxruntime（构建时决定）
INSTANCE_KINDS = ("auto", "gpu", "cpu")
UNKNOWN_ITEM_POLICIES = ("skip", "error")
BENCH_TARGETS = ("ensemble", "engine")
PROTOCOLS = ("grpc", "http")
TRACE_SLA_POINT = ("auto", "on", "off")


def _choice(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name} = {value!r} 不合法；可选 {list(allowed)}")


def _positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{section}.{name} 应为{'非负' if allow_zero else '正'}数，得到 {value!r}")


ARTIFACT = "artifact"  # 字段 metadata 的键：True，或 (ServingConfig) -> bool 的条件


def artifact_field(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING,
                   when: Optional[Callable[["ServingConfig"], bool]] = None) -> Any:
    """决定构建产物的选项（引擎文件、ONNX、TensorRT 计划、目录、检查点或门禁的判定）：改了必须重新构建。
    标在嵌套的 dataclass 上 = 整棵子树；when 给出时只在这个条件下决定产物（其余时候只影响服务或压测）。"""
    return field(default=default, default_factory=default_factory, metadata={ARTIFACT: when or True})


def _planned_buckets(c: "ServingConfig") -> bool:
    """规划长度桶时，桶（从而 TensorRT 的 profile、fp8 的逐层计划）由压测的长度分布得出。"""
    return c.engine.seq_bucket_plan > 0


def _lengths_in_artifact(c: "ServingConfig") -> bool:
    """长度分布进产物：规划长度桶时，或 int8 的校准历史按它采样时（onnxruntime / TensorRT 的静态 int8）。"""
    return _planned_buckets(c) or c.export.precision == "int8"


def _fp8(c: "ServingConfig") -> bool:
    """fp8 的逐层计划按各桶的行数计时选择，写进 .pt2：这时桶决定产物，其余精度下桶只在加载时捕获。"""
    return c.export.precision == "fp8"


@dataclass
class ExportConfig:
    """导出与引擎构建（用户请求中的字段与默认值）。"""

    # 模型名与延迟目标只进仓库与服务（压测时按当前配置重新生成仓库），不是产物选项
    model_name: str = "ugt_recommend"
    precision: str = artifact_field("fp16")  # fp32 / fp16 / int8 / fp8
    max_batch_size: int = artifact_field(64)
    max_seq_length: int = artifact_field(1024)
    target_latency_ms: float = 30.0
    opset_version: int = artifact_field(18)
    # 导出验证：在这些 (batch, seq_len) 上与 PyTorch 对比；空列表 = 自动选取
    # （batch 1、奇数 batch + 奇数长度、max_batch_size x max_seq_length）。是构建的检查，所以也算产物选项
    validation_shapes: List[List[int]] = artifact_field(default_factory=list)
    # 解码器自注意力的 KV 缓存（UGTModel.decoder_kv_cache）：每步只算新位置，与重算前缀数学上相同、解码器行数约为 2/5
    # （c=64 +12 %，benchmarks/h100-2026-11-28/machine1）；false 是重算前缀的对照（同一检查点，只改导出的计算图）
    decoder_kv_cache: bool = artifact_field(True)

    def __post_init__(self) -> None:
        _choice("export", "precision", self.precision, PRECISIONS)
        _positive("export", "max_batch_size", self.max_batch_size)
        _positive("export", "max_seq_length", self.max_seq_length)
        _positive("export", "target_latency_ms", self.target_latency_ms)
        if self.opset_version < 17:
            raise ConfigError(f"export.opset_version 应 >= 17，得到 {self.opset_version}")
        if not self.model_name or not all(c.isalnum() or c in "_-" for c in self.model_name):
            raise ConfigError(f"export.model_name 只能含字母、数字、'_'、'-'，得到 {self.model_name!r}")
        for s in self.validation_shapes:
            if len(s) != 2 or min(s) < 1:
                raise ConfigError(f"export.validation_shapes 的每项应为 [batch, seq_len] 正整数，得到 {list(s)}")
            if s[0] > self.max_batch_size or s[1] > self.max_seq_length:
                raise ConfigError(f"export.validation_shapes 项 {list(s)} 超过 "
                                  f"[max_batch_size={self.max_batch_size}, max_seq_length={self.max_seq_length}]")

    def checked_shapes(self) -> List[List[int]]:
        """导出验证要检查的形状（均与导出示例 (2, 16) 不同）。"""
        if self.validation_shapes:
            return [list(s) for s in self.validation_shapes]
        odd_b = min(self.max_batch_size, 7)
        odd_l = min(self.max_seq_length, 37)
        return [[1, min(self.max_seq_length, 5)], [odd_b, odd_l], [self.max_batch_size, self.max_seq_length]]


@dataclass
class TritonConfig:
    """Triton 的批处理、队列与实例配置（用户请求中的字段与默认值，修正了元组默认值）。"""

    instance_count: int = 2
    preferred_batch_sizes: List[int] = field(default_factory=lambda: [8, 16, 32, 64])
    max_queue_delay_us: int = 100
    # 过载时丢弃（runtime/shedding.py）：引擎前的等待超过 max(export.target_latency_ms, shed_queue_depth x 实测的每请求
    # 服务时间) 时前处理拒绝新请求（UNAVAILABLE）。只在 python 运行器托管引擎、打包输入时可用。
    # shed_queue_depth 0 = instance_count x 最大的 preferred batch：不超过这么多个的闭环客户端不会被拒
    load_shedding: bool = True
    shed_queue_depth: int = 0
    # Triton 自己的队列策略（只放在引擎上）：排队超过 queue_timeout_us 或队列超过 max_queue_size 的请求被拒。默认都不设：
    # 固定的超时在正常排队时也拒绝（两核 CPU 上 15 ms 拒了三分之一的健康请求）；任何策略都让 Triton 不预取；
    # max_queue_size 满时被拒的请求不唤醒动态批处理器，出现约 500 ms 的台阶（triton_config._set_batching）。
    # 原生后端（没有上面的丢弃）要有界的队列时设 queue_timeout_us
    max_queue_size: int = 0
    queue_timeout_us: int = 0
    instance_kind: str = "auto"  # auto：有 GPU 用 KIND_GPU，否则 KIND_CPU
    gpus: List[int] = field(default_factory=list)  # 空 = 由机器决定（全部可见 GPU）
    preprocess_instance_count: int = 2
    postprocess_instance_count: int = 2
    # 前/后处理的动态批处理（不等待：执行时队列里有几个就一起处理几个）。false = 不配 dynamic_batching、Triton 逐个请求
    # 调用它们，只为同一次运行里的对照（c=64 约慢 4 %，benchmarks/h100-2026-11-27/machine6）
    prepost_batching: bool = True
    # python 运行器托管引擎时，前处理把引擎的 6 个输入拼成 1 个张量交给引擎（runtime/packed.py）：python backend 每个请求的
    # 交接成本随张量个数涨（benchmarks/cpu-2026-11-27）。原生后端不受影响（6 个输入是它的契约）。false = 6 个张量
    pack_engine_inputs: bool = True
    warmup: bool = True
    # python 运行器托管的引擎的流水线深度：1 = 每次 execute 等 GPU 做完再返回；2 = 启动这一批后只等上一批做完就返回，
    # 这一批的结果由后台线程经 response sender 发回：主机上的交接（读输入、校验、暂存、回响应）与 GPU 重叠。
    # torch 运行器每个桶多一套页锁定暂存区。预设 triton=h100 用 2（1 个实例时 c=64 +22 %，benchmarks/h200-2026-11-28）
    engine_pipeline_depth: int = 1
    # 单个请求历史的最大物品数，超过由前处理拒绝（截断前的原始长度）
    max_history_items: int = 100_000

    def __post_init__(self) -> None:
        _positive("triton", "instance_count", self.instance_count)
        _positive("triton", "preprocess_instance_count", self.preprocess_instance_count)
        _positive("triton", "postprocess_instance_count", self.postprocess_instance_count)
        _positive("triton", "max_queue_delay_us", self.max_queue_delay_us, allow_zero=True)
        _positive("triton", "max_queue_size", self.max_queue_size, allow_zero=True)
        _positive("triton", "queue_timeout_us", self.queue_timeout_us, allow_zero=True)
        _positive("triton", "shed_queue_depth", self.shed_queue_depth, allow_zero=True)
        _positive("triton", "max_history_items", self.max_history_items)
        _positive("triton", "engine_pipeline_depth", self.engine_pipeline_depth)
        if self.engine_pipeline_depth > 4:
            raise ConfigError(f"triton.engine_pipeline_depth 应在 1–4 之间（每多 1 层多一套暂存区、多等一批），"
                              f"得到 {self.engine_pipeline_depth}")
        _choice("triton", "instance_kind", self.instance_kind, INSTANCE_KINDS)
        sizes = list(self.preferred_batch_sizes)
        if any((not isinstance(s, int)) or s < 1 for s in sizes):
            raise ConfigError(f"triton.preferred_batch_sizes 应为正整数，得到 {sizes}")
        if len(set(sizes)) != len(sizes):
            raise ConfigError(f"triton.preferred_batch_sizes 含重复值：{sizes}")
        if any(g < 0 for g in self.gpus):
            raise ConfigError(f"triton.gpus 应为非负的 GPU 编号，得到 {list(self.gpus)}")


@dataclass
class EngineConfig:
    """引擎：onnxruntime（CPU，内嵌默认）| torch（PyTorch 编译，GPU）| tensorrt（生产）| auto（构建时按机器选
    torch 或 onnxruntime；Hydra 的默认组，所以 GPU 机器上 `scripts/build.py precision=int8` 得到 torch 的 int8）。"""

    kind: str = artifact_field("onnxruntime")
    # 产物选项：torch 引擎 int8 的 .pt2 底本按设备定（GPU bf16、CPU fp32），门禁也在这个设备上跑
    device: str = artifact_field("auto")  # auto / cpu / cuda
    # true：在 NVIDIA 的 Triton 容器里用原生平台托管（onnxruntime_onnx / tensorrt_plan）；
    # false：python backend 运行器（内嵌服务器只有 python backend）。tensorrt 总是原生托管。
    # 只改仓库里的托管方式（同一个引擎文件），不是产物选项
    native: bool = False
    num_threads: int = 0  # onnxruntime 每个实例的线程数；0 = onnxruntime 默认
    # torch 引擎：torch.compile 模式（none = eager；编译用 dynamic=True 只做一次）与 CUDA Graph 桶
    # （动态批处理形成的 batch 与长度向上取整到桶）。朴素基线：compile_mode=none cuda_graphs=false
    # 编译、图与桶都在服务进程加载时做（runtime_spec），不是产物选项；只有 fp8 的逐层计划按桶计时（_fp8）
    compile_mode: str = "default"
    cuda_graphs: bool = True
    # 最小桶为 2 而不是 1：dynamic=True 编译会把大小为 1 的维度特化，batch 1 会触发第二次完整编译。
    # 有 4：SLA 点每次 execute 约 3 个请求，没有 4 时补到 8（benchmarks/h100-2026-11-25-run2 的引擎指标）
    batch_buckets: List[int] = artifact_field(default_factory=lambda: [2, 4, 8, 16, 32, 64], when=_fp8)
    seq_buckets: List[int] = artifact_field(default_factory=lambda: [128, 256, 512, 1024], when=_fp8)
    compile_cache_dir: str = ""  # 空 = <build_dir>/compile_cache
    # 一次 execute 的请求按长度分组；true 时按各桶实测的重放时间，在相邻组“合并后填充更多但少一次启动”
    # 更便宜时合并（runtime/batching.plan_groups）。只对有 CUDA Graph 计时的 torch 引擎起作用
    plan_groups: bool = True
    # true：一次 execute 的几组（不同长度桶）各在自己的 CUDA 流上同时重放（小 batch 的图只占一部分 SM）；每个长度桶
    # 有自己的图内存池与捕获流。默认 false（背靠背在同一个流上）：GPU 测试里同时重放与 eager 一致，
    # 但服务上的速度没有测过（benchmarks/h100-2026-11-27/machine7）
    group_streams: bool = False
    # true：torch 引擎导出“拼行”的程序（UGTModel.forward_packed）：一次 execute 的全部历史首尾相接拼进宽为最长者所在
    # 长度桶的行（行内块对角掩码），一次启动、一张 CUDA Graph，不再按长度分组填充。只对 engine=torch 有效，改它要重新导出。
    # Hydra 的 engine=torch / auto 组开它（c=64 +63 %，benchmarks/h100-2026-11-28/machine2）；auto 选了 onnxruntime 时关掉
    # （engines.resolve_auto）。这里的 false 是 Python API 的默认（引擎默认 onnxruntime）
    pack_rows: bool = artifact_field(False)
    # torch 引擎的 int8（torchao，服务时在加载的模块上量化，见 runtime/engines/torch_int8.py）：
    # dynamic = 按行动态 int8 激活 + 按通道 int8 权重；weight_only = 只量化权重。打分头与嵌入不量化。
    # auto：GPU 上 weight_only（两种都比 fp16 慢，约 0.6 / 0.15 倍，benchmarks/h100-2026-11-27/machine4、machine6），
    # CPU 上 dynamic（engines/torch.int8_modes）。量化在加载时做，但门禁验的是这一种量化，所以算产物选项
    int8_mode: str = artifact_field("auto")
    # GPU 上 int8 的编译方式（代替 compile_mode）：none = eager + CUDA Graph；torch.compile 量化后的模块
    # 几分钟内编不完（benchmarks/h100-2026-11-27/machine2），测过、能用的是 none
    gpu_int8_compile_mode: str = "none"
    # torch 引擎的 fp8（runtime/engines/torch_fp8.py）：.pt2 的底本精度（bf16：按行缩放的 _scaled_mm 测过的输出类型；
    # fp16 的输出没有测过）与 GPU 上的编译方式（none = eager + CUDA Graph，量化的层走 Triton 的按行量化 + _scaled_mm）
    fp8_base: str = artifact_field("bf16")
    gpu_fp8_compile_mode: str = "none"
    # 8 位的逐层选择（engines/layer_choice.py）：timed = 构建时在本设备上按各桶实际的行数计时，只量化 8 位更快的层
    # （每层从某个行数起）；all = 所有可量化的层都量化（对照与测试用）
    fp8_layers: str = artifact_field("timed")
    # 计时选择的门槛：8 位至少快这么多倍才用（低于它的差别在计时噪声里，量化还多一份权重的显存）
    layer_choice_min_speedup: float = artifact_field(1.05)
    # 构建后的速度检查（speed_check.py）：8 位引擎（int8 / fp8）与同一模型的 fp16 引擎在同一设备上比离线吞吐，
    # 比值写进 build_info.json 与日志。auto = 只在 GPU 上的 torch 引擎做（CPU 上记下跳过的原因），on / off 强制。
    # 只是报告（不改引擎、不拦构建），不是产物选项
    speed_check: str = "auto"
    speed_check_batches: List[int] = field(default_factory=lambda: [8, 16, 64])
    speed_check_repeats: int = 5
    # 长度桶的规划：0 = 按 seq_buckets 原样；N > 0 = 构建时按压测的长度分布（benchmark.length_*）规划至多 N 个桶，
    # 使期望的填充后计算量最小（bucket_plan.plan_seq_buckets，最后一个桶为 export.max_seq_length），代替 seq_buckets；
    # engine=tensorrt 时 TensorRT 的优化 profile 也由它得出（每个桶一个，opt 长度 = 桶长，optimize_trt.trt_profiles），
    # 代替 trt_seq_splits；这时 opt_seq_length 只决定 int8 校准用哪个 profile
    seq_bucket_plan: int = artifact_field(0)
    seq_bucket_align: int = artifact_field(16)
    # tensorrt：以下都进计划文件（工作区大小也影响 TensorRT 选的内核）
    workspace_gb: float = artifact_field(4.0)
    fp32_layers: bool = artifact_field(True)  # softmax / layernorm / 打分路径保持 fp32
    opt_batch_size: int = artifact_field(32)
    opt_seq_length: int = artifact_field(128)
    # 按长度切分优化 profile：[1, 256] 与 [257, max_seq_length] 各一个（长尾分布里短历史居多，内核按各段的 opt 调优）；
    # seq_bucket_plan > 0 时不用（profile 跟着规划的桶走）
    trt_seq_splits: List[int] = artifact_field(default_factory=lambda: [256])
    calibration_batches: int = artifact_field(16)  # int8 校准（onnxruntime 与 TensorRT）

    def __post_init__(self) -> None:
        _choice("engine", "kind", self.kind, ENGINES)
        _choice("engine", "device", self.device, ("auto", "cpu", "cuda"))
        if self.native and self.kind == "torch":
            raise ConfigError("engine.native=true 不支持 engine.kind=torch（它只能由 python backend 运行器托管）")
        if self.pack_rows and self.kind not in ("torch", "auto"):
            raise ConfigError(f"engine.pack_rows=true 只对 engine.kind=torch 有效（拼行的程序由 torch 引擎导出），"
                              f"得到 engine.kind={self.kind}")
        _positive("engine", "num_threads", self.num_threads, allow_zero=True)
        _choice("engine", "compile_mode", self.compile_mode,
                ("none", "default", "max-autotune-no-cudagraphs", "max-autotune"))
        _positive("engine", "workspace_gb", self.workspace_gb)
        _positive("engine", "calibration_batches", self.calibration_batches)
        for name in ("batch_buckets", "seq_buckets"):
            b = list(getattr(self, name))
            if not b or b != sorted(set(b)) or b[0] < 1:
                raise ConfigError(f"engine.{name} 应为严格递增的正整数列表，得到 {b}")
        splits = list(self.trt_seq_splits)
        if splits != sorted(set(splits)) or (splits and splits[0] < 1):
            raise ConfigError(f"engine.trt_seq_splits 应为严格递增的正整数列表（可为空），得到 {splits}")
        _choice("engine", "int8_mode", self.int8_mode, ("auto", "dynamic", "weight_only"))
        _choice("engine", "gpu_int8_compile_mode", self.gpu_int8_compile_mode,
                ("none", "default", "max-autotune-no-cudagraphs", "max-autotune"))
        _choice("engine", "fp8_base", self.fp8_base, ("bf16", "fp16"))
        _choice("engine", "gpu_fp8_compile_mode", self.gpu_fp8_compile_mode,
                ("none", "default", "max-autotune-no-cudagraphs", "max-autotune"))
        _choice("engine", "fp8_layers", self.fp8_layers, ("timed", "all"))
        _positive("engine", "layer_choice_min_speedup", self.layer_choice_min_speedup)
        _choice("engine", "speed_check", self.speed_check, SPEED_CHECKS)
        if not self.speed_check_batches or any((not isinstance(b, int)) or b < 1 for b in self.speed_check_batches):
            raise ConfigError(f"engine.speed_check_batches 应为非空的正整数列表，得到 {list(self.speed_check_batches)}")
        _positive("engine", "speed_check_repeats", self.speed_check_repeats)
        _positive("engine", "seq_bucket_plan", self.seq_bucket_plan, allow_zero=True)
        _positive("engine", "seq_bucket_align", self.seq_bucket_align)
        _positive("engine", "opt_batch_size", self.opt_batch_size)
        _positive("engine", "opt_seq_length", self.opt_seq_length)


@dataclass
class CatalogConfig:
    """物品目录：item id <-> 唯一语义 ID 三元组。path 为空时生成带种子的合成目录。"""

    path: str = artifact_field("")
    num_items: int = artifact_field(20_000)
    seed: int = artifact_field(0)
    # 未知物品 id（不在目录中、或为负）的处理：skip = 跳过并计数；error = 拒绝请求（前处理在服务时做，不是产物选项）
    unknown_item_policy: str = "skip"
    # 受目录约束的 beam search（前缀树掩码进引擎）：只生成目录里存在的物品
    constrained_decoding: bool = artifact_field(True)

    def __post_init__(self) -> None:
        _positive("catalog", "num_items", self.num_items)
        _choice("catalog", "unknown_item_policy", self.unknown_item_policy, UNKNOWN_ITEM_POLICIES)


@dataclass
class TrainConfig:
    """参考检查点的短时带种子训练（让分数像训练过的模型一样尖锐，精度门禁才有意义）。"""

    steps: int = 300
    batch_size: int = 64
    seq_length: int = 32
    lr: float = 3e-3
    seed: int = 0
    device: str = "auto"  # auto：有 GPU 就在 GPU 上训练（ugt_base 在 CPU 上太慢）

    def __post_init__(self) -> None:
        _choice("train", "device", self.device, ("auto", "cpu", "cuda"))
        _positive("train", "steps", self.steps, allow_zero=True)
        for f in ("batch_size", "seq_length", "lr"):
            _positive("train", f, getattr(self, f))


@dataclass
class GateConfig:
    """精度门禁（相对 fp32 PyTorch，在采样的历史上）。

    默认值的理由：fp32 引擎应给出同一组 top-50（允许分数差在 tie_tolerance 内的并列项交换）；
    低精度下 beam search 的边界项可能互换，要求 top-50 集合重合 >= 0.9、top-1 一致 >= 0.95，
    分数（对数概率之和）平均绝对误差 <= 0.05。
    """

    num_samples: int = 64
    fp32_min_overlap: float = 1.0
    min_overlap: float = 0.9
    min_top1_agreement: float = 0.95
    max_score_mae: float = 0.05
    # int8 的门禁更严：量化只动投影与 FFN、打分头留在浮点，测过的 int8 top-50 重合都 >= 0.975、top-1 >= 0.984
    # （fp8 用同一组门槛：同样只量化投影与 FFN；fp8 的门禁数字还没有测过）
    int8_min_overlap: float = 0.95
    int8_min_top1_agreement: float = 0.97
    tie_tolerance: float = 1e-4
    # fp16 / int8 引擎的并列容差：分数是三个对数概率之和（量级约 -10），fp16 的相对精度约 1e-3，
    # 参考分数相差小于 0.01 的两项在低精度下互换名次不是模型给出了不同的推荐
    low_precision_tie_tolerance: float = 0.01

    def __post_init__(self) -> None:
        _positive("gates", "num_samples", self.num_samples)
        for f in ("fp32_min_overlap", "min_overlap", "min_top1_agreement", "int8_min_overlap", "int8_min_top1_agreement"):
            v = getattr(self, f)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"gates.{f} 应在 [0, 1] 内，得到 {v}")
        _positive("gates", "max_score_mae", self.max_score_mae, allow_zero=True)
        _positive("gates", "tie_tolerance", self.tie_tolerance, allow_zero=True)
        _positive("gates", "low_precision_tie_tolerance", self.low_precision_tie_tolerance, allow_zero=True)


@dataclass
class ServerConfig:
    """内嵌 Triton（nvidia-pytriton 自带的 tritonserver 二进制）。端口 0 = 自动选空闲端口。"""

    host: str = "127.0.0.1"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    startup_timeout_s: float = 180.0
    log_verbose: int = 0
    # 监护：Triton 2.51 的 python backend 不会重启被杀死的存根进程（请求一直得到 "Stub process is not healthy"）。
    # 开启时服务器以 explicit 模型控制模式启动（启动时加载全部模型），后台线程每 supervise_interval_s 秒检查
    # 各 python 模型的存根进程，发现死掉的就通过模型仓库 API 重新加载该模型（产生新的存根）。
    supervise: bool = True
    supervise_interval_s: float = 0.5
    # 停止时等在途请求的上限（--exit-timeout-secs）：请求打到已死的存根时旧版本模型一直算“在用”，停止要等满这么久
    exit_timeout_s: float = 30.0
    # CUDA MPS：服务器自己起停一个私有的 MPS 守护进程，引擎几个实例（各一个进程）的内核可以同时在 GPU 上跑（mps.py）。
    # auto：python 引擎在一块 GPU 上有 >= 2 个实例、有 nvidia-cuda-mps-control、没有别的 MPS 守护进程时开（CPU 上总是关）；
    # true：总是开（没有控制程序时报错）；false：不开。auto 的理由：中位数不比不开差、有时好很多，但范围更宽
    # （benchmarks/h200-2026-11-28-run2、h200-2026-11-28-run3 的 sweep）；要稳定的尾部用 false
    mps: str = "auto"

    def __post_init__(self) -> None:
        for f in ("http_port", "grpc_port", "metrics_port"):
            v = getattr(self, f)
            if not 0 <= v < 65536:
                raise ConfigError(f"server.{f} 应在 [0, 65535] 内，得到 {v}")
        _positive("server", "startup_timeout_s", self.startup_timeout_s)
        _positive("server", "supervise_interval_s", self.supervise_interval_s)
        _positive("server", "exit_timeout_s", self.exit_timeout_s, allow_zero=True)
        # Hydra 把命令行的 true / false 解析成布尔值，写进字符串字段时成了 "True" / "False"
        m = str(self.mps).strip().lower()
        self.mps = {"1": "true", "on": "true", "yes": "true", "0": "false", "off": "false", "no": "false"}.get(m, m)
        if self.mps not in ("auto", "true", "false"):
            raise ConfigError(f"server.mps 应为 auto、true 或 false，得到 {self.mps!r}")


@dataclass
class BenchmarkConfig:
    """压测：开环（泊松到达）、闭环并发扫描、SLA 搜索。"""

    url: str = ""  # 空 = 启动内嵌服务器；否则为已运行服务器的 gRPC 地址 host:port
    target: str = "ensemble"  # ensemble（原始历史）| engine（六个输入直接发给引擎）
    protocol: str = "grpc"
    num_requests: int = 2000
    seed: int = artifact_field(0, when=_planned_buckets)  # 规划长度桶时也用这个种子抽长度
    # 历史长度：对数正态，中位数 length_median，形状 length_sigma，截断到 [1, max_seq_length]。
    # 门禁与 int8 校准的历史、规划的长度桶也按它采样：int8 或规划长度桶时是产物选项（其余时候门禁的采样不算）
    length_median: float = artifact_field(100.0, when=_lengths_in_artifact)
    length_sigma: float = artifact_field(1.0, when=_lengths_in_artifact)
    # 开环：每个速率持续 duration_s 秒；rates 为空则只做 SLA 搜索
    rates: List[float] = field(default_factory=list)
    duration_s: float = 5.0
    # 每个负载点的请求数：至少 min_requests 个（P99 之外有 100 个请求），时长至少 duration_s、至多 max_point_s；
    # 样本不够 min_requests 时报告照样给出 P99 的 95% 置信区间（次序统计量），SLA 按区间上界判定
    min_requests: int = 10_000
    max_point_s: float = 20.0
    # 闭环并发扫描
    concurrency: List[int] = field(default_factory=lambda: [1, 4, 16])
    # SLA 搜索：从 sla_start_rate 开始加倍直到 P99 超标，再二分 sla_steps 步
    sla_search: bool = True
    sla_start_rate: float = 20.0
    sla_max_rate: float = 100_000.0
    sla_steps: int = 4
    # 搜索不低于这个速率（0 = sla_start_rate / 64）：低速率的点要很久才凑够判定所需的样本
    sla_min_rate: float = 0.0
    # SLA 的目标（毫秒）；0 = export.target_latency_ms（用户的目标）。CPU 上的检查预设用更宽的目标，报告写明用了哪个
    slo_ms: float = 0.0
    max_error_rate: float = 0.001
    # 搜索得到的速率再用新的随机种子独立重测一次确认（不过就降 10% 再测，最多 3 次）
    sla_confirm: bool = True
    # 整套测量重复几次；报告每个主要数字的中位数与范围
    repeats: int = 1
    # 轻负载点（P99 / P50 之比看长尾）；0 = 不测
    light_rate: float = 50.0
    light_duration_s: float = 10.0
    # 地板：同一发压端、同样速率下打一个不做计算、与 ensemble 同 I/O 的模型（ugt_floor），得到客户端与 Triton 前端的份额
    floor: bool = True
    # Triton 追踪（TIMESTAMPS）：每次重复的轻负载点与 SLA 确认之后同一速率上单独的一个点（确认点本身不开），每 trace_rate 个请求追踪一个；0 = 不追踪
    trace_rate: int = 10
    # SLA 速率上的追踪点：auto = Triton >= 2.57 时测（更早的版本高速率追踪会让服务器崩溃后卡死，内嵌的是 2.51，
    # 见 docs/limits.md），on = 照测（自担风险），off = 不测。轻负载点（每秒几个被追踪的请求）照常追踪
    trace_sla_point: str = "auto"
    processes: int = 1  # 发压进程数
    warmup_requests: int = 50
    timeout_s: float = 10.0
    output_dir: str = ""  # 空 = <build_dir>/benchmark
    perf_analyzer: bool = False  # 若已安装 perf_analyzer，在同一模型上运行并并列其结果
    # 引擎离线吞吐：按长度分布抽这么多条历史（分组后每组成批计时）；0 = 不测
    offline_samples: int = 2000
    # 算 MFU 用的设备峰值（TFLOP/s，按引擎精度的稠密峰值）；0 = 不算。H100 SXM 的 fp16/bf16 稠密峰值为 989
    peak_tflops: float = 0.0
    # 浸泡：soak_s 秒的开环负载，按 soak_window_s 分窗报告每窗的 P99、错误、服务器 RSS 与 GPU 显存；
    # 速率 soak_rate，0 = soak_fraction x 本次测得的 SLA 速率（各次重复的中位数；没有确认过的点时用搜索得到的速率并写明
    # 未确认，bench/app.soak_sla_rate）。0 秒 = 不做
    soak_s: float = 0.0
    soak_rate: float = 0.0
    soak_fraction: float = 0.7
    soak_window_s: float = 60.0
    # 浸泡时每 soak_trace_rate 个请求追踪一个（0 = 不追踪），每窗报告最慢 1% 与最慢一个被追踪请求的分解：偶发的停顿停在哪一步
    soak_trace_rate: int = 0
    # 过载：overload_factor x SLA 速率（同上：测得的中位数，或 soak_rate / soak_fraction），overload_s 秒；
    # 报告被拒比例、被拒得多快、被接受请求的延迟与 >= 400 ms 的台阶。0 秒 = 不做
    overload_s: float = 0.0
    overload_factor: float = 2.0

    def __post_init__(self) -> None:
        _choice("benchmark", "target", self.target, BENCH_TARGETS)
        _choice("benchmark", "protocol", self.protocol, PROTOCOLS)
        _choice("benchmark", "trace_sla_point", self.trace_sla_point, TRACE_SLA_POINT)
        for f in ("num_requests", "min_requests", "length_median", "duration_s", "sla_start_rate", "sla_max_rate",
                  "processes", "timeout_s", "repeats", "max_point_s", "light_duration_s"):
            _positive("benchmark", f, getattr(self, f))
        _positive("benchmark", "length_sigma", self.length_sigma, allow_zero=True)
        _positive("benchmark", "sla_steps", self.sla_steps, allow_zero=True)
        _positive("benchmark", "warmup_requests", self.warmup_requests, allow_zero=True)
        _positive("benchmark", "peak_tflops", self.peak_tflops, allow_zero=True)
        _positive("benchmark", "offline_samples", self.offline_samples, allow_zero=True)
        _positive("benchmark", "light_rate", self.light_rate, allow_zero=True)
        _positive("benchmark", "sla_min_rate", self.sla_min_rate, allow_zero=True)
        _positive("benchmark", "slo_ms", self.slo_ms, allow_zero=True)
        _positive("benchmark", "trace_rate", self.trace_rate, allow_zero=True)
        for f in ("soak_s", "soak_rate", "overload_s", "soak_trace_rate"):
            _positive("benchmark", f, getattr(self, f), allow_zero=True)
        for f in ("soak_fraction", "soak_window_s", "overload_factor"):
            _positive("benchmark", f, getattr(self, f))
        if not 0 <= self.max_error_rate < 1:
            raise ConfigError(f"benchmark.max_error_rate 应在 [0, 1) 内，得到 {self.max_error_rate}")
        if any(r <= 0 for r in self.rates):
            raise ConfigError(f"benchmark.rates 应为正数，得到 {list(self.rates)}")
        if any(c < 1 for c in self.concurrency):
            raise ConfigError(f"benchmark.concurrency 应为正整数，得到 {list(self.concurrency)}")


@dataclass
class ServingConfig:
    """顶层配置：一次构建/服务/压测所需的一切。跨节的约束在这里校验。"""

    # 整节都是产物选项的：model、train（检查点）、gates（构建的判定：换了门槛，旧构建没有按它检查过）
    model: UGTConfig = artifact_field(default_factory=UGTConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    triton: TritonConfig = field(default_factory=TritonConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    train: TrainConfig = artifact_field(default_factory=TrainConfig)
    gates: GateConfig = artifact_field(default_factory=GateConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    build_dir: str = "build"
    checkpoint: str = artifact_field("")  # 空 = <build_dir>/checkpoints/<model.name>.pt（不存在时生成参考检查点）
    seed: int = artifact_field(0)

    def __post_init__(self) -> None:
        if self.export.max_seq_length > self.model.max_seq_length:
            raise ConfigError(f"export.max_seq_length ({self.export.max_seq_length}) 不能大于 "
                              f"model.max_seq_length ({self.model.max_seq_length})")
        too_big = [s for s in self.triton.preferred_batch_sizes if s > self.export.max_batch_size]
        if too_big:
            raise ConfigError(f"triton.preferred_batch_sizes 中 {too_big} 大于 export.max_batch_size "
                              f"({self.export.max_batch_size})")
        max_items = self.catalog.num_items
        cap = self.model.codebook_sizes[0] * self.model.codebook_sizes[1] * self.model.codebook_sizes[2]
        if not self.catalog.path and max_items > cap:
            raise ConfigError(f"catalog.num_items ({max_items}) 超过语义 ID 空间 ({cap})")
        if self.triton.engine_pipeline_depth > 1 and (self.engine.native or self.engine.kind == "tensorrt"):
            raise ConfigError("triton.engine_pipeline_depth > 1 只对 python 运行器托管的引擎有效（engine.native=false 的 "
                              f"torch / onnxruntime）；engine.kind={self.engine.kind}、native={self.engine.native} "
                              "由 Triton 的原生后端托管，用 triton.instance_count 让几批同时在途；预设 triton=h100 设了 2，"
                              "与原生后端一起用时加 triton.engine_pipeline_depth=1")
        if self.export.precision == "fp8" and self.engine.kind not in ("torch", "auto"):
            raise ConfigError(f"export.precision=fp8 只有 engine.kind=torch 支持（Hopper GPU 上的 torch._scaled_mm），"
                              f"得到 engine.kind={self.engine.kind}；这个引擎请用 precision=fp16 或 int8")


    def contract(self) -> EngineContract:
        """服务的引擎契约：长度上限取 export.max_seq_length（可小于模型的上限），其余来自模型结构。"""
        m = self.model
        return EngineContract(max_seq_length=self.export.max_seq_length, codebook_sizes=tuple(m.codebook_sizes),
                              num_token_types=m.num_token_types, top_k=m.top_k)

    def seq_buckets(self) -> List[int]:
        """有效的长度桶：小于 export.max_seq_length 的 engine.seq_buckets，再加上 max_seq_length 本身。"""
        limit = self.export.max_seq_length
        if self.engine.seq_bucket_plan:
            from algorithm.serving.bucket_plan import default_lengths, model_cost, plan_seq_buckets

            b = self.benchmark
            lengths = default_lengths(b.length_median, b.length_sigma, limit, 100_000, b.seed)
            return [int(x) for x in plan_seq_buckets(lengths, self.engine.seq_bucket_plan, limit,
                                                     self.engine.seq_bucket_align,
                                                     **({"cost": model_cost(self.model, self.export.decoder_kv_cache)}
                                                        if self.model.source == "reference" else {}))]
        return sorted({b for b in self.engine.seq_buckets if b < limit} | {limit})

    def batch_buckets(self) -> List[int]:
        """有效的 batch 桶：小于 export.max_batch_size 的 engine.batch_buckets，再加上 max_batch_size 本身。
        导出的程序只接受 batch <= max_batch_size：更大的桶在捕获 CUDA Graph 时只会得到 torch.export 的守卫错误。"""
        limit = self.export.max_batch_size
        return sorted({b for b in self.engine.batch_buckets if b < limit} | {limit})

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ServingConfig":
        """to_dict 的逆：各节重建为同样的 dataclass（构造时照常校验）；缺的节与字段取 dataclass 的默认值。"""
        hints = typing.get_type_hints(cls)
        kw = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            t = hints[f.name]
            kw[f.name] = t(**d[f.name]) if dataclasses.is_dataclass(t) else d[f.name]
        return cls(**kw)


def _leaves(cls, prefix: str = "", when=None) -> List[Tuple[str, Any]]:
    """cls 的全部叶子：(点分路径, 产物标记)；标记 None = 不是产物选项，True 或条件函数 = 是。
    标在嵌套 dataclass 上的标记传给整棵子树。"""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        mark = when or f.metadata.get(ARTIFACT)
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            out += _leaves(t, f"{prefix}{f.name}.", mark)
        else:
            out.append((prefix + f.name, mark))
    return out


def leaf_paths(cls=None) -> Tuple[str, ...]:
    """配置的全部叶子选项（点分路径）。"""
    return tuple(p for p, _ in _leaves(cls or ServingConfig))


def artifact_paths(cls=None, config: Optional["ServingConfig"] = None) -> Tuple[str, ...]:
    """声明为产物选项的叶子（点分路径）。给了 config 时只列在它上面起作用的（带条件的按 config 判断）。"""
    cls = cls or (type(config) if config is not None else ServingConfig)
    return tuple(p for p, mark in _leaves(cls) if mark and (config is None or mark is True or mark(config)))


def artifact_values(config: "ServingConfig") -> Dict[str, Any]:
    """config 上起作用的产物选项及其值（构建变体的键）。"""
    out = {}
    for path in artifact_paths(config=config):
        v: Any = config
        for k in path.split("."):
            v = getattr(v, k)
        out[path] = copy.deepcopy(v)
    return out


def register_configs() -> None:
    """把结构化配置注册到 Hydra 的 ConfigStore（脚本启动时显式调用，不在导入时做）。"""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="serving_schema", node=ServingConfig)


def to_serving_config(cfg) -> ServingConfig:
    """把 Hydra 的 DictConfig 转成已校验的 ServingConfig（不修改 cfg）。"""
    from omegaconf import OmegaConf

    obj = OmegaConf.to_object(cfg)
    if not isinstance(obj, ServingConfig):
        raise ConfigError("配置未按 serving_schema 组成；conf/config.yaml 的 defaults 应包含 serving_schema")
    return obj

