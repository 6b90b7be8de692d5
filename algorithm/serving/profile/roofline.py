"""每个阶段的 FLOPs 与字节数，以及对 roofline 的位置（算力受限还是带宽受限、达到上限的多少）。"""
from __future__ import annotations

from typing import Dict, List

from algorithm.serving.profile.hardware import PEAK_HBM_TBS


def stage_costs(cfg, batch: int, length: int, wbytes: int, kv_cache: bool) -> Dict[str, Dict[str, float]]:
    """每个阶段（batch 个请求、填充到 length）的 FLOPs 与字节数。FLOPs 与 flops_per_request 同一套公式
    （各阶段之和 = batch * flops_per_request(cfg, length)，stages 一节检查）；字节 = 权重读一次 + 每个中间张量写一次
    读一次（eager 不融合时的下限估计；不含注意力矩阵：高效注意力核不把它写回显存）。"""
    d, f, k = cfg.d_model, cfg.dim_feedforward, cfg.beam_width
    v = cfg.codebook_sizes
    ne, nd = cfg.num_encoder_layers, cfg.num_decoder_layers
    s, B, L = wbytes, batch, length
    out: Dict[str, Dict[str, float]] = {}
    tok = B * L
    out["embed"] = {"flops": 0.0, "bytes": 6 * tok * 8 + 5 * tok * d * s + tok * d * s}
    for i in range(ne):
        out[f"encoder.{i}"] = {"flops": float(B * (L * (8 * d * d + 4 * d * f) + 4 * L * L * d)),
                               "bytes": float((4 * d * d + 2 * d * f) * s + tok * s * (2 * d + 2 * (5 * d + f)))}
    out["encoder.norm"] = {"flops": 0.0, "bytes": float(2 * tok * d * s)}
    out["cross_kv"] = {"flops": float(nd * tok * 4 * d * d), "bytes": float(nd * (2 * d * d * s + 3 * tok * d * s))}
    for step, (t, rows) in enumerate(((1, 1), (2, k), (3, k)), start=1):
        n = B * rows * (1 if kv_cache else t)  # 这一步算的位置数：有 KV 缓存时只有新位置，否则整个前缀
        out[f"step{step}.decoder"] = {
            "flops": float(nd * (n * (12 * d * d + 4 * d * f) + 4 * n * (t + L) * d)),
            "bytes": float(nd * ((6 * d * d + 2 * d * f) * s + n * s * (2 * d + 2 * (7 * d + f)) + 2 * tok * d * s))}
        rows_v = B * rows * v[step - 1]
        out[f"step{step}.head"] = {"flops": float(2 * d * rows_v),
                                   "bytes": float(d * v[step - 1] * s + B * rows * d * s + rows_v * (2 * s + 12))}
        out[f"step{step}.select"] = {"flops": 0.0, "bytes": float(rows_v * 4 * 2)}
    return out


def roofline(costs: Dict[str, Dict[str, float]], seconds: Dict[str, float], peak_tflops: float) -> List[Dict]:
    """各阶段一行：耗时与占比、FLOPs 与字节、达到的 TFLOP/s 与 GB/s、受限于什么、对 roofline 下限的比例。"""
    ridge = peak_tflops * 1e12 / (PEAK_HBM_TBS * 1e12)
    rows = []
    total = sum(seconds.values()) or 1.0
    for name, c in costs.items():
        t = seconds.get(name)
        if t is None:
            continue
        ai = c["flops"] / c["bytes"] if c["bytes"] else 0.0
        tf = c["flops"] / t / 1e12 if t > 0 else 0.0
        gb = c["bytes"] / t / 1e9 if t > 0 else 0.0
        bound_s = max(c["flops"] / (peak_tflops * 1e12), c["bytes"] / (PEAK_HBM_TBS * 1e12))
        rows.append({"stage": name, "ms": t * 1e3, "share": t / total, "gflop": c["flops"] / 1e9,
                     "mb": c["bytes"] / 1e6, "flop_per_byte": ai, "tflops": tf, "gbps": gb,
                     "compute_util": tf / peak_tflops, "bw_util": gb / (PEAK_HBM_TBS * 1e3),
                     "bound": "compute" if ai >= ridge else "memory", "roofline_ms": bound_s * 1e3,
                     "vs_roofline": bound_s / t if t > 0 else 0.0})
    return rows
