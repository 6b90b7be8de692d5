"""torch 引擎的 fp8（e4m3）：权重按输出通道量化、激活按行动态量化，用 torch._scaled_mm（按行缩放）相乘。

数学（与 float64 参考的对照见 tests/serving/runtime/engines/test_torch_fp8.py）：
- 权重 W [N, K]：每个输出通道 n 一个缩放 sw[n] = amax(|W[n, :]|) / 448，Wq = e4m3(W / sw)；
- 激活 X [M, K]：每行 m 一个缩放 sx[m] = amax(|X[m, :]|) / 448，Xq = e4m3(X / sx)（每次前向现算：动态）；
- Y = (Xq @ Wq^T) * sx * sw^T + bias：torch._scaled_mm(Xq, Wq.t(), scale_a=sx [M,1], scale_b=sw^T [1,N])，
  累加在 fp32，输出为模块的浮点类型（底本，见 engines/torch.fp8_base_precision），bias 在乘积里（不支持时在乘积之后加）。
448 是 e4m3fn 的最大有限值；e4m3fn 没有 inf，超出范围的转换结果依实现而定（CPU 的 torch 夹到 448，
不饱和的转换给 NaN），所以量化前先夹到 ±448。

哪些层量化由构建时的逐层计时决定（engines/layer_choice.py，像 TensorRT 选 tactic）：计划（权重名 -> 从多少行起用 fp8）
存在 .pt2 的附加文件 PLAN_FILE 里，服务进程加载 .pt2 后按计划改图，不再计时。行数少于门槛时这一层仍走原精度的
F.linear（小矩阵乘在任何精度下都受发射限制，fp8 还要多一次量化）；因此保留原精度的权重。
为什么在加载后的 GraphModule 上改、而不是量化后再 torch.export：与 int8 相同（见 torch_int8.py），.pt2 在 CPU 上导出、与设备无关。

硬件：fp8 矩阵乘要 compute capability >= 8.9（Ada 也有），本项目针对并测量的是 Hopper（sm_90+，
cuBLASLt 的 nvjet_sm90 内核）。CPU 上 torch 2.13 的 _scaled_mm 可以运行（测试用它对照），但没有速度，构建拒绝。
"""
from __future__ import annotations

import json
import logging
import zipfile
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from algorithm.errors import ConfigError

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # float8_e4m3fn 的最大有限值
SCALE_EPS = 1e-12  # 全零行的 amax 下限：缩放不为 0，量化结果为 0
PLAN_FILE = "fp8_plan.json"  # .pt2 附加文件（torch.export.save 的 extra_files）的名字
MIN_CAPABILITY = (8, 9)  # fp8 张量核的最低 compute capability
TARGET_CAPABILITY = (9, 0)  # 本项目针对并测量的：Hopper
# 保持原精度的模块名前缀：打分头（理由同 int8，见 torch_int8.KEEP_PREFIXES）
KEEP_PREFIXES = ("heads",)
# _scaled_mm 的形状要求：K 与 N 是 16 的倍数（行数 M 不限）
ALIGN = 16


def _torch():
    import torch

    return torch


# ---------------------------------------------------------------- 设备支持
def unsupported_reason(device: str, capability: Optional[Tuple[int, int]] = None) -> Optional[str]:
    """这台设备上 fp8 矩阵乘不可用的原因（中文一句）；可用时 None。capability 给出时不查询 GPU（测试用）。"""
    torch = _torch()
    if not hasattr(torch, "float8_e4m3fn") or not hasattr(torch, "_scaled_mm"):
        return f"这个 PyTorch（{torch.__version__}）没有 float8_e4m3fn / torch._scaled_mm"
    if device != "cuda":
        return (f"设备是 {device}：fp8 只在 NVIDIA GPU 的 fp8 张量核上有速度（compute capability >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}，本项目针对 Hopper sm_90+）")
    if capability is None:
        if not torch.cuda.is_available():
            return "PyTorch 看不到 GPU（torch.cuda.is_available() 为 False）"
        capability = tuple(torch.cuda.get_device_capability())
    if tuple(capability) < MIN_CAPABILITY:
        return (f"GPU 的 compute capability 是 {capability[0]}.{capability[1]}，没有 fp8 张量核（要 >= "
                f"{MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}；本项目针对 Hopper sm_90+，如 H100 / H200）")
    return None


# ---------------------------------------------------------------- 量化
def quantize_rows(x):
    """按最后一维（每行）对称量化到 e4m3：返回 (q 同形状 float8_e4m3fn, scale [..., 1] float32)，x ≈ q * scale。"""
    torch = _torch()
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_EPS) / FP8_MAX
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def quantize_weight(w):
    """权重 [N, K] 按输出通道量化：返回 (wq [N, K] e4m3 连续, sw [1, N] float32 连续)——_scaled_mm 的 scale_b 形状。"""
    q, s = quantize_rows(w)
    return q.contiguous(), s.reshape(1, -1).contiguous()


def dequantize(q, scale):
    """q * scale（float32）：测试与误差报告用。"""
    return q.float() * scale


# 融合的按行量化（Triton，一行一个程序：读一次、求 amax、写 e4m3 与缩放）；GPU 上第一次用到时与上面的 eager 版对照，
# 不一致或没有 Triton 时用 eager 版（5–7 个逐元素 / 归约内核）。键：设备字符串 -> 可调用或 None
_FUSED: Dict[str, Optional[Callable]] = {}


def _triton_quantizer():
    import triton
    import triton.language as tl

    torch = _torch()

    @triton.jit
    def _kernel(x_ptr, q_ptr, s_ptr, K, stride_x, BLOCK: tl.constexpr, QMAX: tl.constexpr, EPS: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        m = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=m, other=0.0).to(tl.float32)
        amax = tl.maximum(tl.max(tl.abs(x), axis=0), EPS)
        scale = amax / QMAX
        q = tl.minimum(tl.maximum(x / scale, -QMAX), QMAX)
        tl.store(q_ptr + row * K + offs, q.to(q_ptr.dtype.element_ty), mask=m)
        tl.store(s_ptr + row, scale)

    def quantize(x2d):
        m, k = x2d.shape
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        q = torch.empty((m, k), device=x2d.device, dtype=torch.float8_e4m3fn)
        s = torch.empty((m, 1), device=x2d.device, dtype=torch.float32)
        if m:
            _kernel[(m,)](x2d, q, s, k, x2d.stride(0), BLOCK=triton.next_power_of_2(k), QMAX=FP8_MAX, EPS=SCALE_EPS)
        return q, s

    return quantize


def _check_quantizer(fn, device) -> bool:
    """fn 与 quantize_rows 在随机行（含全零行、很大的行）上一致：缩放相对差 <= 1e-6，反量化的值相差至多 e4m3 的一格。"""
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(37, 768, generator=g) * torch.logspace(-3, 3, 37).reshape(-1, 1)
    x[5] = 0
    x = x.to(device=device, dtype=torch.bfloat16)
    q, s = fn(x)
    rq, rs = quantize_rows(x)
    if not torch.allclose(s, rs, rtol=1e-6, atol=0):
        return False
    a, b = dequantize(q, s), dequantize(rq, rs)
    return bool(((a - b).abs() <= b.abs() / 8 + rs * 2 ** -9).all())


def row_quantizer(device) -> Tuple[Callable, str]:
    """这个设备上用的按行量化：(函数 [M,K] -> (q, scale [M,1]), 名字 "triton" / "eager")。"""
    key = str(device)
    torch = _torch()
    if key not in _FUSED:
        fn = None
        if torch.device(key).type == "cuda":
            if torch.cuda.is_current_stream_capturing():  # 自检要同步：捕获中先用 eager 版、不缓存（运行器捕获前已预热过）
                return quantize_rows, "eager"
            try:
                cand = _triton_quantizer()
                if _check_quantizer(cand, key):
                    fn = cand
                else:
                    log.warning("Triton 的 fp8 按行量化与 eager 版不一致：用 eager 版")
            except Exception as e:  # noqa: BLE001  没有 Triton 或编译失败：用 eager 版
                log.warning("Triton 的 fp8 按行量化不可用（%s: %s）：用 eager 版", type(e).__name__, str(e)[:200])
        _FUSED[key] = fn
    fn = _FUSED[key]
    return (fn, "triton") if fn is not None else (quantize_rows, "eager")


# ---------------------------------------------------------------- 乘积
# (设备类型, 输出 dtype) -> _scaled_mm 是否接受按行缩放时的 bias；第一次（eager 下）试过后记住
_BIAS_IN_MM: Dict[Tuple[str, str], bool] = {}


def scaled_mm(xq, sx, wq, sw, bias, out_dtype):
    """Y = (xq @ wq^T) * sx * sw + bias，xq [M,K]、wq [N,K] e4m3，sx [M,1]、sw [1,N] float32。
    bias 放进 _scaled_mm（在它的尾声里加）；这个版本不接受时（按行缩放 + bias 的组合曾经不支持）在乘积之后加一次。"""
    torch = _torch()
    key = (xq.device.type, str(out_dtype))
    if bias is not None and _BIAS_IN_MM.get(key, True):
        try:
            y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, bias=bias.to(out_dtype), out_dtype=out_dtype)
            _BIAS_IN_MM[key] = True
            return y
        except RuntimeError:
            if key in _BIAS_IN_MM:
                raise
            _BIAS_IN_MM[key] = False
    y = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


def fp8_linear(x, weight, bias, wq, sw, min_rows: int):
    """F.linear(x, weight, bias) 的替身：行数（x 除最后一维外的元素数）>= min_rows 时走 fp8，否则走原精度。
    行数在 eager 与 CUDA Graph 捕获时是具体的整数，分支不进图；torch.compile(dynamic=True) 时会按门槛加守卫。"""
    import torch.nn.functional as F

    k = x.shape[-1]
    flat = x.reshape(-1, k)
    if flat.shape[0] < min_rows or flat.shape[0] == 0:
        return F.linear(x, weight, bias)
    quantize, _ = row_quantizer(x.device)
    xq, sx = quantize(flat)
    y = scaled_mm(xq, sx, wq, sw, bias, x.dtype)
    return y.reshape(*x.shape[:-1], y.shape[-1])


# ---------------------------------------------------------------- 导出的图
def _keep(weight_name: str) -> bool:
    """打分头留在原精度：名字里任一段是 KEEP_PREFIXES（拼行导出时模型包在 PackedUGT.model 里，名字是 model.heads.N）。"""
    return keep_module(weight_name.rsplit(".", 1)[0], KEEP_PREFIXES)


def keep_module(fqn: str, prefixes) -> bool:
    """fqn 里有一段（或连续几段）等于 prefixes 中的某一个：不论外面包了几层模块。"""
    padded = f".{fqn}."
    return any(f".{p}." in padded for p in prefixes)


def _get(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def linear_nodes(gm) -> List[Tuple[object, str]]:
    """GraphModule 里可以换成 fp8 的 aten.linear：(节点, 权重名)。权重须是 get_attr、K 与 N 是 ALIGN 的倍数、不在打分头里。"""
    torch = _torch()
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not torch.ops.aten.linear.default or len(n.args) < 2:
            continue
        w = n.args[1]
        if getattr(w, "op", None) != "get_attr" or _keep(str(w.target)):
            continue
        nout, k = _get(gm, str(w.target)).shape
        if k % ALIGN == 0 and nout % ALIGN == 0:
            out.append((n, str(w.target)))
    return out


def record_linear_rows(gm, run: Callable[[], None]) -> Dict[str, Dict[str, object]]:
    """运行 run()（在 gm 上跑几组代表性的输入），记下每个可量化线性层见到的行数。
    返回 {权重名: {"k": K, "n": N, "rows": [升序的行数]}}；gm 运行后恢复原样。"""
    torch = _torch()
    import torch.nn.functional as F

    nodes = linear_nodes(gm)
    seen: Dict[str, set] = {name: set() for _, name in nodes}

    def recorder(name):
        def f(x, weight, bias=None):
            seen[name].add(int(x.numel() // x.shape[-1]))
            return F.linear(x, weight, bias)
        return f

    saved = [(n, n.target) for n, _ in nodes]
    try:
        for n, name in nodes:
            n.target = recorder(name)
        gm.recompile()
        run()
    finally:
        for n, target in saved:
            n.target = target
        gm.recompile()
    out = {}
    for n, name in nodes:
        nout, k = _get(gm, name).shape
        out[name] = {"k": int(k), "n": int(nout), "rows": sorted(seen[name])}
    return out


def read_plan(path: str) -> Dict:
    """从 .pt2 里读 fp8 计划（torch.export.save 的 extra_files 存在归档的 <名字>/extra/ 下）；不加载程序本身。"""
    with zipfile.ZipFile(path) as z:
        hits = [n for n in z.namelist() if n.endswith("/extra/" + PLAN_FILE)]
        if not hits:
            raise ConfigError(f"{path} 里没有 fp8 计划（{PLAN_FILE}）：这个 .pt2 不是 precision=fp8 的构建产物")
        return json.loads(z.read(hits[0]).decode("utf-8"))


def apply_plan(gm, plan: Dict):
    """按计划原地改 GraphModule（已在目标设备上）：计划里有门槛的层换成 fp8_linear，权重在设备上量化一次。返回 gm。
    计划：{"layers": {权重名: {"min_rows": int 或 None（None = 保持原精度）}}}。图里找不到的层是错误（计划与程序不配）。"""
    torch = _torch()
    layers = {name: e for name, e in plan.get("layers", {}).items() if e.get("min_rows") is not None}
    found = {name: n for n, name in linear_nodes(gm)}
    missing = sorted(set(layers) - set(found))
    if missing:
        raise ConfigError(f"fp8 计划里的层在程序里找不到（计划与 .pt2 不配）：{missing[:5]}")
    for i, (name, entry) in enumerate(sorted(layers.items())):
        node = found[name]
        wq, sw = quantize_weight(_get(gm, name).detach())
        qname, sname = f"fp8_weight_{i}", f"fp8_scale_{i}"
        gm.register_buffer(qname, wq)
        gm.register_buffer(sname, sw)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        with gm.graph.inserting_before(node):
            qn, sn = gm.graph.get_attr(qname), gm.graph.get_attr(sname)
        node.target = fp8_linear
        node.args = (node.args[0], node.args[1], bias, qn, sn, int(entry["min_rows"]))
        node.kwargs = {}
    gm.recompile()
    return gm


def quantized_layers(gm) -> List[str]:
    """已换成 fp8_linear 的层的权重名（报告与测试用）。"""
    return sorted(str(n.args[1].target) for n in gm.graph.nodes if n.op == "call_function" and n.target is fp8_linear)


def fp8_transform(plan: Dict):
    """运行器的 transform：在加载并移到设备后的模块上应用计划。"""
    def apply(module):
        return apply_plan(module, plan)

    return apply


def plan_counts(plan: Dict) -> Tuple[int, int]:
    """(量化的层数, 可量化的层数)。"""
    layers: Iterable = plan.get("layers", {}).values()
    layers = list(layers)
    return sum(e.get("min_rows") is not None for e in layers), len(layers)


__all__ = ["FP8_MAX", "PLAN_FILE", "apply_plan", "dequantize", "fp8_linear", "fp8_transform", "linear_nodes",
           "plan_counts", "quantize_rows", "quantize_weight", "quantized_layers", "read_plan", "record_linear_rows",
           "row_quantizer", "scaled_mm", "unsupported_reason"]
