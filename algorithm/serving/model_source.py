"""用户的模型进入构建：按 model.source 加载，在两个不同的形状上检查契约，检查能否导出，
再决定参考模型才有的功能（目录约束、解码器 KV 缓存、拼行）用不用。

来源（model.source）：
  module    model.factory=PACKAGE.MODULE:FUNCTION 或 path/to/file.py:FUNCTION（无参，返回 nn.Module），
            checkpoint=PATH（可选）：state_dict（或 {"state_dict": ...}）或整个保存的模块
  exported  model.path=X.pt2：torch.export 的程序（torch.export.save 写出）
  onnx      model.path=X.onnx：已导出的 ONNX（只给 onnxruntime / tensorrt 引擎）
契约（model.codebook_sizes / max_seq_length / num_token_types / top_k）来自配置，不来自模型。
任何检查不通过都抛命名的异常（ModelContractError / ModelExportError），消息写明哪个输入或输出、期望与实际。
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import pickle
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import numpy as np

from algorithm.errors import ConfigError, ModelContractError, ModelExportError, ShapeError
from algorithm.interfaces import EngineContract
from algorithm.models.catalog import Catalog
from algorithm.serving.config import ServingConfig

Log = Callable[[str], None]
EXAMPLE_SHAPE = (2, 16)  # torch.export 的示例形状；探测形状都与它不同


@dataclass
class UserModel:
    """加载并检查过的用户模型：model 是 fp32 的参考（门禁对照它），config 是按可用功能调整过的配置。"""

    model: Any
    config: ServingConfig
    onnx_path: str = ""  # onnx 来源：修补后的 ONNX（引擎由它构建）
    report: Dict[str, Any] = field(default_factory=dict)


def probe_shapes(contract: EngineContract) -> List[Tuple[int, int]]:
    """两个 batch 与长度都不同（也都不同于导出示例 (2, 16)）的形状。"""
    m = contract.max_seq_length
    return [(1, min(m, 5)), (3, min(m, 19))]


# ---------------------------------------------------------------- 加载

def load_module_file(path: str):
    """不在任何包里的 .py 文件 -> 模块：按路径加载（不改 sys.path），登记进 sys.modules，
    让模块里的 dataclass / pickle 找得到自己。"""
    path = os.path.abspath(path)
    name = "ugt_user_model_" + re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[name] = module
    mod_spec.loader.exec_module(module)
    return module


def import_factory(spec: str) -> Callable[[], Any]:
    """PACKAGE.MODULE:FUNCTION 或 path/to/file.py:FUNCTION -> 函数。"""
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise ConfigError(f"model.factory 应为 PACKAGE.MODULE:FUNCTION 或 path/to/file.py:FUNCTION，得到 {spec!r}")
    try:
        if target.endswith(".py"):
            path = os.path.abspath(target)
            if not os.path.isfile(path):
                raise ConfigError(f"model.factory 的文件不存在：{path}")
            module = load_module_file(path)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except Exception as e:
        raise ConfigError(f"model.factory={spec!r}：导入 {target} 失败：{type(e).__name__}: {e}") from e
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"model.factory={spec!r}：{target} 里没有可调用的 {fn_name}")
    return fn


def load_checkpoint_into(model, path: str, log: Log):
    """checkpoint：先按 weights_only=True 读（state_dict 不执行代码）；整个保存的模块只能按 pickle 读，日志写明。"""
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"检查点不存在：{path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log(f"      检查点 {path} 是整个保存的模块：weights_only=True 读不了，按 weights_only=False 读（只加载可信的文件）")
        obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, torch.nn.Module):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"检查点 {path} 既不是 state_dict（名字 -> 张量）也不是 nn.Module，得到 {type(obj).__name__}")
    missing, unexpected = model.load_state_dict(obj, strict=False)
    if missing or unexpected:
        raise ConfigError(f"检查点 {path} 与 model.factory 的模型不符：缺少 {list(missing)[:5]}，多余 {list(unexpected)[:5]}")
    return model


def load_module(config: ServingConfig, log: Log):
    import torch

    model = import_factory(config.model.factory)()
    if not isinstance(model, torch.nn.Module):
        raise ModelContractError(f"model.factory={config.model.factory} 应返回 torch.nn.Module，得到 {type(model).__name__}")
    if config.checkpoint:
        model = load_checkpoint_into(model, os.path.abspath(config.checkpoint), log)
    return model.float().eval()


def load_exported(path: str):
    import torch

    if not os.path.isfile(path):
        raise ConfigError(f"model.path 不存在：{path}")
    try:
        return torch.export.load(path).module()
    except Exception as e:
        raise ModelExportError(f"torch.export.load({path}) 失败：{type(e).__name__}: {_first_lines(e)}") from e


def _adapter_class():
    import torch

    class SixInputs(torch.nn.Module):
        """把用户的模型包成 forward(六个契约输入) 的模块：forward(*inputs) 之类的签名也能按契约的名字与动态轴导出。
        torch.export 程序的 module() 不许 eval() / train()（导出时已定），这时 train 不往下传。"""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def train(self, mode: bool = True):
            self.training = mode
            try:
                self.model.train(mode)
            except NotImplementedError:
                pass
            return self

        def forward(self, encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, encoder_positions, encoder_token_types,
                    encoder_mask):
            return self.model(encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, encoder_positions, encoder_token_types,
                              encoder_mask)

    return SixInputs


def six_inputs(model):
    """model -> 以契约的六个输入为 forward 参数的模块（见 SixInputs）。"""
    return _adapter_class()(model)


class OnnxModel:
    """用户的 ONNX 在 ONNX Runtime（CPU，fp32）上运行：onnx 来源的参考，门禁、探测都对照它。
    调用方式与 nn.Module 一样：六个张量（torch 或 numpy）按契约顺序 -> (recommendations, scores) torch 张量。"""

    def __init__(self, path: str, contract: EngineContract):
        from algorithm.serving.runtime.engines.onnxruntime import ort_session

        self.path, self.contract = path, contract
        self.session = ort_session(path)

    def parameters(self):
        return iter(())

    def eval(self):
        return self

    def __call__(self, *args):
        import torch

        feeds = {n: (a.cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a))
                 for n, a in zip(self.contract.input_names, args)}
        outs = self.session.run(list(self.contract.output_names), feeds)
        return tuple(torch.from_numpy(np.asarray(o)) for o in outs)


def prepare_onnx(src: str, dst: str, contract: EngineContract) -> str:
    """检查用户 ONNX 的输入输出声明（名字、固定的 batch / 长度轴），按契约修补（补回未用的输入、统一轴名）写到 dst。"""
    import onnx

    from algorithm.serving.export_onnx import repair_graph

    if not os.path.isfile(src):
        raise ConfigError(f"model.path 不存在：{src}")
    try:
        proto = onnx.load(src, load_external_data=True)
    except Exception as e:
        raise ModelExportError(f"读取 ONNX {src} 失败：{type(e).__name__}: {_first_lines(e)}") from e
    inits = {i.name for i in proto.graph.initializer}
    declared = {v.name: v for v in list(proto.graph.input) + list(proto.graph.output) if v.name not in inits}
    for spec in contract.inputs + contract.outputs:
        v = declared.get(spec.name)
        if v is None:
            continue
        dims = v.type.tensor_type.shape.dim
        for axis, want in enumerate(spec.dims):
            if isinstance(want, str) and axis < len(dims) and dims[axis].HasField("dim_value"):
                raise ModelContractError(
                    f"{spec.name}: 第 {axis} 轴（{want}）在 ONNX 里固定为 {dims[axis].dim_value}——导出时丢了动态 "
                    f"{'batch' if axis == 0 else '长度'}；导出时给这个轴 dynamic_axes / dynamic_shapes（{src}）")
    try:
        repair_graph(proto, contract)
    except ShapeError as e:
        raise ModelContractError(f"ONNX {src}：{e}") from e
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    onnx.save_model(proto, dst)
    return dst


# ---------------------------------------------------------------- 检查

def _first_lines(e: BaseException, n: int = 6, width: int = 1200) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    return "\n".join(text.splitlines()[:n])[:width]


def _check_signature(model, contract: EngineContract) -> None:
    fwd = getattr(model, "forward", None)
    if fwd is None:
        return
    try:
        inspect.signature(fwd).bind(*contract.input_names)
    except TypeError:
        raise ModelContractError(f"forward{inspect.signature(fwd)} 应按这个顺序接受契约的六个输入 "
                                 f"{list(contract.input_names)}") from None
    except ValueError:  # 没有签名的可调用对象
        return


def _as_outputs(out, contract: EngineContract) -> Sequence[Any]:
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        got = f"{type(out).__name__}" + (f"（{len(out)} 项）" if isinstance(out, (tuple, list)) else "")
        raise ModelContractError(f"forward 应返回 (recommendations [B,K,3] int64, scores [B,K] float32) 两个张量，得到 {got}")
    return out


def check_outputs(outputs, contract: EngineContract, batch: int, seq_len: int) -> None:
    """一个形状上的输出对照契约：名字、dtype、形状（丢了动态 batch / 长度时写明）、语义 ID 的取值。"""
    import torch

    where = f"（输入 batch={batch} seq_len={seq_len}）"
    for spec, t in zip(contract.outputs, _as_outputs(outputs, contract)):
        want = tuple(batch if isinstance(d, str) else d for d in spec.dims)
        arr = t.detach().cpu() if isinstance(t, torch.Tensor) else None
        if arr is None:
            raise ModelContractError(f"{spec.name}: 应为张量，得到 {type(t).__name__}{where}")
        want_dtype = torch.int64 if np.dtype(spec.dtype) == np.int64 else torch.float32
        if arr.dtype != want_dtype:
            raise ModelContractError(f"{spec.name}: dtype 应为 {np.dtype(spec.dtype).name}，得到 "
                                     f"{str(arr.dtype).replace('torch.', '')}{where}")
        shape = tuple(arr.shape)
        if shape != want:
            hint = ""
            if len(shape) == len(want) and shape[0] != batch:
                hint = f"：第 0 维不跟着输入的 batch 变——丢了动态 batch"
            elif seq_len in shape[1:] and seq_len not in want[1:]:
                hint = "：有一维等于输入的长度——输出不应随 seq_len 变"
            elif len(shape) >= 2 and len(shape) == len(want) and shape[1] != want[1]:
                hint = f"：第 1 维应为 model.top_k={contract.top_k}"
            raise ModelContractError(f"{spec.name}: 形状应为 {list(want)}，得到 {list(shape)}{where}{hint}")
        if spec.name == "scores" and torch.isnan(arr).any():
            raise ModelContractError(f"scores: 含 NaN{where}")
    rec = _as_outputs(outputs, contract)[0].detach().cpu()
    for level, size in enumerate(contract.codebook_sizes):
        col = rec[..., level]
        if col.numel() and (int(col.min()) < 0 or int(col.max()) >= size):
            raise ModelContractError(f"recommendations[..., {level}]（l{level + 1}）取值应在 [0, {size}) 内，得到 "
                                     f"[{int(col.min())}, {int(col.max())}]{where}——model.codebook_sizes 与模型不一致？")


def probe_contract(model, contract: EngineContract) -> List[Dict[str, Any]]:
    """在 probe_shapes 的两个形状上运行模型（eval、no_grad），逐项检查输出。返回每个形状的记录。"""
    import torch

    _check_signature(model, contract)
    rng = np.random.default_rng(7)
    records = []
    for batch, seq_len in probe_shapes(contract):
        lengths = rng.integers(1, seq_len + 1, size=batch)
        lengths[0] = seq_len
        feeds = contract.random_inputs(batch, seq_len, rng, lengths=lengths)
        args = [torch.from_numpy(feeds[n]) for n in contract.input_names]
        try:
            with torch.no_grad():
                out = model(*args)
        except Exception as e:
            raise ModelContractError(f"模型在输入 batch={batch} seq_len={seq_len} 上运行失败（六个输入按契约顺序："
                                     f"{list(contract.input_names)}）：{type(e).__name__}: {_first_lines(e)}") from e
        check_outputs(out, contract, batch, seq_len)
        records.append({"batch": batch, "seq_len": seq_len, "ok": True})
    return records


def check_exportable(model, contract: EngineContract, config: ServingConfig):
    """torch.export（batch 与 seq_len 动态）：torch 引擎与 ONNX 导出都从它开始。导出不了 -> ModelExportError
    （带导出器的消息）；导出的程序在探测形状上的输出再对照契约（丢了动态轴也在这里发现）。返回 ExportedProgram。"""
    import torch

    feeds = contract.random_inputs(*EXAMPLE_SHAPE, rng=np.random.default_rng(0),
                                   lengths=np.array([EXAMPLE_SHAPE[1], EXAMPLE_SHAPE[1] // 2]))
    args = tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)
    batch = torch.export.Dim("batch", min=1, max=max(2, config.export.max_batch_size))
    seq = torch.export.Dim("seq_len", min=1, max=max(2, config.export.max_seq_length))
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, dynamic_shapes=tuple({0: batch, 1: seq} for _ in args))
    except Exception as e:
        raise ModelExportError(f"torch.export 导出不了这个模型（batch 与 seq_len 动态）：{type(e).__name__}: "
                               f"{_first_lines(e)}") from e
    try:
        probe_contract(ep.module(), contract)
    except ModelContractError as e:
        raise ModelContractError(f"导出后的程序：{e}") from e
    return ep


def count_flops(model, contract: EngineContract, lengths: Sequence[int]) -> Dict[int, float]:
    """torch.utils.flop_counter 数的每请求 FLOPs（batch 1，长度 -> FLOPs）。它只数矩阵乘、卷积、注意力等算子。"""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    out = {}
    rng = np.random.default_rng(3)
    for n in sorted(set(int(x) for x in lengths)):
        feeds = contract.random_inputs(1, n, rng)
        args = [torch.from_numpy(feeds[k]) for k in contract.input_names]
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(*args)
        out[n] = float(counter.get_total_flops())
    return out


def flop_lengths(max_len: int) -> List[int]:
    return sorted({n for n in (1, 8, 32, 128, 512, 1024, 4096) if n < max_len} | {max_len})


# ---------------------------------------------------------------- 只属于参考模型的功能

def apply_features(model, config: ServingConfig, catalog: Catalog, log: Log):
    """模型提供了才用：目录约束（attach_catalog(semantic_ids)）、解码器 KV 缓存（decoder_kv_cache 属性）、
    拼行（forward_packed，只对 torch 引擎）。返回 (模型, 配置, {功能: 说明})；不改传入的配置。"""
    features = {}
    if not config.catalog.constrained_decoding:
        features["constrained_decoding"] = "关：catalog.constrained_decoding=false"
    elif callable(getattr(model, "attach_catalog", None)):
        model = model.attach_catalog(catalog.semantic_ids)
        features["constrained_decoding"] = f"开：模型提供 attach_catalog，按目录的 {len(catalog)} 个物品约束"
    else:
        features["constrained_decoding"] = "关：模型没有 attach_catalog(semantic_ids)，生成的码可能不对应物品（后处理丢掉它们）"
    if hasattr(model, "decoder_kv_cache"):
        model.decoder_kv_cache = config.export.decoder_kv_cache
        features["decoder_kv_cache"] = f"{'开' if config.export.decoder_kv_cache else '关'}：模型提供 decoder_kv_cache 开关"
    else:
        features["decoder_kv_cache"] = "关：模型没有 decoder_kv_cache 开关（export.decoder_kv_cache 不适用）"
    if config.engine.kind == "torch" and config.engine.pack_rows:
        if callable(getattr(model, "forward_packed", None)):
            features["pack_rows"] = "开：模型提供 forward_packed"
        else:
            features["pack_rows"] = "关：模型没有 forward_packed，按长度分组填充"
            config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, pack_rows=False))
    else:
        features["pack_rows"] = f"关：engine.kind={config.engine.kind}、engine.pack_rows={config.engine.pack_rows}"
    if config.engine.seq_bucket_plan:
        features["seq_bucket_plan"] = "长度桶按 b + b²/c 的通用代价规划（参考模型的 FLOPs 公式不适用）"
    for k, v in features.items():
        log(f"      {k}: {v}")
    return model, config, features


def load_user_model(config: ServingConfig, catalog: Catalog, onnx_dst: str, log: Log) -> UserModel:
    """按 model.source 加载 -> 功能 -> 契约探测 -> 导出检查 -> FLOPs。任何一步不通过都在写任何文件之前停下
    （onnx 来源只写修补后的 onnx_dst）。"""
    src = config.model.source
    contract = config.contract()
    report: Dict[str, Any] = {"source": src}
    if src == "onnx":
        if config.engine.kind == "torch":
            raise ConfigError("model.source=onnx 只能用 engine=onnxruntime 或 engine=tensorrt（torch 引擎需要 PyTorch 模型："
                              "用 model.source=module 或 exported）")
        path = prepare_onnx(os.path.abspath(config.model.path), onnx_dst, contract)
        model = OnnxModel(path, contract)
        report["model"] = os.path.abspath(config.model.path)
    elif src == "exported":
        model = load_exported(os.path.abspath(config.model.path))
        report["model"] = os.path.abspath(config.model.path)
    elif src == "module":
        model = load_module(config, log)
        report["model"] = config.model.factory + (f" + {config.checkpoint}" if config.checkpoint else "")
    else:
        raise ConfigError(f"load_user_model 只处理用户的模型，得到 model.source={src}")
    log(f"[2/5] 模型：model.source={src}（{report['model']}）")
    model, config, report["features"] = apply_features(model, config, catalog, log)
    report["probe"] = probe_contract(model, contract)
    if src != "onnx":
        model = six_inputs(model)
    log(f"      契约探测通过：{[(r['batch'], r['seq_len']) for r in report['probe']]} 上输出的名字、dtype、形状与语义 ID 取值")
    if src != "onnx":
        check_exportable(model, contract, config)
        log("      torch.export（batch 与 seq_len 动态）通过，导出的程序在探测形状上同样符合契约")
        lengths = flop_lengths(config.export.max_seq_length)
        report["flops_by_length"] = {str(k): v for k, v in count_flops(model, contract, lengths).items()}
        report["flops_method"] = "torch.utils.flop_counter（batch 1，按长度插值；只数矩阵乘、卷积、注意力等）"
    else:
        report["flops_method"] = "无：ONNX 来源没有 PyTorch 模型可数 FLOPs，不报告 MFU"
    return UserModel(model, config, onnx_path=onnx_dst if src == "onnx" else "", report=report)
