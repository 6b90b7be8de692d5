"""padding 一节：默认长度分布下仓库的 seq 桶与 bucket_plan 规划的 4 / 8 个桶的填充，一次 execute 的填充与拼行估算。"""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np

from algorithm.serving.bucket_plan import default_lengths, execute_padding, model_cost, padding_report, plan_seq_buckets
from algorithm.serving.profile.context import Context


def length_dist(ctx: Context) -> np.ndarray:
    """默认长度分布的 10 万个样本（填充一节与规划桶的吞吐共用）。"""
    m = ctx.meta
    return ctx.cached("lengths", lambda: default_lengths(m["length_median"], m["length_sigma"], m["max_seq_length"],
                                                         100_000, seed=0))


def planned(ctx: Context, n: int) -> List[int]:
    """bucket_plan 在默认分布下规划的 n 个长度桶（算一次）。"""
    return ctx.cached(f"planned_{n}", lambda: plan_seq_buckets(length_dist(ctx), n, ctx.meta["max_seq_length"]))


def bucket_rows(ctx: Context, flops) -> List[Dict[str, Any]]:
    """仓库的桶与规划的 4 / 8 个桶：填充 token 的比例、二次代价模型与 FLOPs 模型下的代价比、各桶的请求占比。"""
    lengths = length_dist(ctx)
    rows = []
    for name, buckets in (("仓库", ctx.meta["seq_buckets"] or [ctx.meta["max_seq_length"]]),
                          ("规划 4 桶", planned(ctx, 4)), ("规划 8 桶", planned(ctx, 8))):
        r = padding_report(lengths, buckets)
        r["flops_ratio"] = padding_report(lengths, buckets, flops)["cost_ratio"]
        r["name"] = name
        r["request_share"] = {k: round(v, 3) for k, v in r["request_share"].items()}
        rows.append(r)
    return rows


def per_execute(ctx: Context) -> List[Dict[str, Any]]:
    """服务时一次 execute 的填充（按长度分组、行数补到 batch 桶）与几种拼行宽的估算：编码器去填充值不值得做。"""
    m = ctx.meta
    seq, bb = m["seq_buckets"] or [m["max_seq_length"]], m["batch_buckets"] or [1]
    return [execute_padding(length_dist(ctx), b, seq, bb, pack_width=w, trials=200 if ctx.quick else 2000)
            for b in sorted({2, *ctx.batches}) for w in (0, -1, 256, 512) if w <= m["max_seq_length"]]


def padding(ctx: Context) -> Dict[str, Any]:
    flops = model_cost(ctx.cfg, ctx.meta["decoder_kv_cache"])
    return {"rows": bucket_rows(ctx, flops), "mean_flops_unpadded": float(np.mean(flops(length_dist(ctx)))),
            "planned_4": planned(ctx, 4), "per_execute": per_execute(ctx)}
