"""8 位的逐层选择（像 TensorRT 选 tactic）：每个线性层在各桶实际产生的行数上，原精度与 8 位各计时一次，
只在 8 位够快的行数上用 8 位，其余保持原精度；结果（层 -> 精度、门槛、计时）写进 build_info.json 与日志。

为什么按行数、不是整层一刀切：同一个线性层在 b64 x L1024 的编码器里是 6 万行的大矩阵乘（fp8 快 1.4–1.8 倍），
在 b2 的解码第 1 步只有几行（受发射限制，fp8 多一次量化反而慢）；一层一个门槛 min_rows：行数 >= 门槛时用 8 位。
门槛取“从它起、见到的每个更大的行数上 8 位都至少快 min_speedup 倍”的最小行数；最大的行数上都不够快时整层保持原精度。

计时函数可注入（Timer），CPU 的测试用假的计时器检查选择的逻辑；GPU 上默认是 cuda_timer。
"""
from __future__ import annotations

import statistics
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

# (精度, 行数 M, K, N) -> 一次调用的秒数；精度是 "base"（原精度的 F.linear）或 8 位的名字（如 "fp8"，含激活的量化）
Timer = Callable[[str, int, int, int], float]
Log = Callable[[str], None]


def choose_min_rows(times: Mapping[int, Tuple[float, float]], min_speedup: float) -> Optional[int]:
    """times：{行数: (原精度秒数, 8 位秒数)}。返回门槛（最小的行数 r，使每个 >= r 的行数上 原精度 / 8 位 >= min_speedup），
    没有这样的行数（最大的行数上 8 位也不够快）时 None。8 位不可用（秒数为 inf）的行数算作不够快。"""
    threshold = None
    for rows in sorted(times, reverse=True):
        base, q = times[rows]
        if not (q > 0 and base / q >= min_speedup):
            break
        threshold = rows
    return threshold


def choose_layers(shapes: Mapping[str, Mapping], timer: Timer, candidate: str = "fp8", min_speedup: float = 1.05,
                  log: Log = lambda s: None) -> Tuple[Dict, Dict]:
    """shapes：{层（权重名）: {"k", "n", "rows": [行数...]}}（torch_fp8.record_linear_rows 的结果）。
    同一 (行数, K, N) 只计时一次（各层共用）；计时出错（这个形状 8 位不支持）记为 inf。
    返回 (计划 {"layers": {层: {"min_rows": 门槛或 None}}}, 报告)。"""
    cache: Dict[Tuple[str, int, int, int], float] = {}
    errors: Dict[str, str] = {}

    def t(prec: str, m: int, k: int, n: int) -> float:
        key = (prec, m, k, n)
        if key not in cache:
            try:
                cache[key] = float(timer(prec, m, k, n))
            except Exception as e:  # noqa: BLE001  这个形状上这种精度跑不了：不选它，记下原因
                cache[key] = float("inf")
                errors[f"{prec} {m}x{k}x{n}"] = f"{type(e).__name__}: {str(e)[:200]}"
        return cache[key]

    # 先算最大的乘积（编码器的大矩阵乘）：它们决定大部分时间；同样的形状之后直接取缓存
    order = sorted(shapes, key=lambda name: -max(shapes[name]["rows"] or [0]) * shapes[name]["k"] * shapes[name]["n"])
    layers, report_layers = {}, {}
    base_total = chosen_total = 0.0
    for name in order:
        s = shapes[name]
        k, n, rows = int(s["k"]), int(s["n"]), [int(r) for r in s["rows"]]
        times = {m: (t("base", m, k, n), t(candidate, m, k, n)) for m in sorted(rows, reverse=True)}
        threshold = choose_min_rows(times, min_speedup) if times else None
        layers[name] = {"min_rows": threshold}
        for m, (b, q) in times.items():
            base_total += b
            chosen_total += q if threshold is not None and m >= threshold else b
        if threshold is None:
            precision = "base"
        elif threshold == min(rows):
            precision = candidate
        else:
            precision = f"{candidate} (行数 >= {threshold})"
        report_layers[name] = {"precision": precision, "min_rows": threshold, "k": k, "n": n,
                               "timings_us": {str(m): [_us(b), _us(q)] for m, (b, q) in sorted(times.items())}}
    n_all = len(layers)
    n_q = sum(e["min_rows"] is not None for e in layers.values())
    report = {"candidate": candidate, "min_speedup": min_speedup, "quantized_layers": n_q, "layers_total": n_all,
              "shapes_timed": len(cache), "layers": report_layers,
              # 全部层在各自见到的每个行数上各一次的时间之和（每个桶权重相同，不是服务时的流量加权）
              "linear_seconds_base": base_total, "linear_seconds_chosen": chosen_total,
              "linear_speedup_estimate": base_total / chosen_total if chosen_total > 0 else None}
    if errors:
        report["timer_errors"] = errors
    log(f"      逐层选择（{candidate} 对原精度，至少快 {min_speedup:g} 倍才用）：{n_q}/{n_all} 层量化，"
        f"计时 {len(cache)} 个形状；线性层时间估计 {base_total * 1e3:.2f} -> {chosen_total * 1e3:.2f} ms"
        + (f"；{len(errors)} 个形状 8 位不可用" if errors else ""))
    for name in order:
        r = report_layers[name]
        big = max(r["timings_us"], key=int) if r["timings_us"] else None
        detail = f"，最大行数 {big}：{r['timings_us'][big][0]} / {r['timings_us'][big][1]} µs" if big else ""
        log(f"        {name}：{r['precision']}{detail}")
    return {"candidate": candidate, "layers": layers}, report


def all_layers(shapes: Mapping[str, Mapping], candidate: str = "fp8") -> Tuple[Dict, Dict]:
    """engine.fp8_layers=all：每个可量化的层都从 0 行起用 8 位（不计时）。"""
    layers = {name: {"min_rows": 0} for name in shapes}
    return {"candidate": candidate, "layers": layers}, {"candidate": candidate, "mode": "all",
                                                        "quantized_layers": len(layers), "layers_total": len(layers)}


def _us(sec: float) -> Optional[float]:
    return round(sec * 1e6, 2) if sec != float("inf") else None


# ---------------------------------------------------------------- GPU 上的计时
def cuda_timer(dtype, device="cuda", iters: int = 10, reps: int = 10, warmup: int = 3) -> Timer:
    """在 GPU 上计时一个线性层（随机的 x [M,K]、W [N,K]、bias [N]，dtype 为底本）：每个计时连续调用 reps 次，
    取 iters 个计时的中位数。连续调用让主机发射与前一个内核重叠（服务时是 CUDA Graph 重放，没有逐个发射的开销），
    与 tools/int8_gemm_probe.py 的 timed 相同。"fp8" 含激活的按行量化（torch_fp8.fp8_linear 的全部工作）。"""
    import torch
    import torch.nn.functional as F

    from algorithm.serving.runtime.engines.torch_fp8 import fp8_linear, quantize_weight

    gen = torch.Generator(device="cpu").manual_seed(0)

    def timer(prec: str, m: int, k: int, n: int) -> float:
        x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        w = (torch.randn(n, k, generator=gen) * k ** -0.5).to(device=device, dtype=dtype)
        b = torch.randn(n, generator=gen).to(device=device, dtype=dtype)
        if prec == "base":
            def fn():
                return F.linear(x, w, b)
        elif prec == "fp8":
            wq, sw = quantize_weight(w)

            def fn():
                return fp8_linear(x, w, b, wq, sw, 0)
        else:
            raise ValueError(f"cuda_timer 不认识精度 {prec!r}")
        with torch.no_grad():
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times: List[float] = []
            for _ in range(iters):
                a, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                for _ in range(reps):
                    fn()
                e.record()
                e.synchronize()
                times.append(a.elapsed_time(e) / 1e3 / reps)
        return statistics.median(times)

    return timer


def summarize(report: Mapping) -> str:
    """一行摘要（构建日志的结尾用）。"""
    est = report.get("linear_speedup_estimate")
    return (f"{report.get('quantized_layers')}/{report.get('layers_total')} 层用 {report.get('candidate')}"
            + (f"，线性层估计快 {est:.2f} 倍" if est else ""))


__all__: Sequence[str] = ["Timer", "all_layers", "choose_layers", "choose_min_rows", "cuda_timer", "summarize"]
