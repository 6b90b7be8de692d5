"""交给 Triton 模型的配置：一个 parameters 键（PARAM_KEY），值为 JSON，
在服务进程里重建成与构建时相同的 dataclass（ServingConfig + RuntimeSpec），不在这里重述任何默认值。"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Mapping, Tuple, Union

from algorithm.errors import ConfigError
from algorithm.serving.config import ServingConfig

PARAM_KEY = "ugt_serving"


@dataclass(frozen=True)
class RuntimeSpec:
    """构建时才能决定、服务进程需要的事实（由 triton_config 按机器与配置算出）。"""

    engine_kind: str
    engine_file: str
    device: str  # cuda / cpu：实例是否在 GPU 上
    seq_buckets: Tuple[int, ...]  # 有效的长度桶（含 max_seq_length）；空 = 不按桶填充
    batch_buckets: Tuple[int, ...]
    pad_in_preprocess: bool  # 原生后端要求同一批同形状：前处理按桶填充
    catalog_file: str
    compile_cache_dir: str
    num_threads: int
    compile_mode: str
    cuda_graphs: bool
    plan_groups: bool  # 引擎按各桶实测耗时合并长度组
    group_streams: bool  # 各长度组在各自的 CUDA 流上同时重放
    precision: str  # int8 时 torch 运行器在加载后用 torchao 量化（int8_mode）
    int8_mode: str
    pack_inputs: bool = False  # 前处理 -> 引擎的 6 个输入拼成一个张量（runtime/packed.py）


def encode(config: ServingConfig, spec: RuntimeSpec) -> str:
    return json.dumps({"config": dataclasses.asdict(config), "runtime": dataclasses.asdict(spec)},
                      ensure_ascii=False, sort_keys=True)


def decode(parameters: Union[str, Mapping]) -> Tuple[ServingConfig, RuntimeSpec]:
    """model_config（Triton 传给 initialize 的 JSON 字符串或已解析的字典）或 {键: 字符串} -> 两个 dataclass。"""
    if isinstance(parameters, str):
        parameters = json.loads(parameters)
    raw = parameters.get("parameters", parameters)
    value = raw.get(PARAM_KEY)
    if isinstance(value, Mapping):
        value = value.get("string_value")
    if not value:
        raise ConfigError(f"config.pbtxt 缺少参数 {PARAM_KEY}（仓库应由 scripts/build.py 生成）")
    d = json.loads(value)
    r = d["runtime"]
    spec = RuntimeSpec(**{**r, "seq_buckets": tuple(r["seq_buckets"]), "batch_buckets": tuple(r["batch_buckets"])})
    return ServingConfig.from_dict(d["config"]), spec


__all__ = ["PARAM_KEY", "RuntimeSpec", "encode", "decode"]
