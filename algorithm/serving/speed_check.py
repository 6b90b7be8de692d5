"""构建后的速度检查：刚建好的 8 位引擎（int8 / fp8）与同一模型的 fp16 引擎，在同一设备、同一进程里比离线吞吐。

为什么在构建里做：8 位的意义是同样的推荐更快；在这块 GPU 上更慢时（例如 int8 走 Ampere 代的内核），用户应在构建时
就看到，而不是上线后。比值写进 build_info.json（speed_check 一节），8 位更慢的 batch 在日志里有一行明确的警告。

方法：每个 batch（engine.speed_check_batches，超过最大 batch 的去掉）按压测的长度分布（benchmark.length_*）抽样
engine.speed_check_repeats 批，每批 b 条历史右侧填充到本批最长（运行器再取整到长度桶）；两个引擎跑完全相同的批，
经同一条暂存 / 重放路径（TorchRunner.run），先各预热一批；吞吐 = b / 每批秒数的中位数。这是引擎本身的离线吞吐，
不含 Triton 与前后处理，也不按长度分组（服务的 EngineModel 会分组）：它回答“同样的批，8 位比 fp16 快还是慢”。
fp16 对照按 fp16 构建会用的设置（engine.compile_mode、CUDA Graph、同样的桶）；CPU 上 fp16 没有意义，对照是 fp32。
"""
from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from algorithm.serving.config import ServingConfig

Log = Callable[[str], None]
# (运行器, 一批输入) -> 这一批的秒数；可注入（测试用假的）
Measure = Callable[[Any, Mapping[str, np.ndarray]], float]
EIGHT_BIT = ("int8", "fp8")


def skip_reason(config: ServingConfig, device: str) -> Optional[str]:
    """不做速度检查的原因；要做时 None。"""
    mode = config.engine.speed_check
    if config.export.precision not in EIGHT_BIT:
        return f"precision={config.export.precision} 不是 8 位"
    if mode == "off":
        return "engine.speed_check=off"
    if config.engine.kind != "torch":
        return (f"engine.kind={config.engine.kind}：速度检查只对 torch 引擎做（同一进程里另建 fp16 对照）；"
                "要比较请用 scripts/benchmark.py 分别压测")
    if device != "cuda" and mode == "auto":
        return f"设备是 {device}：engine.speed_check=auto 只在 GPU 上做（要在 CPU 上做：engine.speed_check=on）"
    return None


def sample_batches(config: ServingConfig, batch: int, count: int, seed: int = 0) -> List[Dict[str, np.ndarray]]:
    """count 批、每批 batch 条历史，长度按 benchmark 的分布抽样，每批右侧填充到本批最长。"""
    from algorithm.serving.workload import sample_lengths

    contract = config.contract()
    rng = np.random.default_rng(seed + batch)
    lengths = sample_lengths(config.benchmark, batch * count, contract.max_seq_length, seed + batch)
    out = []
    for i in range(count):
        ls = np.asarray(lengths[i * batch:(i + 1) * batch], dtype=np.int64)
        out.append(contract.random_inputs(batch, int(ls.max()), rng, lengths=ls))
    return out


def time_run(runner, feeds: Mapping[str, np.ndarray]) -> float:
    """一批的墙钟秒数（runner.run 返回时结果已回到主机，GPU 已做完）。"""
    t0 = time.perf_counter()
    runner.run(feeds)
    return time.perf_counter() - t0


def throughputs(runner, batches: Mapping[int, List[Mapping[str, np.ndarray]]], measure: Measure = time_run
                ) -> Dict[int, float]:
    """{batch: 请求/秒}：每个 batch 先预热一批，再取各批秒数的中位数。"""
    out = {}
    for b, feeds in batches.items():
        measure(runner, feeds[0])
        out[b] = b / statistics.median(measure(runner, f) for f in feeds)
    return out


def compare(candidate: Mapping[int, float], baseline: Mapping[int, float], precision: str,
            baseline_precision: str = "fp16") -> Dict[str, Any]:
    """两组吞吐 -> 报告：各 batch 的比值（8 位 / 对照）、更慢的 batch 与慢了多少、给日志的几行（警告行以“警告”开头）。"""
    rows, slower = {}, []
    for b in sorted(candidate):
        c, r = float(candidate[b]), float(baseline[b])
        ratio = c / r if r > 0 else float("nan")
        rows[str(b)] = {"batch": b, f"{precision}_rps": c, f"{baseline_precision}_rps": r, "ratio": ratio}
        if ratio < 1.0:
            slower.append(b)
    text = "，".join(f"b{b} {rows[str(b)]['ratio']:.2f} 倍" for b in sorted(candidate))
    lines = [f"      速度检查（同一设备、同一进程的离线吞吐，{precision} / {baseline_precision}）：{text}"]
    for b in slower:
        row = rows[str(b)]
        lines.append(f"      警告：{precision} 引擎在 batch {b} 比 {baseline_precision} 慢 {(1 - row['ratio']) * 100:.0f} %"
                     f"（{row[f'{precision}_rps']:.0f} 对 {row[f'{baseline_precision}_rps']:.0f} req/s）；"
                     f"要速度请用 precision={baseline_precision}")
    return {"precision": precision, "baseline": baseline_precision, "batches": rows, "slower_batches": slower,
            "faster_everywhere": not slower, "lines": lines}


def baseline_runner(config: ServingConfig, model, engine_dir: str, device: str):
    """同一模型的对照引擎（GPU 上 fp16、CPU 上 fp32），设置与这个精度的正常构建相同。"""
    from algorithm.serving.engines.torch import compile_cache_dir, export_program
    from algorithm.serving.runtime.engines.torch import TorchRunner

    precision = "fp16" if device == "cuda" else "fp32"
    e = config.engine
    path = export_program(model, os.path.join(engine_dir, "speed_check", f"{config.model.name}.{precision}.pt2"),
                          precision, config.export.max_batch_size, config.export.max_seq_length, packed=e.pack_rows)
    runner = TorchRunner.load(path, config.contract(), device, 0, compile_mode=e.compile_mode, cuda_graphs=e.cuda_graphs,
                              batch_buckets=config.batch_buckets(), seq_buckets=config.seq_buckets(),
                              cache_dir=compile_cache_dir(config))
    return runner, precision


def check(config: ServingConfig, model, runner, engine_dir: str, log: Log = print, measure: Measure = time_run,
          make_baseline: Callable = baseline_runner) -> Optional[Dict[str, Any]]:
    """构建的钩子：8 位的 torch 引擎建好、门禁通过后调用。不是 8 位时返回 None（报告里没有这一节）；跳过时
    返回 {"skipped": 原因} 并记一行日志；否则返回 compare 的报告（含双方的设置与耗时）。"""
    if config.export.precision not in EIGHT_BIT:
        return None
    device = getattr(getattr(runner, "device", None), "type", "cpu")
    reason = skip_reason(config, device)
    if reason:
        log(f"      速度检查：跳过（{reason}）")
        return {"skipped": reason}
    t0 = time.time()
    max_b = config.export.max_batch_size
    sizes = sorted({min(int(b), max_b) for b in config.engine.speed_check_batches})
    batches = {b: sample_batches(config, b, config.engine.speed_check_repeats, config.benchmark.seed) for b in sizes}
    log(f"      速度检查：建 {('fp16' if device == 'cuda' else 'fp32')} 对照引擎，batch {sizes}，每个 "
        f"{config.engine.speed_check_repeats} 批")
    base, base_precision = make_baseline(config, model, engine_dir, device)
    try:
        base_rps = throughputs(base, batches, measure)
        cand_rps = throughputs(runner, batches, measure)
    finally:
        del base
        _free_gpu(device)
    report = compare(cand_rps, base_rps, config.export.precision, base_precision)
    report.update(device=device, compile_mode_baseline=config.engine.compile_mode, seconds=time.time() - t0,
                  method="TorchRunner.run 的离线吞吐，同样的批、同一进程；不含 Triton 与前后处理")
    for line in report["lines"]:
        log(line)
    return report


def after_gates(config: ServingConfig, model, engine_dir: str, log: Log = print) -> Callable[[Any], Dict[str, Any]]:
    """build.py 交给 engines.build_engine_artifact 的钩子：门禁通过的运行器 -> {"speed_check": 报告}（不是 8 位时 {}）。"""
    def hook(runner) -> Dict[str, Any]:
        report = check(config, model, runner, engine_dir, log)
        return {} if report is None else {"speed_check": report}

    return hook


def _free_gpu(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


__all__: Sequence[str] = ["after_gates", "check", "compare", "sample_batches", "skip_reason", "throughputs"]
