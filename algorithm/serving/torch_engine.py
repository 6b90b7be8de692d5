"""torch 引擎：torch.export 得到与设备无关的 .pt2，服务时加载、（可选）torch.compile，
并在 GPU 上按 (batch 桶, 长度桶) 捕获 CUDA Graph。

为什么不是 AOTInductor：在本项目的 H100 上，一个 AOTInductor 包编译成功（99 s）但加载时段错误；
torch.compile + 手动 CUDA Graph 能工作。为什么 dynamic=True 只编译一次：按静态形状编译每个形状要 50-95 s，
桶有 batch x 长度 个组合；动态形状编译一次，再为每个桶捕获一张 CUDA Graph（捕获只是运行一次）。
编译缓存目录（TORCHINDUCTOR_CACHE_DIR）放在构建目录里，重启时复用。

输入在到达设备之前已由 EngineModel 按契约校验（越界 id 会触发 device-side assert 并毁掉 CUDA 上下文）。
"""
from __future__ import annotations

import copy
import logging
import os
import time
from typing import Dict, Mapping, Sequence, Tuple

import numpy as np

from algorithm.interfaces import EngineContract
from algorithm.serving.errors import ConfigError, MissingDependencyError

log = logging.getLogger(__name__)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _torch():
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("torch 引擎需要 PyTorch") from e
    return torch


def resolve_device(name: str) -> str:
    """auto -> 有 GPU 用 cuda，否则 cpu；其它原样返回。"""
    if name != "auto":
        return name
    return "cuda" if _torch().cuda.is_available() else "cpu"


def export_torch_program(model, path: str, config) -> str:
    """torch.export（batch 与 seq_len 动态）-> .pt2。precision 决定权重 dtype（fp16 / fp32）。"""
    torch = _torch()
    precision = config.export.precision
    if precision not in ("fp32", "fp16"):
        raise ConfigError(f"torch 引擎支持 export.precision=fp32 / fp16，得到 {precision!r}")
    dtype = getattr(torch, DTYPES[precision])
    m = copy.deepcopy(model).eval().to(dtype)
    # 掩码与前缀树缓冲区保持原类型（bool / 整数），只有浮点参数变精度
    contract = model.cfg.contract()
    feeds = contract.random_inputs(2, 16, np.random.default_rng(0), lengths=np.array([16, 8]))
    args = tuple(torch.from_numpy(feeds[n]) for n in contract.input_names)
    batch = torch.export.Dim("batch", min=1, max=max(2, config.export.max_batch_size))
    seq = torch.export.Dim("seq_len", min=1, max=max(2, config.export.max_seq_length))
    with torch.no_grad():
        ep = torch.export.export(m, args, dynamic_shapes=tuple({0: batch, 1: seq} for _ in args))
    _strip_device_asserts(ep)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.export.save(ep, path)
    return path


def _strip_device_asserts(ep) -> None:
    """torch.export 为每个 .to(dtype) 记录 _assert_tensor_metadata(device=导出时的设备)；
    程序在 CPU 上导出、在 GPU 上运行，这些断言会失败，所以删掉（dtype 由图本身保证）。"""
    torch = _torch()
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


def _bucket(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if b >= n:
            return b
    return n


class TorchRunner:
    """加载 .pt2，在 device 上运行。GPU 上按桶用 CUDA Graph 重放；CPU 上直接运行（可编译）。"""

    def __init__(self, path: str, contract: EngineContract, device: str = "cpu", device_id: int = 0,
                 compile_mode: str = "default", cuda_graphs: bool = True, batch_buckets: Sequence[int] = (),
                 seq_buckets: Sequence[int] = (), cache_dir: str = "", warmup: bool = True):
        torch = _torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise MissingDependencyError("engine.device=cuda，但 PyTorch 看不到 GPU（torch.cuda.is_available() 为 False）")
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        self.torch = torch
        self.contract = contract
        self.device = torch.device(f"cuda:{device_id}" if device == "cuda" else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        t0 = time.time()
        module = torch.export.load(path).module()
        module.to(self.device)
        self.module = module
        self.fn = module
        self.compile_mode = compile_mode
        if compile_mode != "none":
            self.fn = torch.compile(module, mode=compile_mode, dynamic=True)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.batch_buckets = sorted(batch_buckets)
        self.seq_buckets = sorted(seq_buckets)
        self.graphs: Dict[Tuple[int, int], tuple] = {}
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.load_seconds = time.time() - t0
        self.capture_seconds = 0.0
        if warmup and self.use_graphs:
            self.capture_all()

    @classmethod
    def from_params(cls, path: str, contract: EngineContract, device: str, device_id: int,
                    params: Mapping[str, str]) -> "TorchRunner":
        ints = lambda s: [int(x) for x in (s or "").split(",") if x.strip()]  # noqa: E731
        return cls(path, contract, device, device_id, compile_mode=params.get("compile_mode", "default"),
                   cuda_graphs=params.get("cuda_graphs", "1") == "1", batch_buckets=ints(params.get("batch_buckets")),
                   seq_buckets=ints(params.get("seq_buckets")), cache_dir=params.get("compile_cache_dir", ""))

    @classmethod
    def from_config(cls, path: str, contract: EngineContract, config, warmup: bool = True) -> "TorchRunner":
        from algorithm.serving.triton_config import seq_buckets

        e = config.engine
        return cls(path, contract, resolve_device(e.device), 0, e.compile_mode, e.cuda_graphs, e.batch_buckets,
                   seq_buckets(config), compile_cache_dir(config), warmup)

    # ---- CUDA Graph ----
    def _inputs_on_device(self, feeds: Mapping[str, np.ndarray]):
        return [self.torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device, non_blocking=True)
                for n in self.contract.input_names]

    def _capture(self, b: int, length: int):
        torch = self.torch
        feeds = self.contract.random_inputs(b, length, np.random.default_rng(b * 7919 + length))
        static = self._inputs_on_device(feeds)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):  # 预热：编译、分配工作区
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool), torch.no_grad():
            out = self.fn(*static)
        self.graphs[(b, length)] = (graph, static, out)
        return self.graphs[(b, length)]

    def capture_all(self) -> None:
        """为所有 (batch 桶, 长度桶) 捕获 CUDA Graph（加载时做，首个请求不承担）。"""
        t0 = time.time()
        for length in self.seq_buckets:
            for b in self.batch_buckets:
                self._capture(b, length)
        self.capture_seconds = time.time() - t0
        log.info("CUDA Graph：%d 个桶，%.1fs", len(self.graphs), self.capture_seconds)

    def run(self, feeds: Mapping[str, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
        torch = self.torch
        b, length = feeds["encoder_mask"].shape
        if self.use_graphs and self.batch_buckets and self.seq_buckets and b <= self.batch_buckets[-1] \
                and length <= self.seq_buckets[-1]:
            bb, lb = _bucket(b, self.batch_buckets), _bucket(length, self.seq_buckets)
            graph, static, out = self.graphs.get((bb, lb)) or self._capture(bb, lb)
            for t, name in zip(static, self.contract.input_names):
                t.zero_()  # 多出来的行与列是全填充（mask 0），模型对填充不变
                t[:b, :length].copy_(torch.from_numpy(np.ascontiguousarray(feeds[name])), non_blocking=True)
            graph.replay()
            return out[0][:b].cpu().numpy(), out[1][:b].float().cpu().numpy()
        with torch.no_grad():
            rec, scores = self.fn(*self._inputs_on_device(feeds))
        return rec.cpu().numpy(), scores.float().cpu().numpy()


def compile_cache_dir(config) -> str:
    return os.path.abspath(config.engine.compile_cache_dir or os.path.join(config.build_dir, "compile_cache"))


__all__ = ["TorchRunner", "export_torch_program", "compile_cache_dir", "resolve_device"]
