"""torch 引擎的构建与托管：torch.export 得到与设备无关的 .pt2（precision 决定权重 dtype），
服务时由 runtime/engines/torch.py 加载、torch.compile 并按桶捕获 CUDA Graph。只能由 python 运行器托管。

为什么不是 AOTInductor：在本项目的 H100 上，AOTInductor 包编译成功但加载时段错误（benchmarks/h100-2026-11-24/）；
torch.compile + 手动 CUDA Graph 能工作。
"""
from __future__ import annotations

import copy
import json
import os
from typing import Callable, Dict, List, Tuple

import numpy as np

from algorithm.errors import ConfigError, UnsupportedPrecisionError
from algorithm.models.catalog import Catalog
from algorithm.serving.config import ServingConfig
from algorithm.serving.engines.base import BuiltEngine, EngineHosting

Log = Callable[[str], None]
NEEDS_ONNX = False
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def hosting(config: ServingConfig) -> EngineHosting:
    return EngineHosting("", "model.pt2")


def compile_cache_dir(config: ServingConfig) -> str:
    return os.path.abspath(config.engine.compile_cache_dir or os.path.join(config.build_dir, "compile_cache"))


def build(config: ServingConfig, model, catalog: Catalog, onnx_path: str, engine_dir: str, log: Log) -> BuiltEngine:
    from algorithm.serving.runtime.engines.torch import TorchRunner, int8_transform, resolve_device

    e = config.engine
    precision = config.export.precision
    int8 = precision == "int8"
    device = resolve_device(e.device)
    if precision == "fp8":
        check_fp8_device(device)
    check_gpu_int8(config, device, log)
    int8_mode, compile_mode = int8_modes(config, device)
    artifact = export_torch_program(model, os.path.join(engine_dir, f"{config.model.name}.pt2"), config)
    transform, extra = (int8_transform(int8_mode) if int8 else None), {}
    if precision == "fp8":
        from algorithm.serving.runtime.engines.torch_fp8 import fp8_transform

        plan, extra["layer_choice"] = plan_fp8(artifact, config, device, log)
        transform = fp8_transform(plan)
    runner = TorchRunner.load(artifact, config.contract(), device, 0, compile_mode=compile_mode,
                              cuda_graphs=e.cuda_graphs, batch_buckets=config.batch_buckets(),
                              seq_buckets=config.seq_buckets(), cache_dir=compile_cache_dir(config), transform=transform)
    return BuiltEngine(artifact, runner, reports={"torch_engine": {
        "load_seconds": runner.load_seconds, "capture_seconds": runner.capture_seconds,
        "cuda_graphs": len(runner.slots), "compile_mode": compile_mode, "int8_mode": int8_mode if int8 else None,
        "bucket_seconds": runner.bucket_seconds()}, **extra})


def check_fp8_device(device: str, capability=None) -> None:
    """fp8 在这个设备上不可用时抛 UnsupportedPrecisionError（写明为什么、该用什么）。capability 给出时不查询 GPU。"""
    from algorithm.serving.runtime.engines.torch_fp8 import unsupported_reason

    reason = unsupported_reason(device, capability)
    if reason:
        raise UnsupportedPrecisionError(
            f"precision=fp8 在这里不能构建：{reason}。fp8 是给 NVIDIA Hopper（sm_90+，如 H100 / H200）上的 "
            "engine=torch 的；这台机器上请用 precision=fp16（GPU）或 fp32 / int8（CPU）")


def fp8_base_precision(config: ServingConfig) -> str:
    """fp8 的 .pt2 先按这个精度导出（engine.fp8_base，默认 bf16）：没有量化的层与 _scaled_mm 的输出都是这个类型。
    为什么默认 bf16：按行缩放的 _scaled_mm 在 H200 上测过的是 bf16 输出（tools/int8_gemm_probe.py），fp16 输出没有测过。"""
    return config.engine.fp8_base


def bucket_inputs(config: ServingConfig, seed: int = 0) -> List[Tuple[np.ndarray, ...]]:
    """运行器会捕获的每个桶各一组输入（按程序的输入顺序）：与 TorchRunner 的捕获同样的形状（拼行时 (行数, 历史数, 宽)）。
    逐层选择用它记下各线性层在服务时见到的行数。"""
    from algorithm.serving.runtime import rowpack

    contract = config.contract()
    rng = np.random.default_rng(seed)
    out = []
    if config.engine.pack_rows:
        batches = config.batch_buckets()
        for w in config.seq_buckets():
            for n in batches:
                for r in (r for r in batches if r <= n):
                    lengths = rng.integers(1, w + 1, size=min(r, n))
                    feeds = rowpack.example_inputs(contract, lengths, w, rng, rows=r, histories=n)
                    out.append(tuple(feeds[k] for k in rowpack.input_names(contract)))
    else:
        for length in config.seq_buckets():
            for b in config.batch_buckets():
                feeds = contract.random_inputs(b, length, rng)
                out.append(tuple(feeds[k] for k in contract.input_names))
    return out


def plan_fp8(artifact: str, config: ServingConfig, device: str, log: Log = lambda s: None,
             timer=None) -> Tuple[Dict, Dict]:
    """fp8 的逐层计划：在设备上加载 artifact、跑一遍各桶记下每层的行数，按 engine.fp8_layers 选择（timed：用 timer 计时，
    默认 layer_choice.cuda_timer），把计划写进 artifact 的附加文件（torch_fp8.PLAN_FILE）。返回 (计划, 报告)。"""
    import torch

    from algorithm.serving.engines import layer_choice
    from algorithm.serving.runtime.engines.torch_fp8 import PLAN_FILE, record_linear_rows, row_quantizer

    gm = torch.export.load(artifact).module()
    gm.to(device)
    feeds = bucket_inputs(config)

    def run() -> None:
        with torch.no_grad():
            for args in feeds:
                gm(*[torch.from_numpy(a).to(device) for a in args])

    shapes = record_linear_rows(gm, run)
    base = DTYPES[fp8_base_precision(config)]
    if config.engine.fp8_layers == "all":
        plan, report = layer_choice.all_layers(shapes)
    else:
        if timer is None:
            timer = layer_choice.cuda_timer(getattr(torch, base), device)
        plan, report = layer_choice.choose_layers(shapes, timer, "fp8", config.engine.layer_choice_min_speedup, log)
    quantizer = row_quantizer(device)[1]
    plan.update(base=fp8_base_precision(config), quantizer=quantizer)
    report.update(base=fp8_base_precision(config), quantizer=quantizer, buckets_run=len(feeds))
    del gm
    ep = torch.export.load(artifact)  # 另载一份再存：上面那份已移到设备上
    torch.export.save(ep, artifact, extra_files={PLAN_FILE: json.dumps(plan, ensure_ascii=False, sort_keys=True)})
    log(f"      fp8 计划：{layer_choice.summarize(report)}，激活的按行量化用 {quantizer}；写进 {os.path.basename(artifact)}")
    return plan, report


def int8_base_precision(device: str) -> str:
    """int8 在服务时量化（torch_int8.py），.pt2 先按这个精度导出：GPU 上 bf16，CPU 上 fp32。

    为什么 GPU 上不是 fp16：torchao 的 int8 在 CUDA 上先用未缩放的整数值相乘、再乘缩放系数——weight_only 时 fp16 激活乘
    int8 权重（至多 ±127）、dynamic 时 int32 的点积转回激活的类型，都会在缩放之前超出 fp16 的范围（65504）变成 inf
    （torchao 作者的说明：huggingface/diffusion-fast#1，“bf16 or fp32 works”）。H100 上 fp16 底本的 int8 正是
    分数 inf、top-50 重合 0（benchmarks/h100-2026-11-27/machine2/int8_eager）。bf16 与 fp32 的指数范围相同。"""
    return "bf16" if device == "cuda" else "fp32"


def int8_modes(config: ServingConfig, device: str) -> Tuple[str, str]:
    """(int8 的量化方式, 编译方式)，按设备定；构建与服务进程（triton_config.runtime_spec）都用这里的结果。
    fp8 时编译方式取 engine.gpu_fp8_compile_mode（GPU）；不是 8 位时原样返回配置。int8 在 GPU 上：auto -> weight_only（H100 上两种都比 fp16 慢：weight_only 约 0.6 倍、dynamic 0.15 倍），编译用
    engine.gpu_int8_compile_mode（默认 none：torch.compile 量化后的模块在 H100 上 240 s 内没有编译完）；CPU 上 auto -> dynamic。"""
    e = config.engine
    on_gpu = device == "cuda"
    if config.export.precision == "fp8":  # fp8 的编译方式：engine.gpu_fp8_compile_mode（默认 none = eager + CUDA Graph）
        return e.int8_mode, (e.gpu_fp8_compile_mode if on_gpu else e.compile_mode)
    if config.export.precision != "int8":
        return e.int8_mode, e.compile_mode
    mode = e.int8_mode if e.int8_mode != "auto" else ("weight_only" if on_gpu else "dynamic")
    return mode, (e.gpu_int8_compile_mode if on_gpu else e.compile_mode)


def check_gpu_int8(config: ServingConfig, device: str, log: Log = lambda s: None) -> None:
    """GPU 上的 torch int8：构建日志写明 H100 上测得的门禁与速度（两种方式都比 fp16 慢）。"""
    if config.export.precision != "int8" or device != "cuda":
        return
    mode, compile_mode = int8_modes(config, device)
    graphs = config.engine.cuda_graphs
    measured = {
        "weight_only": ("machine4", "门禁通过（对 fp32 的 top-50 重合 0.977、top-1 0.984），速度只有同样 eager + CUDA Graph 的 "
                                    "fp16 的 0.58–0.61 倍（b16 / b64 2010 / 2817 对 3447 / 4606 req/s）"),
        # 以前捕获失败（torchao 0.18 的 safe_int_mm 每次矩阵乘都格式化激活张量），绕开之后（torch_int8.capture_safe_int_mm）捕获成功
        "dynamic": ("machine6", "门禁通过（重合 0.976、top-1 0.984），CUDA Graph 捕获成功，但 b16 / b64 只有 512 / 698 req/s，"
                                "同一进程里 eager + 图的 fp16 是 3516 / 4720（0.15 倍）"
                    if graphs else "不用 CUDA Graph 时没有测过（以前每次矩阵乘一次同步时 b16 / b64 只有 20 / 120 req/s）"),
    }
    where, text = measured[mode]
    compiled = "" if compile_mode == "none" else (
        f"；编译 {compile_mode} 没有测过能否编译完（fp16 底本时 240 s 内没有编译完），服务启动可能很慢")
    log(f"GPU 上的 torch int8：{mode}，编译 {compile_mode}，CUDA Graph {'开' if graphs else '关'}，bf16 底本。H100 上（ugt_base，"
        f"1 次，benchmarks/h100-2026-11-27/{where}/）{text}{compiled}：要速度请用 precision=fp16")


def export_torch_program(model, path: str, config: ServingConfig) -> str:
    """torch.export（batch 与 seq_len 动态）-> .pt2。precision 决定权重 dtype（fp32 / fp16；int8 见 int8_base_precision）。"""
    precision = config.export.precision
    if precision == "int8":
        from algorithm.serving.runtime.engines.torch import resolve_device

        precision = int8_base_precision(resolve_device(config.engine.device))
    elif precision == "fp8":
        precision = fp8_base_precision(config)
    if precision not in DTYPES:
        raise ConfigError(f"torch 引擎支持 export.precision=fp32 / fp16 / int8 / fp8，得到 {precision!r}")
    return export_program(model, path, precision, config.export.max_batch_size, config.export.max_seq_length,
                          packed=config.engine.pack_rows, contract=config.contract())


def export_program(model, path: str, precision: str, max_batch: int, max_seq: int, packed: bool = False,
                   contract=None) -> str:
    """把 model 按 precision（DTYPES 的键）做 torch.export（batch <= max_batch、seq_len <= max_seq 动态）并存成 .pt2。
    packed：导出拼行的程序（UGTModel.forward_packed，7 个输入；运行器按输入个数认出它，见 runtime/engines/torch.py）。
    构建与剖析（python -m algorithm.serving.profile 按 int8 底本重新导出）共用。示例输入放在模型所在的设备上。
    contract 缺省时取参考模型的 model.cfg.contract()；用户的模型由构建传入配置的契约。"""
    import torch

    m = copy.deepcopy(model).eval().to(getattr(torch, DTYPES[precision]))
    # 掩码与前缀树缓冲区保持原类型（bool / 整数），只有浮点参数变精度
    params = list(m.parameters())
    device = params[0].device if params else torch.device("cpu")
    contract = contract or model.cfg.contract()
    batch = torch.export.Dim("batch", min=1, max=max(2, max_batch))
    seq = torch.export.Dim("seq_len", min=1, max=max(2, max_seq))
    if packed:
        from algorithm.models.ugt import PackedUGT
        from algorithm.serving.runtime import rowpack

        # 3 条历史（长 10、6、8）拼成 2 行、宽 16：行数、历史数、宽三者不同，导出不会把它们当成相等
        feeds = rowpack.example_inputs(contract, [10, 6, 8], width=16, rng=np.random.default_rng(0))
        m = PackedUGT(m)
        args = tuple(torch.from_numpy(feeds[n]).to(device) for n in rowpack.input_names(contract))
        hist = torch.export.Dim("histories", min=1, max=max(2, max_batch))
        shapes = tuple({0: batch, 1: seq} for _ in args[:-1]) + ({0: hist, 1: seq},)
    else:
        feeds = contract.random_inputs(2, 16, np.random.default_rng(0), lengths=np.array([16, 8]))
        args = tuple(torch.from_numpy(feeds[n]).to(device) for n in contract.input_names)
        shapes = tuple({0: batch, 1: seq} for _ in args)
    with torch.no_grad():
        ep = torch.export.export(m, args, dynamic_shapes=shapes)
    _strip_device_asserts(ep)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(ep, path)
    return path


def _strip_device_asserts(ep) -> None:
    """torch.export 为每个 .to(dtype) 记录 _assert_tensor_metadata(device=导出时的设备)；
    程序在 CPU 上导出、在 GPU 上运行，这些断言会失败，所以删掉（dtype 由图本身保证）。"""
    import torch

    target = torch.ops.aten._assert_tensor_metadata.default
    removed = 0
    for node in list(ep.graph.nodes):
        if node.op == "call_function" and node.target is target and not node.users:
            ep.graph.erase_node(node)
            removed += 1
    if removed:
        ep.graph_module.recompile()
    leftover = [n for n in ep.graph.nodes if "device" in n.kwargs and n.kwargs["device"] is not None]
    if leftover:
        raise ConfigError(f"导出的程序里仍有固定设备的算子 {[str(n.target) for n in leftover][:5]}；"
                          "模型代码不应按输入的 device 创建张量")
