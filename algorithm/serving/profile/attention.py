"""注意力与解码器的三节：sdpa（加性掩码下各 SDPA 后端）、self_attention（显式 softmax 对 SDPA）、
kv_cache（KV 缓存对每步重算前缀）。后两节是同一进程、同一权重与历史的 eager 对照（eager_ab）。"""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from algorithm.serving.accuracy import compare_topk
from algorithm.serving.profile.context import Context
from algorithm.serving.profile.data import to_device

ATTENTION_OP_WORDS = ("scaled_dot_product", "attention", "fmha", "flash", "cudnn")


def sdpa_shapes(ctx: Context) -> Dict[str, Tuple[int, int, int]]:
    """名字 -> (batch, 查询长度, 键长度)：编码器自注意力两个长度，与步 3 的交叉注意力。"""
    b = max(ctx.batches)
    shapes = {"encoder b{}xL{}".format(b, L): (b, L, L) for L in ([16, 64] if ctx.quick else [128, 512])}
    q = ctx.cfg.beam_width * (1 if ctx.meta["decoder_kv_cache"] else 3)  # 步 3 每个用户的交叉注意力查询数
    shapes[f"cross b{b} q{q}xL128"] = (b, q, 16 if ctx.quick else 128)
    return shapes


def sdpa_backends(ctx: Context, bb: int, lq: int, lk: int) -> Dict[str, Dict[str, Any]]:
    """一个形状上各后端能否运行（带与模型一样的加性浮点掩码）、中位耗时、对默认选择的最大差。"""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    h, dh, dtype, device = ctx.cfg.num_heads, ctx.cfg.d_model // ctx.cfg.num_heads, ctx.dtype, ctx.device
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(bb, h, lq, dh, device=device, dtype=dtype, generator=g)
    k = torch.randn(bb, h, lk, dh, device=device, dtype=dtype, generator=g)
    v = torch.randn(bb, h, lk, dh, device=device, dtype=dtype, generator=g)
    mask = torch.zeros(bb, lk, device=device, dtype=dtype)
    mask[:, lk // 2:] = float(torch.finfo(dtype).min) / 2  # 与模型一样的有限大负数
    bias = mask[:, None, None, :]
    attend = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # noqa: E731
    ref = attend()
    out: Dict[str, Dict[str, Any]] = {}
    for bname, be in backends.items():
        try:
            with sdpa_kernel([be]):
                y = attend()
                times = [ctx.clock.time(attend) for _ in range(3 if ctx.quick else 10)]
            out[bname] = {"ok": True, "ms": float(np.median(times)) * 1e3, "max_abs_vs_default": float((y - ref).abs().max())}
        except Exception as e:  # 不支持时 PyTorch 抛 RuntimeError 并说明原因
            out[bname] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    return out


def default_attention_ops(ctx: Context) -> List[str]:
    """模型一次前向里实际用到的注意力算子（profiler 里的 aten 名：_scaled_dot_product_{flash,efficient,cudnn}_attention
    或 math 的 bmm/softmax）。"""
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if ctx.on_gpu else [])
    feeds = ctx.hist.encode(ctx.hist.sample(min(ctx.batches), seed=3))
    with torch.profiler.profile(activities=acts) as prof, torch.no_grad():
        ctx.model(*to_device(feeds, ctx.device))
        ctx.clock.sync()
    return sorted({e.key for e in prof.key_averages() if any(s in e.key.lower() for s in ATTENTION_OP_WORDS)})


def sdpa(ctx: Context) -> Dict[str, Any]:
    backends = {name: sdpa_backends(ctx, *shape) for name, shape in sdpa_shapes(ctx).items()}
    return {"backends": backends, "default_ops": default_attention_ops(ctx)}


Variants = Sequence[Tuple[str, Callable[[], None]]]


def _time_variants(ctx: Context, x, variants: Variants, row: Dict[str, Any]) -> Dict[str, Any]:
    """逐个切到每种算法，记下它的输出与中位 ms（写进 row 的 <名字>_ms）。"""
    results = {}
    for name, switch in variants:
        switch()
        with torch.no_grad():
            results[name] = ctx.model(*x)
            times = [ctx.clock.time(lambda: ctx.model(*x)) for _ in range(ctx.repeats * 3 + 1)]
        row[f"{name}_ms"] = float(np.median(times[1:])) * 1e3
    return results


def eager_ab(ctx: Context, seed: int, variants: Variants, restore: Callable[[], None]) -> Dict[str, Any]:
    """同一权重、同一批历史、eager、同一进程里对照模型的两种算法。variants = [(名字, 切到这种算法的函数)]，基线在前；
    每个 batch 一行：各自的中位 ms、加速、推荐是否逐位一致、分数最大差、两者的 top-50 重合。
    半精度里两种算法的舍入不同，近似相等的候选会换位：逐位相等只在 fp32 里成立，半精度看重合。"""
    (base, _), (new, _) = variants
    L = 16 if ctx.quick else 128
    out = {}
    for b in ctx.batches:
        x = to_device(ctx.hist.batch(b, L, seed=seed), ctx.device)
        row = {"batch": b, "length": L}
        try:
            results = _time_variants(ctx, x, variants, row)
        finally:
            restore()
        (b_rec, b_sc), (n_rec, n_sc) = results[base], results[new]
        row["rec_equal"] = bool(torch.equal(b_rec, n_rec))
        row["score_max_abs"] = float((b_sc - n_sc).abs().max())
        row["overlap"] = compare_topk(b_rec.cpu().numpy(), b_sc.float().cpu().numpy(), n_rec.cpu().numpy(),
                                      n_sc.float().cpu().numpy(), 0.01).overlap
        row["speedup"] = row[f"{base}_ms"] / row[f"{new}_ms"]
        out[f"b{b}xL{L}"] = row
    return out


def self_attention(ctx: Context) -> Dict[str, Any]:
    """解码器自注意力：SDPA 对显式 softmax（模型的做法）。"""
    def explicit(flag: bool) -> None:
        for layer in ctx.model.decoder:
            layer.self_attn.explicit = flag

    return eager_ab(ctx, 21, [("sdpa", lambda: explicit(False)), ("explicit", lambda: explicit(True))],
                    lambda: explicit(True))


def kv_cache(ctx: Context) -> Dict[str, Any]:
    """解码器：每步重算前缀对 KV 缓存（编译后的对照要两个构建：gpu_bench.sh 的 profile 与 profile_variants）。"""
    def use_cache(flag: bool) -> None:
        ctx.model.decoder_kv_cache = flag

    return eager_ab(ctx, 23, [("recompute", lambda: use_cache(False)), ("kv_cache", lambda: use_cache(True))],
                    lambda: use_cache(ctx.meta["decoder_kv_cache"]))
