"""run_profile：按顺序调用各节。一节失败只记进报告；load 失败时后面的节都没有意义，直接结束。"""
from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Any, Dict

from algorithm.serving.profile import attention, checks, int8, kernels, padding, stages, throughput
from algorithm.serving.profile.context import Context
from algorithm.serving.profile.report import Report


def model_sections(rep: Report, ctx: Context) -> None:
    """eager 模型上的各节（不要运行器）。"""
    rep.section("stage_check", partial(checks.stage_check, ctx))
    rep.section("stages", partial(stages.stages, ctx), need_s=5)
    rep.section("sdpa", partial(attention.sdpa, ctx), need_s=5)
    rep.section("self_attention", partial(attention.self_attention, ctx), need_s=5)
    rep.section("kv_cache", partial(attention.kv_cache, ctx), need_s=5)
    rep.section("padding", partial(padding.padding, ctx))


def runner_sections(rep: Report, ctx: Context) -> None:
    """throughput 建运行器；其余几节用它，没建出来（跳过或失败）时不跑、也不记。"""
    gpu = ctx.on_gpu
    rep.section("throughput", partial(throughput.throughput, ctx), need_s=20 if gpu else 0)
    if ctx.runner is None:
        return
    if ctx.packed:  # 拼行的程序不接受 [B, L] 的 6 个输入
        rep.skip("kernels_compiled", kernels.NOT_PACKED)
        rep.skip("concurrency", kernels.NOT_PACKED)
    else:
        rep.section("kernels_compiled", partial(kernels.kernels_compiled, ctx), need_s=5)
        if gpu:
            rep.section("concurrency", partial(kernels.concurrency, ctx), need_s=10)
        else:
            rep.skip("concurrency", kernels.NEEDS_CUDA)
    rep.section("throughput_planned", partial(throughput.planned_throughput, ctx, 4), need_s=20 if gpu else 0)
    # 8 个桶：填充更少，但每个长度组更小、启动更多；测出来才知道哪边赢
    rep.section("throughput_planned_8", partial(throughput.planned_throughput, ctx, 8), need_s=30 if gpu else 0)


def int8_sections(rep: Report, ctx: Context) -> None:
    """每种量化方式（--int8-modes）各一节；没有 torchao 或 --no-int8 时记下原因。"""
    missing = int8.torchao_missing()
    if missing:
        rep.skip("throughput_int8", missing)
    if ctx.args.no_int8:
        rep.skip("throughput_int8", "--no-int8")
        return
    if missing:
        return
    for qmode in ctx.args.int8_modes.split(","):
        rep.section(f"throughput_int8_{qmode}", partial(int8.int8_section, ctx, rep.left, qmode),
                    need_s=60 if ctx.on_gpu else 0)


def run_profile(args: argparse.Namespace) -> Dict[str, Any]:
    """各节的结果写进 <out>/profile.json 与 profile.md，返回同样的数据。"""
    rep = Report(args.out, time.time(), args.budget_s, [x for x in args.only.split(",") if x])
    ctx = Context.create(args)
    rep.section("environment", partial(checks.environment, ctx))
    if rep.section("load", partial(checks.load, ctx)) is None:
        rep.write()
        return rep.data
    ctx.attach_histories()
    model_sections(rep, ctx)
    runner_sections(rep, ctx)
    int8_sections(rep, ctx)
    rep.data["stage_check_passed"] = ctx.stage_ok if "stage_check" in rep.data["sections"] else None
    rep.write()
    return rep.data
