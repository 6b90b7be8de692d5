"""检查点：模型配置 + state dict（+ 元数据），以 weights_only=True 加载（不执行任意代码）。"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from algorithm.models.config import UGTConfig
from algorithm.models.ugt import UGTModel
from algorithm.errors import ConfigError

FORMAT = "ugt-serving/1"


def save_checkpoint(model: UGTModel, path: str, meta: Optional[Dict[str, Any]] = None) -> str:
    """原子写出（临时文件后 rename）。"""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    payload = {"format": FORMAT, "config": model.cfg.to_dict(),
               "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
               "meta": dict(meta or {})}
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str, map_location: str = "cpu") -> Tuple[UGTModel, Dict[str, Any]]:
    """读取检查点 -> (eval 模式的模型, 元数据)。"""
    if not os.path.isfile(path):
        raise ConfigError(f"检查点不存在：{path}")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ConfigError(f"{path} 不是 {FORMAT} 格式的检查点（需要 config + state_dict）")
    cfg = UGTConfig.from_dict(payload["config"])
    model = UGTModel(cfg)
    missing, unexpected = model.load_state_dict(payload["state_dict"], strict=False)
    if missing or unexpected:
        raise ConfigError(f"{path}: state_dict 与配置不符，缺少 {missing[:5]}，多余 {unexpected[:5]}")
    return model.eval(), dict(payload.get("meta", {}))
