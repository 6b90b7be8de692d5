"""PyTorch -> ONNX 导出与验证。

步骤：torch.export 路线（dynamo=True，动态轴来自契约）；它无法追踪时退回旧版
TorchScript 导出器（用户的 MockModel 只能走这条）。无论走哪条，随后都：
  1. 按契约修补图：六个输入齐全且按契约顺序（旧导出器会删掉未使用的输入），动态轴命名为 batch / seq_len，
     输出维度写成 [batch, top_k, 3] / [batch, top_k]；
  2. onnx.checker + 形状推断；超过 2 GB 用外部数据保存；
  3. 在与导出示例 (2, 16) 不同的多个形状上用 ONNX Runtime 运行，与 PyTorch 比较
     （形状/dtype -> ShapeError；top-k 集合与分数 -> AccuracyError，异常携带全部数字）。
验证决定成败，而不是导出器有没有报错（旧导出器会把 nn.MultiheadAttention 的序列长度固化进图里）。
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from algorithm.interfaces import EngineContract
from algorithm.serving.accuracy import compare_topk
from algorithm.serving.config import ExportConfig
from algorithm.serving.runtime.engines.onnxruntime import ort_session
from algorithm.errors import AccuracyError, MissingDependencyError, ShapeError, ValidationError

log = logging.getLogger(__name__)

EXAMPLE_SHAPE = (2, 16)  # 导出示例形状；验证形状都与它不同
TWO_GB = 2 * 1024 ** 3


@dataclass
class ExportReport:
    """导出与验证报告（写到 <onnx>.report.json）。"""

    onnx_path: str
    exporter: str = ""
    fallback_reason: str = ""
    opset: int = 0
    inputs: List[str] = field(default_factory=list)
    added_inputs: List[str] = field(default_factory=list)
    external_data: bool = False
    export_seconds: float = 0.0
    reference_deterministic: bool = True
    shapes: List[Dict[str, Any]] = field(default_factory=list)
    passed: bool = False

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [f"ONNX: {self.onnx_path}（{self.exporter}，opset {self.opset}"
                 + (f"，补回未使用的输入 {self.added_inputs}" if self.added_inputs else "") + "）"]
        if not self.reference_deterministic:
            lines.append("  注意：PyTorch 参考模型对同一输入给出不同结果（非确定性），只检查了形状与 dtype")
        for s in self.shapes:
            c = s.get("comparison")
            tail = (f"top-{s['top_k']} 重合 {c['overlap']:.4f}（严格 {c['exact_overlap']:.4f}），top-1 一致 "
                    f"{c['top1_agreement']:.3f}，分数最大误差 {c['score_max_abs']:.2e}") if c else "形状/dtype 正确"
            lines.append(f"  batch={s['batch']:>3} seq_len={s['seq_len']:>4}: {tail}  ({s['ort_ms']:.1f} ms)")
        return "\n".join(lines)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - 环境问题
        raise MissingDependencyError("导出需要 PyTorch：pip install torch==2.13.0（CPU）或按 README 安装 GPU 版") from e
    return torch


def _example_args(contract: EngineContract):
    torch = _torch()
    feeds = contract.random_inputs(*EXAMPLE_SHAPE, rng=np.random.default_rng(0),
                                   lengths=np.array([EXAMPLE_SHAPE[1], EXAMPLE_SHAPE[1] // 2]))
    return tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)


def _export_dynamo(model, args, path: str, contract: EngineContract, config: ExportConfig) -> None:
    torch = _torch()
    batch = torch.export.Dim("batch", min=1, max=max(2, config.max_batch_size))
    seq = torch.export.Dim("seq_len", min=1, max=max(2, config.max_seq_length))
    program = torch.onnx.export(
        model, args, dynamo=True, input_names=list(contract.input_names),
        output_names=list(contract.output_names), opset_version=config.opset_version,
        dynamic_shapes=tuple({0: batch, 1: seq} for _ in contract.input_names), verbose=False)
    program.save(path, external_data=_param_bytes(model) > TWO_GB // 2)


def _export_legacy(model, args, path: str, contract: EngineContract, config: ExportConfig) -> None:
    torch = _torch()
    axes = {s.name: s.dynamic_axes for s in contract.inputs + contract.outputs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, args, path, dynamo=False, input_names=list(contract.input_names),
                          output_names=list(contract.output_names), dynamic_axes=axes,
                          opset_version=config.opset_version,
                          do_constant_folding=True)


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) if hasattr(model, "parameters") else 0


def _set_dims(value_info, dims) -> None:
    shape = value_info.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        dim = shape.dim.add()
        if isinstance(d, str):
            dim.dim_param = d
        else:
            dim.dim_value = int(d)


def repair_graph(model_proto, contract: EngineContract) -> List[str]:
    """按契约修补 ONNX 图（就地）：补回缺失输入、按契约排序、统一动态轴名与输出维度。返回补回的输入名。"""
    from onnx import helper

    graph = model_proto.graph
    initializer_names = {i.name for i in graph.initializer}
    existing = {i.name: i for i in graph.input if i.name not in initializer_names}
    extra = [n for n in existing if n not in contract.input_names]
    if extra:
        raise ShapeError(f"导出的图有契约之外的输入 {extra}；契约为 {list(contract.input_names)}")
    added = []
    ordered = []
    for spec in contract.inputs:
        vi = existing.get(spec.name)
        if vi is None:
            vi = helper.make_tensor_value_info(spec.name, helper.np_dtype_to_tensor_dtype(np.dtype(spec.dtype)),
                                               list(spec.dims))
            added.append(spec.name)
        else:
            _set_dims(vi, spec.dims)
        ordered.append(vi)
    rest = [i for i in graph.input if i.name in initializer_names]
    del graph.input[:]
    graph.input.extend(ordered + rest)
    outputs = {o.name: o for o in graph.output}
    for spec in contract.outputs:
        if spec.name not in outputs:
            raise ShapeError(f"导出的图缺少输出 {spec.name}；契约输出为 {list(contract.output_names)}")
        _set_dims(outputs[spec.name], spec.dims)
    return added


def _finalize(path: str, contract: EngineContract, report: ExportReport) -> None:
    import onnx

    proto = onnx.load(path, load_external_data=True)
    report.added_inputs = repair_graph(proto, contract)
    size = proto.ByteSize()
    report.external_data = size > TWO_GB
    for f in os.listdir(os.path.dirname(os.path.abspath(path))):
        if f.startswith(os.path.basename(path)) and f != os.path.basename(path) and f.endswith(".data"):
            os.remove(os.path.join(os.path.dirname(os.path.abspath(path)), f))
    if report.external_data:
        onnx.save_model(proto, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(path) + ".data")
        onnx.checker.check_model(path)
        onnx.shape_inference.infer_shapes_path(path, path + ".inferred")
        os.remove(path + ".inferred")
    else:
        onnx.checker.check_model(proto)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
        onnx.save_model(proto, path)
    report.opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    report.inputs = [i.name for i in proto.graph.input]


def export_to_onnx(model, save_path: str, config: ExportConfig, validate: bool = True,
                   contract: Optional[EngineContract] = None, tie_tolerance: float = 1e-4) -> str:
    """导出支持动态 batch 与动态序列长度的 ONNX 模型（用户的签名），并验证。

    contract 缺省时由 model.cfg 派生（参考 UGT 模型），否则用 config 的 max_seq_length 与默认码本。
    验证失败抛 ShapeError / AccuracyError（.report 携带数字）；成功时 <save_path>.report.json 写有报告。
    """
    torch = _torch()
    if contract is None:
        cfg = getattr(model, "cfg", None)
        contract = cfg.contract() if hasattr(cfg, "contract") else EngineContract(max_seq_length=config.max_seq_length)
    if config.max_seq_length > contract.max_seq_length:
        raise ShapeError(f"export.max_seq_length ({config.max_seq_length}) 大于模型支持的 {contract.max_seq_length}")
    os.makedirs(os.path.dirname(os.path.abspath(save_path)) or ".", exist_ok=True)
    model.eval()
    args = _example_args(contract)
    report = ExportReport(onnx_path=save_path)
    t0 = time.time()
    tmp = save_path + ".tmp.onnx"
    logging.getLogger("onnx_ir").setLevel(logging.WARNING)  # 导出器的逐项 INFO 日志太多
    with torch.no_grad():
        try:
            _export_dynamo(model, args, tmp, contract, config)
            report.exporter = "torch.export (dynamo)"
        except Exception as e:  # torch.export 无法追踪：退回旧导出器，由验证决定成败
            first_line = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines()[0][:300]
            report.fallback_reason = f"{type(e).__name__}: {first_line}"
            log.warning("torch.export 路线失败，改用旧版导出器：%s", report.fallback_reason)
            _export_legacy(model, args, tmp, contract, config)
            report.exporter = "torchscript (legacy)"
    report.export_seconds = time.time() - t0
    _finalize(tmp, contract, report)
    _move_onnx(tmp, save_path)
    if validate:
        validate_onnx(model, save_path, contract, config, report, tie_tolerance)
    report.passed = True
    with open(save_path + ".report.json", "w") as f:
        json.dump(report.to_dict(), f, indent=2, ensure_ascii=False)
    log.info("%s", report.summary())
    return save_path


def _move_onnx(src: str, dst: str) -> None:
    data_src = src + ".data"
    if os.path.exists(data_src):
        import onnx

        proto = onnx.load(src, load_external_data=True)
        onnx.save_model(proto, dst, save_as_external_data=True, all_tensors_to_one_file=True,
                        location=os.path.basename(dst) + ".data")
        os.remove(src)
        os.remove(data_src)
    else:
        os.replace(src, dst)


def torch_reference(model, feeds: Dict[str, np.ndarray], contract: EngineContract):
    """在 PyTorch 上运行（CPU，fp32）-> (recommendations, scores) numpy。"""
    torch = _torch()
    device = next(model.parameters()).device if _param_bytes(model) else torch.device("cpu")
    with torch.no_grad():
        out = model(*[torch.from_numpy(feeds[n]).to(device) for n in contract.input_names])
    return out[0].cpu().numpy(), out[1].float().cpu().numpy()


def validate_onnx(model, onnx_path: str, contract: EngineContract, config: ExportConfig,
                  report: Optional[ExportReport] = None, tie_tolerance: float = 1e-4) -> ExportReport:
    """在多个形状上对比 ONNX Runtime 与 PyTorch。fp32 要求 top-k 集合一致（并列除外）。"""
    report = report or ExportReport(onnx_path=onnx_path)
    sess = ort_session(onnx_path)
    rng = np.random.default_rng(1234)
    # 参考是否确定：同一输入跑两次
    probe = contract.random_inputs(1, 3, rng)
    a, b = torch_reference(model, probe, contract), torch_reference(model, probe, contract)
    report.reference_deterministic = bool(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]))
    for batch, seq_len in config.checked_shapes():
        lengths = rng.integers(1, seq_len + 1, size=batch)
        lengths[0] = seq_len  # 至少一行占满
        feeds = contract.random_inputs(batch, seq_len, rng, lengths=lengths)
        entry: Dict[str, Any] = {"batch": batch, "seq_len": seq_len, "top_k": contract.top_k}
        t0 = time.time()
        try:
            rec, scores = sess.run(list(contract.output_names), feeds)
        except Exception as e:
            report.shapes.append(entry | {"error": str(e)[:500], "ort_ms": 0.0})
            raise ShapeError(f"ONNX 图在 batch={batch} seq_len={seq_len} 上无法运行（动态轴可能被固化）：{e}",
                             report) from e
        entry["ort_ms"] = (time.time() - t0) * 1000
        for spec, arr in zip(contract.outputs, (rec, scores)):
            want = tuple(batch if isinstance(d, str) else d for d in spec.dims)
            if arr.shape != want or arr.dtype != np.dtype(spec.dtype):
                report.shapes.append(entry)
                raise ShapeError(f"{spec.name}: 期望 {list(want)} {np.dtype(spec.dtype).name}，得到 "
                                 f"{list(arr.shape)} {arr.dtype.name}（batch={batch} seq_len={seq_len}）", report)
        if report.reference_deterministic:
            ref = torch_reference(model, feeds, contract)
            cmp = compare_topk(ref[0], ref[1], rec, scores, tie_tolerance)
            entry["comparison"] = cmp.to_dict()
            report.shapes.append(entry)
            if cmp.min_overlap < 1.0 or cmp.score_max_abs > 1e-3:
                raise AccuracyError(
                    f"ONNX 与 PyTorch 在 batch={batch} seq_len={seq_len} 上不一致：top-{contract.top_k} 最差重合 "
                    f"{cmp.min_overlap:.4f}（要求 1.0），分数最大误差 {cmp.score_max_abs:.3e}（要求 <= 1e-3）", report)
        else:
            report.shapes.append(entry)
    return report


__all__ = ["export_to_onnx", "validate_onnx", "repair_graph", "ExportReport", "ort_session", "torch_reference",
           "ValidationError"]
