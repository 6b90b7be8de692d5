"""参考 UGT 模型的结构配置（不依赖 torch，Hydra 与检查点共用）。"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

from algorithm.interfaces import DEFAULT_CODEBOOK_SIZES, DEFAULT_NUM_TOKEN_TYPES, DEFAULT_TOP_K, EngineContract
from algorithm.errors import ConfigError


@dataclass
class UGTConfig:
    """TIGER 风格 encoder-decoder 的结构参数；默认值即 ugt_tiny（CI 用，CPU 上几秒）。"""

    name: str = "ugt_tiny"
    d_model: int = 64
    num_heads: int = 4
    num_encoder_layers: int = 2
    num_decoder_layers: int = 1
    dim_feedforward: int = 128
    max_seq_length: int = 1024
    num_token_types: int = DEFAULT_NUM_TOKEN_TYPES
    codebook_sizes: List[int] = field(default_factory=lambda: list(DEFAULT_CODEBOOK_SIZES))
    beam_width: int = DEFAULT_TOP_K
    top_k: int = DEFAULT_TOP_K

    def __post_init__(self) -> None:
        for f in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers",
                  "dim_feedforward", "max_seq_length", "num_token_types", "beam_width", "top_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{f} 应为正整数，得到 {v!r}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) 应能被 model.num_heads ({self.num_heads}) 整除")
        if len(self.codebook_sizes) != 3 or min(self.codebook_sizes) < 1:
            raise ConfigError(f"model.codebook_sizes 应为三个正整数，得到 {list(self.codebook_sizes)}")
        if self.top_k > self.beam_width:
            raise ConfigError(f"model.top_k ({self.top_k}) 不能大于 model.beam_width ({self.beam_width})")
        if self.beam_width > self.codebook_sizes[0]:
            raise ConfigError(
                f"model.beam_width ({self.beam_width}) 不能大于一级码本大小 ({self.codebook_sizes[0]})")

    def contract(self) -> EngineContract:
        """由模型结构派生的引擎契约。"""
        return EngineContract(max_seq_length=self.max_seq_length, codebook_sizes=tuple(self.codebook_sizes),
                              num_token_types=self.num_token_types, top_k=self.top_k)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "UGTConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"未知的模型配置字段 {unknown}；可用字段 {sorted(known)}")
        return cls(**{k: (list(v) if k == "codebook_sizes" else v) for k, v in d.items()})


# 预设只在 conf/model/<名字>.yaml 里声明一次（Hydra 的 model 组直接用它们）；preset() 从同一批文件读，不在这里重述。
PRESET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "conf", "model")


def preset_names() -> List[str]:
    if not os.path.isdir(PRESET_DIR):
        return []
    return sorted(f[:-5] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))


def preset(name: str) -> UGTConfig:
    """按名字取预设：读 conf/model/<name>.yaml（源码检出里；安装成 wheel 时没有 conf/，请直接构造 UGTConfig）。"""
    if name not in preset_names():
        raise ConfigError(f"未知的模型预设 {name!r}；可选 {preset_names()}（{PRESET_DIR}）")
    import yaml

    with open(os.path.join(PRESET_DIR, f"{name}.yaml")) as f:
        return UGTConfig.from_dict(yaml.safe_load(f) or {})
