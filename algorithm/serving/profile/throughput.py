"""离线吞吐：仓库的 TorchRunner 按长度组成批的吞吐、MFU 与门禁（throughput），同一运行器换成规划的桶（throughput_planned*）。
运行器的构造（make_runner）与离线测量（offline）、门禁（gates）也给 int8 一节用。"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from algorithm.models.ugt import flops_per_request
from algorithm.serving.accuracy import compare_topk
from algorithm.serving.bench.offline import grouped_seconds
from algorithm.serving.bucket_plan import model_cost
from algorithm.serving.profile.context import Context
from algorithm.serving.profile.data import to_device
from algorithm.serving.profile.eager import eager_from_pt2
from algorithm.serving.profile.padding import planned
from algorithm.serving.runtime.buckets import round_up

GATE_BATCH = 16


def pool(ctx: Context) -> List[np.ndarray]:
    """离线吞吐抽样的历史（--samples；默认 1000，--quick 32）。"""
    n = ctx.args.samples or (32 if ctx.quick else 1000)
    return ctx.cached("pool", lambda: ctx.hist.sample(n, seed=99))


def mean_flops(ctx: Context) -> float:
    """抽样历史的平均每请求 FLOPs（不含填充）：MFU 的分子。"""
    m = ctx.meta
    return ctx.cached("mean_flops", lambda: float(np.mean(
        [flops_per_request(ctx.cfg, min(len(h), m["max_seq_length"]), m["decoder_kv_cache"]) for h in pool(ctx)])))


def make_runner(ctx: Context, mode: str, graphs: bool, transform=None, path: str = "") -> Tuple[Any, str]:
    """按构造函数建运行器（warmup=False：CUDA Graph 在首次运行时按需捕获）。transform 在加载后、编译前作用于模块；
    运行器没有 transform 参数（旧版）时，在首次调用前替换 module/fn（torch.compile 是惰性的）。返回 (运行器, 做法)。"""
    m, Runner, sig = ctx.meta, ctx.runner_cls, ctx.runner_params()
    kw = dict(device=ctx.device.type, device_id=ctx.device.index or 0, compile_mode=mode, cuda_graphs=graphs,
              batch_buckets=m["batch_buckets"], seq_buckets=m["seq_buckets"], cache_dir=m["compile_cache_dir"],
              warmup=False)
    kw = {k: v for k, v in kw.items() if k in sig}
    path = path or m["engine_file"]
    # TorchRunner.load 按程序选分组 / 拼行的类；--runner 给的类没有 load 时直接构造
    open_runner = getattr(Runner, "load", Runner)
    if transform is not None and "transform" in sig:
        return open_runner(path, ctx.cfg.contract(), transform=transform, **kw), "TorchRunner(transform=...)"
    runner = open_runner(path, ctx.cfg.contract(), **kw)
    if transform is None:
        return runner, "TorchRunner"
    runner.module = transform(runner.module)
    runner.fn = runner.module if mode == "none" else torch.compile(runner.module, mode=mode, dynamic=True)
    return runner, "TorchRunner，首次调用前替换 module/fn"


def offline(ctx: Context, runner, seq_buckets: Sequence[int], label: str, peak_tflops: float) -> Dict[str, Any]:
    """抽样历史按长度桶分组；每个 batch：各组一次运行的中位秒数，吞吐 = b / Σ_k p_k t_k(b)，MFU 与含填充的利用率。"""
    groups: Dict[int, List[np.ndarray]] = {}
    histories = pool(ctx)
    for h in histories:
        groups.setdefault(round_up(len(h), sorted(seq_buckets)), []).append(h)
    share = {k: len(v) / len(histories) for k, v in groups.items()}
    flops_fn = model_cost(ctx.cfg, ctx.meta["decoder_kv_cache"])
    rows = []
    for b in ctx.batches:
        per = grouped_seconds(groups, b, ctx.repeats, runner.run, ctx.hist.encode)
        rps = b / sum(share[k] * t for k, t in per.items())
        padded = sum(share[k] * float(flops_fn(np.array([k]))[0]) for k in per)
        rows.append({"batch": b, "req_per_s": rps, "mfu": rps * mean_flops(ctx) / (peak_tflops * 1e12),
                     "hw_util": rps * padded / (peak_tflops * 1e12),
                     "ms_by_bucket": {str(k): round(t * 1e3, 3) for k, t in sorted(per.items())}})
    return {"label": label, "seq_buckets": list(seq_buckets),
            "length_share": {str(k): v for k, v in sorted(share.items())},
            "rows": rows, "mean_flops_per_request": mean_flops(ctx), "peak_tflops": peak_tflops}


def gate_feeds(ctx: Context) -> List[Dict[str, np.ndarray]]:
    """门禁的历史：与构建门禁同一种子与长度分布，每 16 条一批。"""
    def make():
        n = 32 if ctx.quick else 64
        hist = ctx.hist.sample(n, seed=4242)
        return [ctx.hist.encode(hist[i:i + GATE_BATCH]) for i in range(0, n, GATE_BATCH)]
    return ctx.cached("gate_feeds", make)


def _reference_model(ctx: Context):
    """fp32 的参考：检查点（按仓库的设置挂目录约束），没有检查点时 .pt2 的权重升到 fp32。返回 (模型, 来源)。"""
    m = ctx.meta
    if m["checkpoint"]:
        from algorithm.models.checkpoint import load_checkpoint

        model, _ = load_checkpoint(m["checkpoint"])
        if m["constrained"]:
            model.attach_catalog(ctx.hist.catalog.semantic_ids)
        return model, f"检查点 {m['checkpoint']}（fp32）"
    return eager_from_pt2(ctx.gm, m["model"], m["decoder_kv_cache"]), ".pt2 的权重升到 fp32（没有找到检查点）"


def reference_outputs(ctx: Context) -> Tuple[np.ndarray, np.ndarray, str]:
    """门禁历史上 fp32 参考的 (recommendations, scores, 来源)，算一次。"""
    def make():
        model, source = _reference_model(ctx)
        model = model.float().to(ctx.device).eval()
        with torch.no_grad():
            outs = [model(*to_device(f, ctx.device)) for f in gate_feeds(ctx)]
        return (np.concatenate([o[0].cpu().numpy() for o in outs]),
                np.concatenate([o[1].float().cpu().numpy() for o in outs]), source)
    return ctx.cached("ref", make)


def gates(ctx: Context, runner) -> Dict[str, Any]:
    """运行器对 fp32 参考的门禁数字（top-50 重合、top-1 一致、分数误差）。"""
    ref_rec, ref_scores, source = reference_outputs(ctx)
    outs = [runner.run(f) for f in gate_feeds(ctx)]
    cmp = compare_topk(ref_rec, ref_scores, np.concatenate([o[0] for o in outs]),
                       np.concatenate([o[1] for o in outs]), 0.01)
    return {**cmp.to_dict(), "reference": source}


def throughput(ctx: Context) -> Dict[str, Any]:
    """仓库的 TorchRunner（仓库的编译与 CUDA Graph 设置）：建好后留在 ctx.runner 给后面几节。"""
    t = time.time()
    m, peak = ctx.meta, ctx.peak_tflops
    ctx.runner, _ = make_runner(ctx, ctx.compile_mode, m["cuda_graphs"])
    label = (f"仓库的 TorchRunner（{ctx.compile_mode}，CUDA Graph {'开' if ctx.graphs_on else '关'}），"
             f"桶 {m['seq_buckets']}")
    res = offline(ctx, ctx.runner, m["seq_buckets"], label, peak)
    res["seconds_incl_compile"] = time.time() - t
    res["gates"] = gates(ctx, ctx.runner)
    res["note"] = (f"{len(pool(ctx))} 条历史按长度组成批；吞吐 = b / Σ_k p_k t_k(b)；MFU 以 {peak:g} TFLOP/s 为峰值，"
                   f"分子用未填充的 FLOPs（{mean_flops(ctx):.3g}/请求），“含填充”用桶长的 FLOPs。")
    return res


def planned_throughput(ctx: Context, n: int) -> Dict[str, Any]:
    """同一个运行器（已编译，dynamic=True）只换成规划的 n 个长度桶：新的桶在首次运行时惰性捕获；测完换回。"""
    runner, buckets = ctx.runner, planned(ctx, n)
    original: Optional[Sequence[int]] = ctx.meta["seq_buckets"]
    runner.seq_buckets = type(runner.seq_buckets)(sorted(buckets))
    try:
        res = offline(ctx, runner, buckets, f"规划的 {n} 个桶 {buckets}（同一运行器，只换桶）", ctx.peak_tflops)
    finally:
        runner.seq_buckets = type(runner.seq_buckets)(original)
    res["note"] = "与“仓库的 TorchRunner”同一运行器、同一批历史，只把 seq 桶换成 bucket_plan 的结果。"
    return res
