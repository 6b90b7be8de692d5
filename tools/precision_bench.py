"""同一次运行里比较几个精度的引擎（例如 fp16、fp8、int8 各自构建的仓库）：离线吞吐（中位数与范围）、门禁数字、
fp8 的逐层选择与构建的速度检查，外加一个 fp8 线性层的内核名（确认走的是 Hopper 的 sm90 / nvjet 内核）。

  python tools/precision_bench.py --repo fp16=DIR --repo fp8=DIR [--repo int8=DIR] --out DIR \\
      [--batches 8,16,64] [--rounds 3] [--per-round 5]

吞吐：所有仓库的引擎先都加载（与服务相同的 EngineModel：校验、分组、暂存、CUDA Graph 重放），历史按默认的长度分布
（BenchmarkConfig 的 length_*）从各仓库的目录抽样，各引擎跑同样的批；rounds 轮、每轮各引擎轮流，每个 batch 取 per-round 次
execute 的中位数得到一轮的 req/s（轮流：机器的漂移分摊到各引擎）。报告每个数字 rounds 轮的中位数 [最小–最大] 与对第一个
仓库（对照）的比值。写 <out>/precision_bench.json 与 precision_bench.md。
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


def fp8_kernels(out: dict) -> None:
    """ugt_base 编码器 FFN 的两个形状上，fp8_linear（按行量化 + _scaled_mm）与底本 F.linear 的计时和内核名。"""
    import torch
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    from algorithm.serving.engines.layer_choice import cuda_timer
    from algorithm.serving.runtime.engines.torch_fp8 import fp8_linear, quantize_weight, row_quantizer, unsupported_reason

    reason = unsupported_reason("cuda")
    if reason:
        out["fp8_kernels"] = {"skipped": reason}
        return
    rows = []
    for dtype in (torch.bfloat16, torch.float16):
        timer = cuda_timer(dtype)
        for m, k, n in ((8192, 768, 3072), (8192, 3072, 768), (256, 768, 3072)):
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            w = torch.randn(n, k, device="cuda", dtype=dtype) * k ** -0.5
            b = torch.randn(n, device="cuda", dtype=dtype)
            wq, sw = quantize_weight(w)
            r = {"dtype": str(dtype).replace("torch.", ""), "M": m, "K": k, "N": n,
                 "quantizer": row_quantizer("cuda")[1]}
            for name, fn in (("base", lambda: F.linear(x, w, b)), ("fp8", lambda: fp8_linear(x, w, b, wq, sw, 0))):
                try:
                    fn()
                    torch.cuda.synchronize()
                    with profile(activities=[ProfilerActivity.CUDA]) as prof:
                        fn()
                        torch.cuda.synchronize()
                    ks = sorted(((e.key, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0),
                                key=lambda t: -t[1])
                    r[f"{name}_kernels"] = [f"{key[:120]} ({t:.1f} us)" for key, t in ks[:5]]
                    r[f"{name}_us"] = round(timer(name, m, k, n) * 1e6, 2)
                except Exception as e:  # noqa: BLE001  记下原因，接着测别的
                    r[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:300]}"
            if "base_us" in r and "fp8_us" in r:
                r["speedup"] = round(r["base_us"] / r["fp8_us"], 3)
            rows.append(r)
            print(json.dumps(r, ensure_ascii=False), flush=True)
    out["fp8_kernels"] = rows


def build_facts(repo: str) -> dict:
    """仓库的 build_info.json 里与精度有关的几项：门禁、逐层选择的摘要、速度检查。"""
    path = os.path.join(repo, "build_info.json")
    if not os.path.isfile(path):
        return {"error": f"没有 {path}"}
    with open(path) as f:
        info = json.load(f)
    g = info.get("gates", {})
    facts = {"gates": {k: g.get(k) for k in ("summary", "overlap", "top1_agreement", "score_mae", "passed")}}
    lc = info.get("layer_choice")
    if lc:
        facts["layer_choice"] = {k: lc.get(k) for k in ("quantized_layers", "layers_total", "linear_speedup_estimate",
                                                        "quantizer", "base", "shapes_timed")}
    if "speed_check" in info:
        sc = info["speed_check"]
        facts["speed_check"] = {k: sc.get(k) for k in ("skipped", "batches", "slower_batches", "seconds")}
    return facts


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", action="append", required=True, help="名字=仓库目录；第一个是对照")
    p.add_argument("--out", required=True)
    p.add_argument("--batches", default="8,16,64")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--no-kernels", action="store_true")
    args = p.parse_args()
    import torch

    from algorithm.serving.bench.offline import _check, _take
    from algorithm.serving.config import BenchmarkConfig
    from algorithm.serving.pipeline import InProcessPipeline
    from algorithm.serving.workload import make_histories

    os.makedirs(args.out, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    repos = [tuple(r.split("=", 1)) for r in args.repo]
    report = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
              "batches": batches, "rounds": args.rounds, "per_round": args.per_round, "engines": {}}
    jpath = os.path.join(args.out, "precision_bench.json")

    def save():
        with open(jpath, "w") as f:
            json.dump(report, f, ensure_ascii=False, indent=1)

    if not args.no_kernels and torch.cuda.is_available():
        fp8_kernels(report)
        save()
    engines = {}
    for name, repo in repos:
        t0 = time.time()
        try:
            pipe = InProcessPipeline(repo)
            bench = BenchmarkConfig()
            hist = make_histories(os.path.join(repo, "ugt_preprocess", "1", "catalog.npz"), bench, args.samples,
                                  pipe.engine.contract.max_seq_length, bench.seed + 99)
            feeds = list(pipe.pre.execute([{"history_item_ids": h.reshape(1, -1)} for h in hist]))
            for f in feeds:
                f.pop("num_unknown_items", None)
            engines[name] = (pipe.engine, feeds)
            report["engines"][name] = {"repo": repo, "load_seconds": time.time() - t0, **build_facts(repo),
                                       "runs": {str(b): [] for b in batches}}
        except Exception as e:  # noqa: BLE001  这个仓库加载不了：记下，接着测别的
            report["engines"][name] = {"repo": repo, "error": f"{type(e).__name__}: {str(e)[:500]}"}
        print(name, json.dumps(report["engines"][name], ensure_ascii=False)[:600], flush=True)
        save()
    for rnd in range(args.rounds):
        for name, (eng, feeds) in engines.items():
            for b in batches:
                times = []
                for r in range(args.per_round + 1):
                    picked = _take(feeds, rnd * 97 + r, b)
                    t0 = time.perf_counter()
                    res = eng.execute(picked)
                    dt = time.perf_counter() - t0
                    _check(res)
                    if r:
                        times.append(dt)
                report["engines"][name]["runs"][str(b)].append(b / statistics.median(times))
        save()
    base = repos[0][0]
    lines = [f"# 精度对照（{report['gpu']}，torch {report['torch']}）", "",
             f"离线吞吐 req/s：{args.rounds} 轮的中位数 [最小–最大]，每轮 {args.per_round} 次 execute 的中位数；比值对 {base}", "",
             "| 引擎 | " + " | ".join(f"b{b}" for b in batches) + " | " + " | ".join(f"b{b} 比值" for b in batches)
             + " | 门禁 |", "|" + " --- |" * (2 * len(batches) + 2)]
    for name, e in report["engines"].items():
        if "error" in e:
            lines.append(f"| {name} | 加载失败：{e['error'][:200]} |")
            continue
        med = {b: statistics.median(e["runs"][str(b)]) for b in batches}
        e["median"] = {str(b): med[b] for b in batches}
        e["range"] = {str(b): [min(e["runs"][str(b)]), max(e["runs"][str(b)])] for b in batches}
        ref = report["engines"].get(base, {}).get("median")
        e["ratio_vs_" + base] = {str(b): med[b] / ref[str(b)] for b in batches} if ref else None
        cells = [f"{med[b]:.0f} [{e['range'][str(b)][0]:.0f}–{e['range'][str(b)][1]:.0f}]" for b in batches]
        ratios = [f"{e['ratio_vs_' + base][str(b)]:.2f}" if ref else "-" for b in batches]
        lines.append(f"| {name} | " + " | ".join(cells + ratios) + f" | {e.get('gates', {}).get('summary', '')} |")
    for name, e in report["engines"].items():
        for key in ("layer_choice", "speed_check"):
            if key in e:
                lines.append(f"\n{name} 的 {key}：`{json.dumps(e[key], ensure_ascii=False)[:1500]}`")
    if isinstance(report.get("fp8_kernels"), list):
        lines += ["", "单个线性层（µs，连续调用的吞吐；内核名来自 profiler）：", ""]
        for r in report["fp8_kernels"]:
            lines.append(f"- {r['dtype']} {r['M']}x{r['K']}x{r['N']}：base {r.get('base_us')} / fp8 {r.get('fp8_us')}"
                         f"（{r.get('speedup')} 倍，量化 {r['quantizer']}）；fp8 内核 {r.get('fp8_kernels', r.get('fp8_error'))}")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(args.out, "precision_bench.md"), "w") as f:
        f.write(md)
    save()
    print(md, flush=True)
    return 0 if engines else 1


if __name__ == "__main__":
    sys.exit(main())
