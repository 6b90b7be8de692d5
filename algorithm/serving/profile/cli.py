"""命令行：python -m algorithm.serving.profile --repo 仓库 --out 目录 [--batches 8,16,64] [--quick] [--only 节,...]。

只解析参数；torch 与各节在 main 里才导入（--help 不加载 torch）。
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict

DESCRIPTION = "torch 引擎的剖析：分阶段耗时与 roofline、SDPA 后端、长度桶的填充、离线吞吐与 MFU、内核表、int8"
# --only 可点的节（"int8" 代表各个 throughput_int8_*）
SECTIONS = ("environment", "load", "stage_check", "stages", "sdpa", "self_attention", "kv_cache", "padding",
            "throughput", "kernels_compiled", "concurrency", "throughput_planned", "throughput_planned_8", "int8")
INT8_MODES = ("dynamic", "weight_only")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m algorithm.serving.profile", description=DESCRIPTION)
    p.add_argument("--repo", required=True, help="已构建的模型仓库（engine=torch）")
    p.add_argument("--out", required=True, help="输出目录（profile.json、profile.md）")
    p.add_argument("--batches", default="", help="离线吞吐的 batch，逗号分隔（默认 8,16,64；--quick 为 2,4）")
    p.add_argument("--quick", action="store_true", help="CPU 上的小规模检查（ugt_tiny）：小形状、1 次重复")
    p.add_argument("--device", default="auto", help="auto / cuda / cpu")
    p.add_argument("--compile-mode", default="", help="覆盖仓库的 compile_mode（例如 none）")
    p.add_argument("--int8-modes", default="dynamic", help="逗号分隔：dynamic、weight_only（各测一节）")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--int8-base", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="int8 量化前的底本精度（auto = 与构建相同：GPU 上 bf16、CPU 上 fp32）")
    p.add_argument("--only", default="", help="逗号分隔的节名（如 throughput,int8），只跑这些节；environment、load 总会跑")
    p.add_argument("--samples", type=int, default=0, help="离线吞吐抽样的历史数（默认 1000；--quick 为 32）")
    p.add_argument("--runner", default="", help="运行器类 模块:类（默认 algorithm.serving.runtime.engines.torch:TorchRunner）")
    p.add_argument("--budget-s", type=float, default=140.0, help="总预算：剩余时间不够的节跳过并写明原因")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """解析并检查 --int8-modes（去重、保序）与 --only（拼错的节名不能悄悄跳过所有节）。"""
    p = build_parser()
    args = p.parse_args(argv)
    modes = list(dict.fromkeys(m for m in args.int8_modes.split(",") if m))
    if not modes or set(modes) - set(INT8_MODES):
        p.error(f"--int8-modes 只能是 dynamic、weight_only（逗号分隔），得到 {args.int8_modes!r}")
    args.int8_modes = ",".join(modes)
    unknown = {x for x in args.only.split(",") if x} - set(SECTIONS)
    if unknown:
        p.error(f"--only 里有未知的节 {sorted(unknown)}；可选 {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> Dict[str, Any]:
    """运行各节并写报告；分阶段版本与 model(...) 不一致时以退出码 3 结束（分阶段耗时不可信）。"""
    args = parse_args(argv)
    from algorithm.serving.profile.run import run_profile

    data = run_profile(args)
    print(f"写入 {os.path.join(args.out, 'profile.json')} 与 profile.md（{data['elapsed_s']:.0f}s）", flush=True)
    if data["sections"].get("stage_check") and not data.get("stage_check_passed"):
        print("分阶段重写与 model(...) 的输出不一致：分阶段耗时不可信（见 profile.json 的 stage_check）", file=sys.stderr)
        sys.exit(3)
    return data
