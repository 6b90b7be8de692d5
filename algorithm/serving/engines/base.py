"""构建期引擎模块共用的两个小类型。"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass(frozen=True)
class EngineHosting:
    """引擎在 Triton 里的托管方式：platform 为空 = python backend 运行器；filename 为版本目录里的引擎文件。"""

    platform: str
    filename: str

    @property
    def python_runner(self) -> bool:
        return not self.platform


@dataclass
class BuiltEngine:
    """一次引擎构建的结果：产物路径、给门禁用的运行器、（可选）计时对照的 fp32 运行器与附加报告。"""

    artifact: str
    runner: Any
    baseline: Optional[Any] = None
    reports: Dict[str, Any] = field(default_factory=dict)
