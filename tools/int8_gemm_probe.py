"""int8 矩阵乘在这块 GPU 上的几条路，各自多快、用哪个内核（目标：int8 要比 fp16 快）。

为什么：Hopper 上 torch._int_mm 可能落到 `cutlass_80_wmma_..._s8_forwardCompat_..._nn_align4`（A100 代的兼容内核），
int8 的矩阵乘比 fp16 的整次运行还慢。这里对 ugt_base 的线性层形状逐一比较：
- fp16：F.linear（基线）；
- int8_nn：torch._int_mm(a, w_kn)，权重按行连续的 K×N（torchao 的 safe_int_mm 把转置视图拷成连续后就是这样）；
- int8_tn：torch._int_mm(a, w_nk.t())，权重是 N×K 连续的转置视图（cuBLASLt 的 int8 张量核要求的 TN 布局），
  先与 float64 的参考比对结果（torchao 的注释说不连续时 cuBLAS 会静默算错：这里实测）；
- fp8：torch._scaled_mm（e4m3，按行 / 按列缩放，bf16 输出），Hopper 原生的 8 位路径（不是 int8，作对照）；
- int8_compiled：torch.compile(mode=max-autotune-no-cudagraphs) 的“动态量化 + int8 乘 + 反量化”整个线性层（融合量化，
  Inductor 可以选 Triton 的 int8 模板）；只测最大的几个形状（编译慢）。
每条路：预热后 CUDA 事件计时（每个计时连续调用 --reps 次，见 timed）的中位数（微秒）、相对 fp16 的倍数，
torch.profiler 记下的内核名与一次调用的内核时间之和（*_kernel_us，不含主机发射）。
用法（GPU 机器上）：python tools/int8_gemm_probe.py --out DIR [--budget-s 150]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# (M, K, N)：M = 行数（batch × 长度；17 = 解码第 1 步补到的最小行数），K×N = ugt_base（d=768，FFN 3072）的线性层
SHAPES = [(M, K, N) for M in (17, 256, 2048, 8192) for K, N in ((768, 768), (768, 3072), (3072, 768))]
COMPILED_SHAPES = [(2048, 768, 3072), (8192, 768, 3072), (8192, 3072, 768)]


REPS = 20


def timed(fn, iters: int = 30, warmup: int = 10) -> float:
    """每次调用的微秒数（iters 个测量的中位数）：两个 CUDA 事件之间连续调用 REPS 次再平均。
    为什么不是一次：事件之间只有一次调用时 GPU 先空等主机发射，每个数多出约 55–70 µs；
    连续调用时发射与前一个内核重叠，量到的是内核的吞吐（内核比发射还短时仍是发射的速度）。"""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(REPS):
            fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / REPS)
    return statistics.median(times)


def kernels(fn):
    """一次调用里 GPU 上跑的内核：(名字，按耗时从大到小、去重，前 4 个；全部内核的 GPU 时间之和，微秒)。
    后者只算内核本身（不含主机发射），与 timed 的吞吐对照。"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = sorted(((e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0),
                  key=lambda r: -r[1])
    return [k[:140] for k, _ in rows[:4]], round(sum(t for _, t in rows), 2)


def int8_rowwise(x):
    """按行对称量化：int8 张量与每行的缩放（与 torchao 动态 int8 的激活量化相同的做法）。"""
    import torch

    s = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return (x.float() / s).round().clamp(-128, 127).to(torch.int8), s


def main() -> int:
    global REPS
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--budget-s", type=float, default=150.0, help="超过这么久就不再开始编译的一项（已测的照样写出）")
    p.add_argument("--reps", type=int, default=REPS, help="每个计时里连续调用几次（1 = 含主机发射的单次延迟）")
    args = p.parse_args()
    REPS = max(1, args.reps)
    import torch
    import torch.nn.functional as F

    if not torch.cuda.is_available():
        print("需要 CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    os.makedirs(args.out, exist_ok=True)
    dev = torch.device("cuda")
    cap = torch.cuda.get_device_capability()
    info = {"gpu": torch.cuda.get_device_name(), "capability": list(cap), "torch": torch.__version__,
            "cuda": torch.version.cuda, "reps": REPS}
    print(json.dumps(info, ensure_ascii=False), flush=True)
    fp8 = hasattr(torch, "float8_e4m3fn") and cap >= (8, 9)
    rows = []
    torch.manual_seed(0)
    for M, K, N in SHAPES:
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        w = torch.randn(N, K, device=dev, dtype=torch.float16) * 0.05
        x8, _ = int8_rowwise(x)
        w8, _ = int8_rowwise(w)  # N×K，每个输出通道一个缩放
        w8_kn = w8.t().contiguous()
        ref = (x8.double() @ w8.double().t())
        r = {"M": M, "K": K, "N": N, "flops": 2 * M * K * N}
        paths = {"fp16": lambda: F.linear(x, w),
                 "int8_nn": lambda: torch._int_mm(x8, w8_kn),
                 "int8_tn": lambda: torch._int_mm(x8, w8.t())}
        if fp8:
            xf = (x.float() / (x.abs().amax(-1, keepdim=True).float() / 448.0)).to(torch.float8_e4m3fn)
            wf = (w.float() / (w.abs().amax(-1, keepdim=True).float() / 448.0)).to(torch.float8_e4m3fn)
            sa = (x.abs().amax(-1, keepdim=True).float() / 448.0).contiguous()
            sb = (w.abs().amax(-1, keepdim=True).float() / 448.0).t().contiguous()
            paths["fp8"] = lambda: torch._scaled_mm(xf, wf.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
        for name, fn in paths.items():
            try:
                out = fn()
                if name.startswith("int8"):
                    r[f"{name}_exact"] = bool(torch.equal(out.double(), ref))
                r[f"{name}_us"] = round(timed(fn), 2)
                r[f"{name}_kernels"], r[f"{name}_kernel_us"] = kernels(fn)
            except Exception as e:  # noqa: BLE001  一条路不支持这个形状：记下原因，接着测别的
                r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        for name in ("int8_nn", "int8_tn", "fp8"):
            if f"{name}_us" in r and "fp16_us" in r:
                r[f"{name}_speedup"] = round(r["fp16_us"] / r[f"{name}_us"], 3)
        if "fp16_us" in r:
            r["fp16_tflops"] = round(r["flops"] / r["fp16_us"] / 1e6, 1)
        rows.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_kernels")}, ensure_ascii=False), flush=True)

    def qlinear(x, w8_kn, ws):
        xs = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-8) / 127.0
        x8 = (x.float() / xs).round().clamp(-128, 127).to(torch.int8)
        return (torch._int_mm(x8, w8_kn).float() * xs * ws).to(torch.float16)

    compiled = []
    for M, K, N in COMPILED_SHAPES:
        if time.monotonic() - t0 > args.budget_s:
            compiled.append({"M": M, "K": K, "N": N, "skipped": "预算用完"})
            continue
        x = torch.randn(M, K, device=dev, dtype=torch.float16)
        w = torch.randn(N, K, device=dev, dtype=torch.float16) * 0.05
        w8, ws = int8_rowwise(w)
        w8_kn, ws_row = w8.t().contiguous(), ws.t().contiguous()
        r = {"M": M, "K": K, "N": N}
        try:
            torch._dynamo.reset()
            c0 = time.monotonic()
            f = torch.compile(qlinear, mode="max-autotune-no-cudagraphs", dynamic=False)
            y = f(x, w8_kn, ws_row)
            r["compile_s"] = round(time.monotonic() - c0, 1)
            r["rel_err"] = float(((y.float() - F.linear(x, w).float()).norm() / F.linear(x, w).float().norm()).item())
            r["int8_compiled_us"] = round(timed(lambda: f(x, w8_kn, ws_row)), 2)
            r["int8_compiled_kernels"], r["int8_compiled_kernel_us"] = kernels(lambda: f(x, w8_kn, ws_row))
            fc = torch.compile(lambda a: F.linear(a, w), mode="max-autotune-no-cudagraphs", dynamic=False)
            fc(x)
            r["fp16_compiled_us"] = round(timed(lambda: fc(x)), 2)
            r["speedup"] = round(r["fp16_compiled_us"] / r["int8_compiled_us"], 3)
        except Exception as e:  # noqa: BLE001
            r["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        compiled.append(r)
        print(json.dumps({k: v for k, v in r.items() if not k.endswith("_kernels")}, ensure_ascii=False), flush=True)

    with open(os.path.join(args.out, "int8_gemm_probe.json"), "w") as f:
        json.dump({"info": info, "eager": rows, "compiled": compiled}, f, ensure_ascii=False, indent=1)
    print(f"{'M':>5} {'K':>5} {'N':>5} {'fp16 µs':>8} {'TF/s':>6} {'nn µs':>8} {'x':>5} {'tn µs':>8} {'x':>5} "
          f"{'tn 对':>5} {'fp8 µs':>8} {'x':>5}")
    for r in rows:
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>5} {r.get('fp16_us', '-'):>8} {r.get('fp16_tflops', '-'):>6} "
              f"{r.get('int8_nn_us', '-'):>8} {r.get('int8_nn_speedup', '-'):>5} {r.get('int8_tn_us', '-'):>8} "
              f"{r.get('int8_tn_speedup', '-'):>5} {str(r.get('int8_tn_exact', '-')):>5} {r.get('fp8_us', '-'):>8} "
              f"{r.get('fp8_speedup', '-'):>5}")
    print("只算内核（profiler，一次调用的内核时间之和，µs）：")
    print(f"{'M':>5} {'K':>5} {'N':>5} {'fp16':>8} {'int8 nn':>8} {'int8 tn':>8} {'fp8':>8}")
    for r in rows:
        print(f"{r['M']:>5} {r['K']:>5} {r['N']:>5} " + " ".join(
            f"{r.get(f'{n}_kernel_us', '-'):>8}" for n in ("fp16", "int8_nn", "int8_tn", "fp8")))
    for name in ("int8_nn", "int8_tn", "fp8"):
        ks = {k for r in rows for k in r.get(f"{name}_kernels", [])[:1]}
        print(f"{name} 的主内核：{sorted(ks)}")
    print(f"用时 {time.monotonic() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
