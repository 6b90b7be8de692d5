"""参考 UGT 模型的结构配置（不依赖 torch，Hydra 与检查点共用）。"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

from algorithm.interfaces import DEFAULT_CODEBOOK_SIZES, DEFAULT_NUM_TOKEN_TYPES, DEFAULT_TOP_K, EngineContract
from algorithm.errors import ConfigError


# 模型从哪里来：reference = 本包的参考 UGT（按下面的结构参数构建、训练）；module = 用户的 Python 工厂函数
# （factory）+ 可选检查点；exported = torch.export 的 .pt2（path）；onnx = 已导出的 .onnx（path，只给 onnxruntime / tensorrt 引擎）
MODEL_SOURCES = ("reference", "module", "exported", "onnx")


@dataclass
class UGTConfig:
    """模型：来源（source）与契约（codebook_sizes、max_seq_length、num_token_types、top_k）对任何模型都有效；
    d_model 等结构参数与 beam_width 只属于参考模型（source=reference），默认值即 ugt_tiny（CI 用，CPU 上几秒）。"""

    name: str = "ugt_tiny"
    source: str = "reference"
    # source=module：PACKAGE.MODULE:FUNCTION 或 path/to/file.py:FUNCTION，无参函数，返回 nn.Module
    factory: str = ""
    # source=exported / onnx：.pt2 / .onnx 文件
    path: str = ""
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
        if self.source not in MODEL_SOURCES:
            raise ConfigError(f"model.source = {self.source!r} 不合法；可选 {list(MODEL_SOURCES)}")
        if self.source == "module" and ":" not in self.factory:
            raise ConfigError(f"model.source=module 需要 model.factory=PACKAGE.MODULE:FUNCTION 或 path/to/file.py:FUNCTION，"
                              f"得到 {self.factory!r}")
        if self.source in ("exported", "onnx") and not self.path:
            raise ConfigError(f"model.source={self.source} 需要 model.path=<{'.pt2' if self.source == 'exported' else '.onnx'} 文件>")
        if not self.name or not all(c.isalnum() or c in "_-." for c in self.name):
            raise ConfigError(f"model.name 只能含字母、数字、'_'、'-'、'.'，得到 {self.name!r}")
        for f in ("max_seq_length", "num_token_types", "top_k"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{f} 应为正整数，得到 {v!r}")
        if len(self.codebook_sizes) != 3 or min(self.codebook_sizes) < 1:
            raise ConfigError(f"model.codebook_sizes 应为三个正整数，得到 {list(self.codebook_sizes)}")
        if self.source != "reference":
            return  # 结构参数只属于参考模型：用户的模型由它自己的代码决定
        for f in ("d_model", "num_heads", "num_encoder_layers", "num_decoder_layers", "dim_feedforward", "beam_width"):
            v = getattr(self, f)
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"model.{f} 应为正整数，得到 {v!r}")
        if self.d_model % self.num_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) 应能被 model.num_heads ({self.num_heads}) 整除")
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
