"""剖析报告：各节的结果、跳过的原因与错误；每节开始与结束都重写 profile.json 与 profile.md。"""
from __future__ import annotations

import json
import os
import time
import traceback
from typing import Any, Callable, Dict, Sequence

import numpy as np

from algorithm.serving.profile.markdown import render_markdown

RUNNING = "运行中被终止（外部超时或进程崩溃）"


class Report:
    ALWAYS = ("environment", "load")  # 其它节的前提：--only 也总会跑

    def __init__(self, out_dir: str, t0: float, budget_s: float, only: Sequence[str] = ()):
        self.out_dir, self.t0, self.budget_s = out_dir, t0, budget_s
        self.only = set(only)  # 非空时只跑这些节（"int8" 代表各个 throughput_int8_*）
        self.data: Dict[str, Any] = {"sections": {}, "skipped": {}, "errors": {}}
        os.makedirs(out_dir, exist_ok=True)

    def left(self) -> float:
        """预算还剩的秒数。"""
        return self.budget_s - (time.time() - self.t0)

    def wanted(self, name: str) -> bool:
        if not self.only or name in self.ALWAYS or name in self.only:
            return True
        return "int8" in self.only and name.startswith("throughput_int8")

    def skip(self, name: str, reason: str) -> None:
        self.data["skipped"][name] = reason

    def section(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        """运行一节，结果记进 sections（失败记进 errors，不影响其它节）；不在 --only 里或预算不够时跳过，返回 None。"""
        if not self.wanted(name):
            self.skip(name, "不在 --only 里")
            return None
        if need_s and self.left() < need_s:
            self.skip(name, f"预算剩 {self.left():.0f}s，少于这一节估计需要的 {need_s:.0f}s")
            print(f"[跳过] {name}：{self.data['skipped'][name]}", flush=True)
            self.write()
            return None
        t = time.time()
        print(f"[{time.time() - self.t0:6.1f}s] {name} ...", flush=True)
        # 先记下“运行中”：进程在这一节里被外部超时杀掉时，profile.json 里看得出停在哪一节
        self.skip(name, RUNNING)
        self.write()
        try:
            result = fn()
            self.data["sections"][name] = result
        except Exception as e:
            result = None
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            print(f"[失败] {name}: {type(e).__name__}: {e}", flush=True)
        self.data["skipped"].pop(name)
        self.data.setdefault("section_seconds", {})[name] = time.time() - t
        self.write()
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = time.time() - self.t0
        with open(os.path.join(self.out_dir, "profile.json"), "w") as f:
            json.dump(self.data, f, ensure_ascii=False, indent=1, default=jsonable)
        try:
            md = render_markdown(self.data)
        except Exception as e:  # 报告格式的问题不应丢掉已测到的数字（profile.json 已写）
            md = f"# torch 引擎剖析\n\nprofile.md 生成失败：{type(e).__name__}: {e}；数字见 profile.json\n"
        with open(os.path.join(self.out_dir, "profile.md"), "w") as f:
            f.write(md)


def jsonable(o):
    """json.dump 的 default：numpy 标量与数组转成 Python 的，其余转成字符串。"""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)
