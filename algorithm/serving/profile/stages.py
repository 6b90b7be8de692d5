"""stages 一节：eager 模型按 forward 的顺序分阶段计时（最大 batch、仓库的各长度桶），每阶段对 roofline 的位置。"""
from __future__ import annotations

import math
from typing import Any, Dict

import numpy as np
import torch

from algorithm.models.ugt import flops_per_request
from algorithm.serving.profile.context import Context
from algorithm.serving.profile.data import to_device
from algorithm.serving.profile.eager import staged_forward
from algorithm.serving.profile.hardware import PEAK_FP16_TFLOPS, PEAK_FP32_TFLOPS
from algorithm.serving.profile.roofline import roofline, stage_costs
from algorithm.serving.profile.timing import StageTimer


def stage_seconds(ctx: Context, x) -> Dict[str, float]:
    """各阶段的中位秒数（repeats 次，前面多跑一次预热）。"""
    runs = []
    with torch.no_grad():
        for r in range(ctx.repeats + 1):
            st = StageTimer(ctx.clock)
            staged_forward(ctx.model, x, st)
            ctx.clock.sync()
            if r:
                runs.append(st.seconds())
    return {k: float(np.median([r[k] for r in runs])) for k in runs[0]}


def stage_row(ctx: Context, b: int, length: int) -> Dict[str, Any]:
    """一个形状 [b, length]：计时、各阶段的 FLOPs 与字节（之和须等于 flops_per_request 的公式）、roofline。"""
    kv = ctx.meta["decoder_kv_cache"]
    med = stage_seconds(ctx, to_device(ctx.hist.batch(b, length, seed=11), ctx.device))
    wbytes = torch.finfo(ctx.dtype).bits // 8
    costs = stage_costs(ctx.cfg, b, length, wbytes, kv)
    total_flops = sum(c["flops"] for c in costs.values())
    assert math.isclose(total_flops, b * flops_per_request(ctx.cfg, length, kv), rel_tol=1e-9), "阶段 FLOPs 之和与公式不符"
    peak = PEAK_FP16_TFLOPS if wbytes == 2 else PEAK_FP32_TFLOPS
    return {"batch": b, "length": length, "dtype": str(ctx.dtype), "repeats": ctx.repeats,
            "total_ms": sum(med.values()) * 1e3, "flops_total": total_flops,
            "peak_tflops": peak, "roofline": roofline(costs, med, peak)}


def stages(ctx: Context) -> Dict[str, Any]:
    b = max(ctx.batches)
    m = ctx.meta
    lengths = [16, 64] if ctx.quick else [L for L in m["seq_buckets"] if L <= m["max_seq_length"]]
    return {f"b{b}xL{L}": stage_row(ctx, b, L) for L in lengths}
