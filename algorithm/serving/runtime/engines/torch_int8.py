"""torch 引擎的 int8：torchao 的 quantize_，只量化编码器/解码器的投影与 FFN 的线性层。

打分头（model.heads，输出维 = 码本大小）与嵌入保持原精度：打分头的 logits 直接决定 beam 排序，
其量化误差会让 top-50 的边界项互换（与 onnxruntime int8 的选择一致，见 engines/onnxruntime.py 的 int8_weight_matmuls）。

两种输入（quantize_int8 自动识别）：
- eager 的 nn.Module（UGTModel）：按 nn.Linear 与模块名过滤；
- torch.export.load(...).module() 得到的 GraphModule（服务时的 .pt2）：里面没有 nn.Linear，线性层是对参数的
  aten.linear 调用。先把要量化的权重的 aten.linear 改成 F.linear（torchao 的量化张量只在 F.linear 这一层
  接管；aten.linear 会被分解成 t + addmm，量化张量不支持），再按权重名量化。

为什么在服务时（加载 .pt2、移到设备之后、torch.compile 之前）量化，而不是量化后再 torch.export：
torchao 在追踪时按张量所在设备选实现——在 CPU 上导出的程序固化的是 CPU 的 int8 路径
（_int_scaled_matmul_cpu / aten._int_mm），还带 torchao 的自定义算子（加载需 import torchao）；
而本项目在 CPU 上导出、在 GPU 上运行。先移到 GPU 再量化，torch.compile 看到的是 GPU 的 int8 路径
（Inductor 的 int8 矩阵乘模板），所以 .pt2 仍按浮点导出（GPU 上 bf16、CPU 上 fp32，为什么不是 fp16 见
engines/torch.int8_base_precision），int8 只是服务时的一步变换。
"""
from __future__ import annotations

import logging
from typing import Callable, Optional, Set

from algorithm.errors import ConfigError, MissingDependencyError
from algorithm.serving.runtime.engines.torch_fp8 import keep_module

log = logging.getLogger(__name__)

MODES = ("dynamic", "weight_only")
# torch._int_mm（CUDA 上 cuBLAS 的 int8 矩阵乘，torchao 动态 int8 与 Inductor 都用它）要求行数 > 16：
# 解码第 1 步的行数就是 batch（桶 2 / 8 / 16 都不够），所以动态 int8 在 CUDA 上把行数补到 17 再算、再切回
MIN_INT_MM_ROWS = 17
# 保持原精度的模块名前缀：打分头（嵌入不是线性层，本就不会被量化）
KEEP_PREFIXES = ("heads",)


def _torchao_config(mode: str):
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:
        raise MissingDependencyError(
            "torch 引擎的 int8 需要 torchao（pip install torchao，版本须与 PyTorch 匹配）；"
            f"导入失败：{type(e).__name__}: {e}") from e
    if mode == "dynamic":
        install_capture_safe_int_mm()
        return quantize_, Int8DynamicActivationInt8WeightConfig()
    if mode == "weight_only":
        return quantize_, Int8WeightOnlyConfig()
    raise ConfigError(f"int8 量化模式 {mode!r} 不合法；可选 {list(MODES)}")


# capture_safe_int_mm 每条路走过几次（进程内累计）：int8 慢时先看矩阵乘是不是落到了回退路径（CPU 上的 int32 乘、
# cuBLAS 拒绝后的 fp32 乘）而不是 int8 张量核。CUDA Graph 重放不经过 Python，所以这里数的是预热与捕获时的调用
INT_MM_PATHS = {"compiled": 0, "cublas_int8": 0, "cublas_int8_tn": 0, "cpu_int32": 0, "fp32_fallback": 0}
# (设备, K, N) -> torch._int_mm 能否直接吃这个形状的 TN 布局（见 tn_layout_ok）：每种权重形状第一次在 eager 下用到时自检一次
_TN_OK: dict = {}
# 自检的行数：17 = MIN_INT_MM_ROWS（解码第 1 步补到的行数；cuBLAS 对转置的 mat2 算错过的正是这类小行数，pytorch#107671），
# 64 = 一般的情形
TN_CHECK_ROWS = (MIN_INT_MM_ROWS, 64)


def tn_layout_ok(mat2) -> bool:
    """torch._int_mm(a, mat2) 在 mat2 是 N×K 连续权重的转置视图（TN 布局，cuBLASLt int8 张量核要的布局）时，
    对这个设备与这个 (K, N) 是否给出精确的结果（与 float64 的参考逐位相同，行数取 TN_CHECK_ROWS）。

    为什么要它：torchao 的 safe_int_mm 把不连续的 mat2 一律拷成连续（注释说 cuBLAS 对某些转置组合静默算错），
    torchao 的 int8 张量传进来的正是转置视图，于是每次矩阵乘先拷一次权重，再用 NN 布局。H200 上（torch 2.11 + CUDA 13，
    ugt_base 的线性层形状，benchmarks/h200-2026-11-28-run3/int8mm）NN 布局落到 A100 代的 WMMA 兼容内核
    （cutlass_80_wmma_..._forwardCompat_..._nn_align4，只量内核时比 fp16 慢 5.5 倍多），TN 布局用
    cutlass_80_tensorop_i16832gemm_s8_..._tn_align16：M=8192 时每次调用（含主机发射）快 3.1-3.6 倍，
    12 个形状（M 17–8192）的结果都与 float64 参考完全相同。算错的 cuBLAS 版本与形状有关，所以按 (设备, K, N) 各自检一次，
    结果不对或报错就照旧拷成连续。自检要同步：CUDA Graph 捕获中遇到没自检过的形状时不自检、不缓存，先走拷贝的路
    （运行器捕获前在 eager 下预热过每个形状，正常不会走到这里）。"""
    import torch

    k, n = mat2.shape
    key = (str(mat2.device), int(k), int(n))
    if key in _TN_OK:
        return _TN_OK[key]
    if mat2.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randint(-128, 128, (int(n), int(k)), dtype=torch.int8, generator=g).to(mat2.device)
    ok = True
    try:
        for rows in TN_CHECK_ROWS:
            a = torch.randint(-128, 128, (rows, int(k)), dtype=torch.int8, generator=g).to(mat2.device)
            want = a.double() @ w.double().t()  # int8 乘积之和 < 2^53：float64 精确
            if not torch.equal(torch._int_mm(a, w.t()).double(), want):
                ok = False
                break
    except RuntimeError:  # 这个版本或这个形状不接受转置视图
        ok = False
    _TN_OK[key] = ok
    if not ok:
        log.warning("torch._int_mm 的 TN 布局在 %s 的 K=%d N=%d 上自检不通过：这个形状照旧把权重拷成连续（NN）", *key)
    return ok


def capture_safe_int_mm(input, mat2):
    """torchao.kernel.intmm.safe_int_mm 的替身：同样的几条路（编译、cuBLAS、两种回退），但不调用 input.__repr__()。

    为什么：torchao 0.18 的 safe_int_mm 第一行用 `"FakeTensor" in input.__repr__()` 判断是否在追踪；eager 下 CUDA 张量的
    repr 要把数值拷回主机并格式化——每个 int8 矩阵乘一次同步。CUDA Graph 捕获中的同步使捕获失效，H100 上动态 int8 捕获时
    正是 cudaErrorStreamCaptureInvalidated；不用图时每次前向几百次 repr，b16 / b64 只有 20 / 120 req/s
    （benchmarks/h100-2026-11-27/machine4/profile_int8_dynamic_none）。动态 int8 的线性层经 int_scaled_matmul 调它
    （torchao/quantization/quantize_/workflows/int8/int8_tensor.py），int_scaled_matmul 按模块全局名查找，所以替换模块属性即可。
    """
    import torch
    from torch._higher_order_ops.out_dtype import out_dtype
    from torch._subclasses.fake_tensor import FakeTensor

    if torch.compiler.is_compiling() or isinstance(input, FakeTensor):  # 编译路径：与 torchao 相同
        INT_MM_PATHS["compiled"] += 1
        if input.device.type == "cpu":
            return out_dtype(torch.ops.aten.mm.default, torch.int32, input.float(), mat2.float())
        return out_dtype(torch.ops.aten.mm.default, torch.int32, input, mat2)
    assert mat2.device == input.device, f"两个张量应在同一设备上，得到 {mat2.device} 与 {input.device}"
    dims_ok = input.shape[1] > 0 and input.shape[1] % 8 == 0 and mat2.shape[1] > 0 and mat2.shape[1] % 8 == 0
    if input.device.type != "cuda" or not dims_ok:  # 回退：与 torchao 相同（在 CPU 上用 int32 乘）
        INT_MM_PATHS["cpu_int32"] += 1
        return torch.matmul(input.cpu().to(torch.int32), mat2.cpu().to(torch.int32)).to(input.device.type)
    tn = False
    if not mat2.is_contiguous():  # torchao 的注释：不连续时 cuBLAS 可能静默给出错误结果；TN 布局自检过就不拷
        tn = mat2.t().is_contiguous() and tn_layout_ok(mat2)
        if not tn:
            mat2 = mat2.contiguous()
    if not input.is_contiguous() and input.shape[0] % 8 != 0:
        input = input.contiguous()
    try:
        out = out_dtype(torch.ops.aten.mm.default, torch.int32, input, mat2)
        INT_MM_PATHS["cublas_int8_tn" if tn else "cublas_int8"] += 1
        return out
    except RuntimeError:
        if tn:  # TN 被拒（这个行数的形状不支持）：先试拷成连续的 int8，再退到 fp32
            try:
                out = out_dtype(torch.ops.aten.mm.default, torch.int32, input, mat2.contiguous())
                INT_MM_PATHS["cublas_int8"] += 1
                return out
            except RuntimeError:
                pass
        INT_MM_PATHS["fp32_fallback"] += 1
        # 与 torchao 相同的回退：cuBLASLt 不支持的形状用 fp32 乘（H100 上 ugt_tiny 的 “24 行 x k 64”（不连续的权重拷成
        # 连续之后是 NN 布局）得到 CUBLAS_STATUS_NOT_SUPPORTED，2026-11-27 第 6 台；出错发生在启动内核之前，捕获不失效）
        return torch.matmul(input.to(torch.float32), mat2.to(torch.float32)).to(torch.int32)


def install_capture_safe_int_mm() -> bool:
    """把 torchao.kernel.intmm.safe_int_mm 换成 capture_safe_int_mm（幂等）；torchao 没有这个函数时不动，返回 False。"""
    try:
        from torchao.kernel import intmm
    except ImportError:
        return False
    if not hasattr(intmm, "safe_int_mm"):
        return False
    if intmm.safe_int_mm is not capture_safe_int_mm:
        intmm.ugt_original_safe_int_mm = intmm.safe_int_mm  # 留着原来的（测试拿它作对照）
        intmm.safe_int_mm = capture_safe_int_mm
    return True


def int_mm_rows(n):
    """n 行的输入补到几行：至少 MIN_INT_MM_ROWS（n 可以是符号整数）。"""
    import torch

    return torch.sym_max(MIN_INT_MM_ROWS, n)


def _linear_min_rows(x, weight, bias=None):
    """F.linear，但先把输入的行数（除最后一维外的元素数）用零补到至少 MIN_INT_MM_ROWS，结果再切回。
    动态 int8 的激活按行量化，补的零行不影响其它行；行数足够时补 0 行（形状是符号的，编译时不分支）。"""
    import torch.nn.functional as F

    flat = x.reshape(-1, x.shape[-1])
    n = flat.shape[0]
    flat = F.pad(flat, (0, 0, 0, int_mm_rows(n) - n))
    y = F.linear(flat, weight, bias)[:n]
    return y.reshape(*x.shape[:-1], y.shape[-1])


def _needs_min_rows(mode: str, model, pad_rows: Optional[bool]) -> bool:
    if pad_rows is not None:
        return bool(pad_rows)
    if mode != "dynamic":
        return False
    p = next(iter(model.parameters()), None)
    return p is not None and p.device.type == "cuda"


def torchao_version() -> Optional[str]:
    try:
        import torchao
    except ImportError:
        return None
    return getattr(torchao, "__version__", "unknown")


def _keep(fqn: str) -> bool:
    """打分头不量化，不论外面包了几层（拼行导出时是 model.heads.N）。"""
    return keep_module(fqn, KEEP_PREFIXES)


def linear_weight_names(gm) -> Set[str]:
    """GraphModule 里作为 aten.linear / F.linear 第二个参数（权重）的参数名。"""
    import torch

    targets = (torch.ops.aten.linear.default, torch.nn.functional.linear, _linear_min_rows)
    names = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in targets and len(n.args) > 1 \
                and getattr(n.args[1], "op", None) == "get_attr":
            names.add(str(n.args[1].target))
    return names


def quantize_exported_module(gm, mode: str = "dynamic", pad_rows: Optional[bool] = None):
    """原地量化 torch.export.load(...).module() 得到的 GraphModule；返回它。应在 gm.to(device) 之后调用。
    pad_rows：None = 动态 int8 且在 CUDA 上时把小行数补到 MIN_INT_MM_ROWS（见 _linear_min_rows）。"""
    import torch

    quantize_, config = _torchao_config(mode)
    target = _linear_min_rows if _needs_min_rows(mode, gm, pad_rows) else torch.nn.functional.linear
    names = {w for w in linear_weight_names(gm) if not _keep(w.rsplit(".", 1)[0])}
    if not names:
        raise ConfigError("导出的程序里没有可量化的线性层（aten.linear 的权重）")
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch.ops.aten.linear.default \
                and getattr(n.args[1], "op", None) == "get_attr" and str(n.args[1].target) in names:
            n.target = target
    gm.recompile()
    modules = {w.rsplit(".", 1)[0] for w in names}
    quantize_(gm, config, filter_fn=lambda mod, fqn: fqn in modules)
    return gm


def quantize_int8(model, mode: str = "dynamic", filter_fn: Optional[Callable] = None,
                  pad_rows: Optional[bool] = None):
    """原地把 model 的线性层量化为 int8（torchao），返回 model。

    mode："dynamic" = 激活按行动态 int8 + 权重按通道 int8（Int8DynamicActivationInt8WeightConfig，
    计算密集的大 batch 用 int8 张量核）；"weight_only" = 只有权重 int8（Int8WeightOnlyConfig，省带宽，小 batch）。
    model 可以是 eager 的 UGTModel，也可以是 torch.export.load(...).module()（见模块文档）。
    先 model.to(device, dtype) 再量化：torchao 按张量所在设备选择实现。
    pad_rows：None = 动态 int8 且在 CUDA 上时，被量化的线性层把小行数补到 MIN_INT_MM_ROWS（torch._int_mm 的限制）。
    """
    import types

    import torch

    if isinstance(model, torch.fx.GraphModule) and not any(isinstance(m, torch.nn.Linear) for m in model.modules()):
        return quantize_exported_module(model, mode, pad_rows)
    quantize_, config = _torchao_config(mode)
    if filter_fn is None:
        def filter_fn(mod, fqn):  # noqa: E306
            return isinstance(mod, torch.nn.Linear) and not _keep(fqn)
    pad = _needs_min_rows(mode, model, pad_rows)
    quantize_(model, config, filter_fn=filter_fn)
    if pad:
        for fqn, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and type(mod.weight) not in (torch.nn.Parameter, torch.Tensor):
                mod.forward = types.MethodType(lambda self, x: _linear_min_rows(x, self.weight, self.bias), mod)
    return model


def quantized_weight_names(model) -> Set[str]:
    """已被量化（权重为张量子类）的参数名，用于报告与测试。"""
    import torch

    return {n for n, p in model.named_parameters() if type(p) not in (torch.nn.Parameter, torch.Tensor)}


__all__ = ["INT_MM_PATHS", "MODES", "capture_safe_int_mm", "tn_layout_ok", "install_capture_safe_int_mm", "int_mm_rows", "linear_weight_names",
           "quantize_exported_module", "quantize_int8", "quantized_weight_names", "torchao_version"]
