"""torch 引擎的剖析（GPU 上一次运行，不含 int8 约 1 分钟）：分阶段耗时与 roofline、SDPA 后端、长度桶的填充、离线吞吐与 MFU、int8。

  python scripts/engine_profile.py --repo build/gpu/model_repository --out $OUT/profile [--batches 8,16,64] [--quick]

读一个已构建仓库（engine=torch）的 ugt_engine/config.pbtxt，写 <out>/profile.json 与 profile.md：
  a. eager 模块（由同一个 .pt2 的权重重建的 UGTModel）按 forward 的顺序分阶段计时（GPU 上用 CUDA 事件，
     CPU 上用 perf_counter），分阶段的版本与 model(...) 的输出逐位比较（不一致时报告后以退出码 3 结束）；
  b. 带加性浮点掩码时各 SDPA 后端能否运行、各自耗时，以及默认选中的后端（profiler 里的算子名）；同一进程 eager 的两组对照：
     解码器自注意力 SDPA 对显式 softmax、每步重算前缀对 KV 缓存（时间、逐位一致、top-50 重合）；
  c. 默认长度分布下仓库的 seq 桶与 bucket_plan 规划的 4 个、8 个桶的填充比例；
  d. 每个阶段的 FLOPs、字节数（权重读一次 + 激活各读写一次的估计）、达到的 TFLOP/s 与 GB/s；
  e. 仓库里的 TorchRunner（编译 + CUDA Graph）按长度组成批的离线吞吐与 MFU；规划的 4 个、8 个桶下的同一测量；
     torchao 可用时 int8（服务时量化加载后的模块，再同样编译；--int8-modes 的每种方式一节，编译失败时退到
     eager + CUDA Graph、再退到 eager）的吞吐与对 fp32 的门禁数字（不过 INT8_GATE 时报告写“不通过”）。
  f. 最小与最大 batch 各一张内核表（一次运行的时间、内核自身时间合计、内核个数；int8 的每种方式另有最小 batch 的一张）；
     GPU 上再测一个进程里 1 / 2 / 4 张图在不同 CUDA 流上同时重放的吞吐（小 batch 的内核占不满 SM 时，几批同时跑能多出多少）。
每一节独立：失败只记进报告（error），预算（--budget-s）不够时跳过并写明原因；每节开始与结束都重写报告
（被外部超时杀掉时，报告里写着停在哪一节）。--only 只跑点名的节（例如 GPU 上单独测 int8：--only throughput,int8）。
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from algorithm.serving.config import GateConfig  # noqa: E402  （不拉进 torch）

# H100 SXM 规格书的稠密峰值（与 benchmarks/README.md 一致）
PEAK_FP16_TFLOPS = 989.0
PEAK_INT8_TOPS = 1979.0
PEAK_FP32_TFLOPS = 67.0
PEAK_HBM_TBS = 3.35
INPUT_NAMES = ("encoder_l1_ids", "encoder_l2_ids", "encoder_l3_ids", "encoder_positions", "encoder_token_types",
               "encoder_mask")


# ---------------------------------------------------------------- 仓库
def _engine_params(repo: str) -> Dict[str, str]:
    """ugt_engine/config.pbtxt 的 parameters -> {键: 字符串}。"""
    with open(os.path.join(repo, "ugt_engine", "config.pbtxt")) as f:
        text = f.read()
    try:
        from algorithm.serving.triton_config import parse_pbtxt

        mc = parse_pbtxt(text)
        return {k: v.string_value for k, v in mc.parameters.items()}
    except ImportError:
        import re

        out = {}
        for k, v in re.findall(r'key:\s*"([^"]+)"\s*value\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"', text):
            out[k] = v.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode("utf-8")
        return out


def _ints(v) -> List[int]:
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(x) for x in str(v or "").split(",") if x.strip()]


def load_repository(repo: str) -> Dict[str, Any]:
    """仓库 -> 剖析需要的事实。兼容两种参数格式：逐项的键（engine_file、seq_buckets、...）与
    一个 JSON 键 ugt_serving（{"config": ServingConfig, "runtime": RuntimeSpec}）。"""
    repo = os.path.abspath(repo)
    params = _engine_params(repo)
    info_path = os.path.join(repo, "build_info.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    if "ugt_serving" in params:
        d = json.loads(params["ugt_serving"])
        config, rt = d["config"], d["runtime"]
    else:
        config, rt = info.get("config", {}), params
    if not config.get("model"):
        raise SystemExit(f"{repo}: 找不到模型配置（config.pbtxt 的 ugt_serving 或 build_info.json 的 config.model）")
    engine_dir = os.path.join(repo, "ugt_engine", "1")
    engine_file = os.path.join(engine_dir, rt.get("engine_file") or "model.pt2")
    catalogs = [os.path.join(repo, "ugt_preprocess", "1", rt.get("catalog_file") or rt.get("catalog") or "catalog.npz")]
    catalogs += [os.path.join(root, f) for root, _, files in os.walk(repo) for f in files if f.endswith(".npz")]
    catalog = next((c for c in catalogs if os.path.isfile(c)), None)
    kind = rt.get("engine_kind", (config.get("engine") or {}).get("kind", "torch"))
    if kind != "torch":
        raise SystemExit(f"{repo}: 引擎是 {kind!r}，本脚本只剖析 engine=torch 的仓库")
    build_dir = config.get("build_dir") or os.path.dirname(repo)
    ckpt = config.get("checkpoint") or os.path.join(build_dir, "checkpoints", f"{config['model']['name']}.pt")
    if not os.path.isfile(ckpt):
        ckpt = os.path.join(os.path.dirname(repo), "checkpoints", f"{config['model']['name']}.pt")
    flag = rt.get("cuda_graphs", "1")
    return {"repo": repo, "engine_file": engine_file, "catalog": catalog, "model": config["model"],
            "max_seq_length": int((config.get("export") or {}).get("max_seq_length")
                                  or rt.get("max_seq_length") or config["model"]["max_seq_length"]),
            "seq_buckets": _ints(rt.get("seq_buckets")), "batch_buckets": _ints(rt.get("batch_buckets")),
            "compile_mode": rt.get("compile_mode", "default"),
            "cuda_graphs": flag is True or str(flag) in ("1", "True", "true"),
            "compile_cache_dir": rt.get("compile_cache_dir", ""), "precision": rt.get("precision")
            or (config.get("export") or {}).get("precision"),
            "constrained": (config.get("catalog") or {}).get("constrained_decoding", True),
            # 2026-11-28 之前的仓库没有这个键：那时的导出每步重算前缀
            "decoder_kv_cache": bool((config.get("export") or {}).get("decoder_kv_cache", False)),
            "length_median": float((config.get("benchmark") or {}).get("length_median", 100.0)),
            "length_sigma": float((config.get("benchmark") or {}).get("length_sigma", 1.0)),
            "checkpoint": ckpt if os.path.isfile(ckpt) else None}


def _torch_runner_cls(spec: str = ""):
    """TorchRunner 所在模块在重构中移动过：先找新位置，再找旧位置；spec（"模块:类"）可显式指定。"""
    if spec:
        import importlib

        mod, _, cls = spec.partition(":")
        return getattr(importlib.import_module(mod), cls or "TorchRunner")
    try:
        from algorithm.serving.runtime.engines.torch import TorchRunner
    except ImportError:
        from algorithm.serving.torch_engine import TorchRunner
    return TorchRunner


# ---------------------------------------------------------------- 模型
def eager_from_pt2(gm, cfg_dict: Dict[str, Any], kv_cache: bool):
    """用 .pt2 的权重与缓冲区（含目录约束的前缀树）重建 eager 的 UGTModel（同 dtype、同设备、同样的解码器缓存方式）。"""
    import torch

    from algorithm.models.config import UGTConfig
    from algorithm.models.ugt import UGTModel

    cfg = UGTConfig.from_dict(dict(cfg_dict))
    # 拼行的程序（engine.pack_rows）导出的是包了一层的 PackedUGT：名字多一个 "model." 前缀
    params = {_unwrap(n): p for n, p in gm.named_parameters()}
    buffers = {_unwrap(n): b for n, b in gm.named_buffers()}
    dtype = params["bos"].dtype
    device = params["bos"].device
    model = UGTModel(cfg).to(device=device, dtype=dtype).eval()
    model.decoder_kv_cache = kv_cache
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    constrained = "valid_l1" in buffers
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        mod.register_buffer(leaf, b.clone(), persistent=False)
    model.constrained = constrained
    return model


def _unwrap(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


class Clock:
    """GPU 上是 CUDA 事件（不打断异步执行），CPU 上是 perf_counter（同步执行，直接就是耗时）。"""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


class StageTimer:
    """with timer("名字"): ... —— 记录阶段的起止标记，并在 profiler 里打上同名区间。"""

    def __init__(self, clock: Optional[Clock]):
        self.clock = clock
        self.marks: List[Tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.clock is None:
            yield
            return
        import torch

        with torch.profiler.record_function(name):
            a = self.clock.mark()
            yield
            self.marks.append((name, a, self.clock.mark()))

    def seconds(self) -> Dict[str, float]:
        out: Dict[str, float] = {}
        for name, a, b in self.marks:
            out[name] = out.get(name, 0.0) + self.clock.seconds(a, b)
        return out


def staged_forward(model, args, st: StageTimer):
    """UGTModel.forward 的分阶段版本：按 forward 的顺序调用模型自己的方法，每段包在一个计时区间里。
    任何与 forward 不同之处都会让 check_staged_forward 失败。"""
    import torch

    from algorithm.models.ugt import expand_beams, gather_beams

    with st("embed"):
        x, bias = model.embed(*args)
    for i, layer in enumerate(model.encoder):
        with st(f"encoder.{i}"):
            x = layer(x, bias)
    with st("encoder.norm"):
        memory = model.enc_ln(x)
    with st("cross_kv"):
        memory_kv = [layer.cross_attn.project_kv(memory) for layer in model.decoder]
    with st("step1.decoder"):
        h, caches = model.decode_hidden(1, None, None, None, memory_kv, bias)
    with st("step1.head"):
        logp = model.head_logp(h, 0)
    with st("step1.select"):
        scores, c1 = model.select_l1(logp[:, 0, :])
        caches = expand_beams(caches, c1.shape[1])
    with st("step2.decoder"):
        h, caches = model.decode_hidden(2, c1, None, caches, memory_kv, bias)
    with st("step2.head"):
        logp = model.head_logp(h, 1)
    with st("step2.select"):
        scores, parent, c2 = model.select_l2(scores, c1, logp)
        c1 = torch.gather(c1, 1, parent)
        caches = gather_beams(caches, parent)
    with st("step3.decoder"):
        h, _ = model.decode_hidden(3, c1, c2, caches, memory_kv, bias)
    with st("step3.head"):
        logp = model.head_logp(h, 2)
    with st("step3.select"):
        return model.select_l3(scores, c1, c2, logp)


# ---------------------------------------------------------------- FLOPs 与字节
def stage_costs(cfg, batch: int, length: int, wbytes: int, kv_cache: bool) -> Dict[str, Dict[str, float]]:
    """每个阶段（batch 个请求、填充到 length）的 FLOPs 与字节数。FLOPs 与 flops_per_request 同一套公式
    （各阶段之和 = batch * flops_per_request(cfg, length)，测试保证）；字节 = 权重读一次 + 每个中间张量写一次
    读一次（eager 不融合时的下限估计；不含注意力矩阵：高效注意力核不把它写回显存）。"""
    d, f, k = cfg.d_model, cfg.dim_feedforward, cfg.beam_width
    v = cfg.codebook_sizes
    ne, nd = cfg.num_encoder_layers, cfg.num_decoder_layers
    s, B, L = wbytes, batch, length
    out: Dict[str, Dict[str, float]] = {}
    tok = B * L
    out["embed"] = {"flops": 0.0, "bytes": 6 * tok * 8 + 5 * tok * d * s + tok * d * s}
    for i in range(ne):
        out[f"encoder.{i}"] = {"flops": float(B * (L * (8 * d * d + 4 * d * f) + 4 * L * L * d)),
                               "bytes": float((4 * d * d + 2 * d * f) * s + tok * s * (2 * d + 2 * (5 * d + f)))}
    out["encoder.norm"] = {"flops": 0.0, "bytes": float(2 * tok * d * s)}
    out["cross_kv"] = {"flops": float(nd * tok * 4 * d * d), "bytes": float(nd * (2 * d * d * s + 3 * tok * d * s))}
    for step, (t, rows) in enumerate(((1, 1), (2, k), (3, k)), start=1):
        n = B * rows * (1 if kv_cache else t)  # 这一步算的位置数：有 KV 缓存时只有新位置，否则整个前缀
        out[f"step{step}.decoder"] = {
            "flops": float(nd * (n * (12 * d * d + 4 * d * f) + 4 * n * (t + L) * d)),
            "bytes": float(nd * ((6 * d * d + 2 * d * f) * s + n * s * (2 * d + 2 * (7 * d + f)) + 2 * tok * d * s))}
        rows_v = B * rows * v[step - 1]
        out[f"step{step}.head"] = {"flops": float(2 * d * rows_v),
                                   "bytes": float(d * v[step - 1] * s + B * rows * d * s + rows_v * (2 * s + 12))}
        out[f"step{step}.select"] = {"flops": 0.0, "bytes": float(rows_v * 4 * 2)}
    return out


def roofline(costs: Dict[str, Dict[str, float]], seconds: Dict[str, float], peak_tflops: float) -> List[Dict]:
    ridge = peak_tflops * 1e12 / (PEAK_HBM_TBS * 1e12)
    rows = []
    total = sum(seconds.values()) or 1.0
    for name, c in costs.items():
        t = seconds.get(name)
        if t is None:
            continue
        ai = c["flops"] / c["bytes"] if c["bytes"] else 0.0
        tf = c["flops"] / t / 1e12 if t > 0 else 0.0
        gb = c["bytes"] / t / 1e9 if t > 0 else 0.0
        bound_s = max(c["flops"] / (peak_tflops * 1e12), c["bytes"] / (PEAK_HBM_TBS * 1e12))
        rows.append({"stage": name, "ms": t * 1e3, "share": t / total, "gflop": c["flops"] / 1e9,
                     "mb": c["bytes"] / 1e6, "flop_per_byte": ai, "tflops": tf, "gbps": gb,
                     "compute_util": tf / peak_tflops, "bw_util": gb / (PEAK_HBM_TBS * 1e3),
                     "bound": "compute" if ai >= ridge else "memory", "roofline_ms": bound_s * 1e3,
                     "vs_roofline": bound_s / t if t > 0 else 0.0})
    return rows


# ---------------------------------------------------------------- 数据
class Histories:
    """按压测的长度分布抽样的历史（目录里的真实物品），编码方式与前处理相同（位置 0..n-1、行为类型 0、右侧填充）。"""

    def __init__(self, catalog_path: str, median: float, sigma: float, max_len: int):
        from algorithm.models.catalog import load_catalog

        self.catalog = load_catalog(catalog_path)
        self.order = np.argsort(self.catalog.item_ids)
        self.median, self.sigma, self.max_len = median, sigma, max_len

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.order[np.searchsorted(self.catalog.item_ids, ids, sorter=self.order)]

    def sample(self, n: int, seed: int) -> List[np.ndarray]:
        from algorithm.models.train import SyntheticSequences
        from algorithm.serving.bucket_plan import default_lengths

        data = SyntheticSequences(self.catalog, seed)
        return [data.sample(1, int(k), random_lengths=False)[0][0]
                for k in default_lengths(self.median, self.sigma, self.max_len, n, seed)]

    def batch(self, b: int, length: int, seed: int) -> Dict[str, np.ndarray]:
        """b 条按默认分布抽的历史，编码成正好 [b, length]（短的补齐、长的截断）：按形状计时、捕获图用。"""
        feeds = self.encode(self.sample(b, seed)[:b], pad_to=length)
        return {k: v[:, :length] for k, v in feeds.items()}

    def encode(self, histories: Sequence[np.ndarray], pad_to: int = 0) -> Dict[str, np.ndarray]:
        length = max(pad_to, max(len(h) for h in histories))
        b = len(histories)
        sem = np.zeros((b, length, 3), np.int64)
        mask = np.zeros((b, length), np.float32)
        for i, h in enumerate(histories):
            sem[i, :len(h)] = self.catalog.semantic_ids[self.rows(np.asarray(h))]
            mask[i, :len(h)] = 1.0
        pos = np.where(mask > 0, np.arange(length)[None, :], 0)
        return {"encoder_l1_ids": sem[..., 0], "encoder_l2_ids": sem[..., 1], "encoder_l3_ids": sem[..., 2],
                "encoder_positions": pos, "encoder_token_types": np.zeros((b, length), np.int64),
                "encoder_mask": mask}


# ---------------------------------------------------------------- 报告
# --only 可点的节（"int8" 代表各个 throughput_int8_*）
SECTIONS = ("environment", "load", "stage_check", "stages", "sdpa", "self_attention", "kv_cache", "padding",
            "throughput", "kernels_compiled", "concurrency", "throughput_planned", "throughput_planned_8", "int8")
KERNEL_NOTE = ("wall = 运行器一次 run 的时间（中位数，含拷入拷出）；busy = 各内核（CPU 上是算子）自身时间之和；"
               "launches = 内核（算子）次数")
# int8 的门禁（issue #12）：对 fp32 的 top-50 重合与 top-1 一致，与构建的门禁同一组阈值（GateConfig.int8_*）
INT8_GATE = {"overlap": GateConfig().int8_min_overlap, "top1": GateConfig().int8_min_top1_agreement}


class Report:
    ALWAYS = ("environment", "load")  # 其它节的前提

    def __init__(self, out_dir: str, t0: float, budget_s: float, only: Sequence[str] = ()):
        self.out_dir, self.t0, self.budget_s = out_dir, t0, budget_s
        self.only = set(only)  # 非空时只跑这些节（"int8" 代表各个 throughput_int8_*）
        self.data: Dict[str, Any] = {"sections": {}, "skipped": {}, "errors": {}}
        os.makedirs(out_dir, exist_ok=True)

    def left(self) -> float:
        return self.budget_s - (time.time() - self.t0)

    def wanted(self, name: str) -> bool:
        if not self.only or name in self.ALWAYS or name in self.only:
            return True
        return "int8" in self.only and name.startswith("throughput_int8")

    def section(self, name: str, fn: Callable[[], Any], need_s: float = 0.0) -> Any:
        if not self.wanted(name):
            self.data["skipped"][name] = "不在 --only 里"
            return None
        if need_s and self.left() < need_s:
            self.data["skipped"][name] = f"预算剩 {self.left():.0f}s，少于这一节估计需要的 {need_s:.0f}s"
            print(f"[跳过] {name}：{self.data['skipped'][name]}", flush=True)
            self.write()
            return None
        t = time.time()
        print(f"[{time.time() - self.t0:6.1f}s] {name} ...", flush=True)
        # 先记下“正在运行”：进程在这一节里被外部超时杀掉时，profile.json 里看得出停在哪一节
        self.data["skipped"][name] = "运行中被终止（外部超时或进程崩溃）"
        self.write()
        try:
            result = fn()
            self.data["sections"][name] = result
        except Exception as e:  # 一节失败不影响其它节：记下完整的异常
            result = None
            self.data["errors"][name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"
            print(f"[失败] {name}: {type(e).__name__}: {e}", flush=True)
        self.data["skipped"].pop(name)  # 这一节已结束（成功或记进 errors），去掉“运行中”
        self.data.setdefault("section_seconds", {})[name] = time.time() - t
        self.write()
        return result

    def write(self) -> None:
        self.data["elapsed_s"] = time.time() - self.t0
        with open(os.path.join(self.out_dir, "profile.json"), "w") as f:
            json.dump(self.data, f, ensure_ascii=False, indent=1, default=_jsonable)
        try:
            md = render_markdown(self.data)
        except Exception as e:  # 报告格式的问题不应丢掉已测到的数字（profile.json 已写）
            md = f"# torch 引擎剖析\n\nprofile.md 生成失败：{type(e).__name__}: {e}；数字见 profile.json\n"
        with open(os.path.join(self.out_dir, "profile.md"), "w") as f:
            f.write(md)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)


def _table(rows: List[Dict], cols: List[Tuple[str, str, str]]) -> str:
    head = "| " + " | ".join(c[1] for c in cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def render_markdown(data: Dict[str, Any]) -> str:
    s = data["sections"]
    md = ["# torch 引擎剖析\n"]
    env = s.get("environment") or {}
    if env:
        md.append("设备：{device}；torch {torch}；torchao {torchao}；模型 {model}；精度 {precision}；"
                  "解码器 KV 缓存 {decoder_kv_cache}；仓库 {repo}\n".format(**{k: env.get(k) for k in ("device", "torch", "torchao", "model", "precision",
                                                                   "decoder_kv_cache", "repo")}))
    chk = s.get("stage_check")
    if chk:
        md.append(f"分阶段版本 vs model(...)：recommendations 一致 {chk['rec_equal']}，分数最大差 "
                  f"{chk['score_max_abs']:.2e}；eager（.pt2 权重重建）vs .pt2 模块：top-50 重合 "
                  f"{chk['eager_vs_pt2_overlap']:.4f}\n")
    for key, st in (s.get("stages") or {}).items():
        md.append(f"## a/d. 分阶段耗时与 roofline：{key}（eager {st['dtype']}，中位数，{st['repeats']} 次）\n")
        if env.get("device") == "cpu":
            md.append("（CPU 上运行：roofline 的峰值取 H100 的，只用于检查脚本本身）\n")
        md.append(f"总计 {st['total_ms']:.2f} ms（{st['flops_total'] / 1e9:.1f} GFLOP，"
                  f"{st['flops_total'] / max(st['total_ms'], 1e-9) / 1e9:.1f} TFLOP/s）\n")
        md.append(_table(st["roofline"], [("stage", "阶段", ""), ("ms", "ms", ".3f"), ("share", "占比", ".1%"),
                                          ("gflop", "GFLOP", ".2f"), ("mb", "MB", ".1f"),
                                          ("flop_per_byte", "FLOP/B", ".0f"), ("tflops", "TFLOP/s", ".1f"),
                                          ("gbps", "GB/s", ".0f"), ("compute_util", "算力利用", ".1%"),
                                          ("bw_util", "带宽利用", ".1%"), ("bound", "受限于", ""),
                                          ("vs_roofline", "达到 roofline", ".1%")]))
    sdpa = s.get("sdpa")
    if sdpa:
        md.append("## b. SDPA 后端（加性浮点掩码）\n")
        md.append(f"默认选中（profiler 算子名）：{sdpa.get('default_ops')}\n")
        rows = [dict(shape=shape, backend=b, **r) for shape, by in sdpa["backends"].items() for b, r in by.items()]
        md.append(_table(rows, [("shape", "形状", ""), ("backend", "后端", ""), ("ok", "可用", ""),
                                ("ms", "ms", ".3f"), ("error", "错误", "")]))
    sa = s.get("self_attention")
    if sa:
        md.append("## b2. 解码器自注意力：显式 softmax 对 SDPA（eager，同一权重与历史）\n")
        md.append(_table(list(sa.values()), [("batch", "batch", ""), ("length", "长度", ""), ("sdpa_ms", "SDPA ms", ".2f"),
                                             ("explicit_ms", "显式 ms", ".2f"), ("speedup", "加速", ".2f"),
                                             ("rec_equal", "推荐逐位一致", ""), ("overlap", "top-50 重合", ".4f"),
                                             ("score_max_abs", "分数最大差", ".1e")]))
    kv = s.get("kv_cache")
    if kv:
        md.append("## b3. 解码器的 KV 缓存对每步重算前缀（eager，同一权重与历史）\n")
        md.append(_table(list(kv.values()), [("batch", "batch", ""), ("length", "长度", ""),
                                             ("recompute_ms", "重算 ms", ".2f"), ("kv_cache_ms", "KV 缓存 ms", ".2f"),
                                             ("speedup", "加速", ".2f"), ("rec_equal", "推荐逐位一致", ""),
                                             ("overlap", "top-50 重合", ".4f"), ("score_max_abs", "分数最大差", ".1e")]))
    pad = s.get("padding")
    if pad:
        md.append("## c. 长度桶的填充（默认长度分布）\n")
        md.append(_table(pad["rows"], [("name", "桶", ""), ("buckets", "上界", ""),
                                       ("padded_token_share", "填充 token", ".1%"),
                                       ("cost_ratio", "代价比（二次模型）", ".3f"),
                                       ("flops_ratio", "FLOPs 比（模型）", ".3f"), ("request_share", "各桶请求", "")]))
        if pad.get("per_execute"):
            md.append("一次 execute 有 batch 个请求时（按仓库的长度桶分组、行数补到 batch 桶；拼行宽 W = 不超过 W 的历史拼进宽 W 的行、"
                      "更长的照旧分组，0 = 按长度分组，-1 = engine.pack_rows 的做法：W = 最长者的长度桶、全部拼行）的估算：编码器算的 token ÷ 需要的 token，与长度组数\n")
            md.append(_table(pad["per_execute"], [("batch", "batch", ""), ("pack_width", "拼行宽 W", ""),
                                                  ("token_ratio", "token 比", ".2f"), ("launches", "组数", ".2f")]))
    for key in ["throughput", "throughput_planned", "throughput_planned_8"] + sorted(k for k in s if k.startswith("throughput_int8")):
        tp = s.get(key)
        if not tp:
            continue
        md.append(f"## e. 离线吞吐：{tp['label']}\n")
        md.append(tp.get("note", "") + "\n")
        md.append(_table(tp["rows"], [("batch", "batch", ""), ("req_per_s", "req/s", ".0f"),
                                      ("mfu", "MFU（未填充 FLOPs）", ".1%"),
                                      ("hw_util", "含填充 FLOPs", ".1%"), ("ms_by_bucket", "各组 ms", "")]))
        if tp.get("gates"):
            g = tp["gates"]
            verdict = "" if "passed" not in g else ("，**通过**" if g["passed"] else
                                                    f"，**不通过**（要求重合 >= {g['thresholds']['overlap']}、"
                                                    f"top-1 >= {g['thresholds']['top1']}）")
            md.append(f"门禁（对 fp32 eager，{g['rows']} 条）：top-50 重合 {g['overlap']:.4f}，top-1 一致 "
                      f"{g['top1_agreement']:.3f}，分数 MAE {g['score_mae']:.2e}{verdict}\n")
        if any((tp.get("int_mm_paths") or {}).values()):
            md.append("int8 矩阵乘走的路（capture_safe_int_mm 的调用次数，不含 CUDA Graph 重放）："
                      + "，".join(f"{k} {v}" for k, v in tp["int_mm_paths"].items()) + "\n")
    kern = s.get("kernels_compiled") or {}
    tables = [("", run) for run in kern.get("runs", [])]
    tables += [(f"{k[len('throughput_'):]}，", run) for k in sorted(s) if k.startswith("throughput_int8")
               for run in (s[k] or {}).get("kernels", [])]
    for what, run in tables:
        md.append(f"## 运行器一次运行的内核 / 算子（{what}{run['shape']}，{run.get('device')}，按自身时间）\n")
        md.append(f"一次 run {run['wall_ms']:.3f} ms；内核自身时间合计 {run['busy_ms']:.3f} ms，{run['launches']} 个内核"
                  f"（{KERNEL_NOTE}）\n")
        md.append(_table(run["top"], [("name", "内核", ""), ("ms", "ms", ".3f"), ("count", "次数", "")]))
    conc = s.get("concurrency")
    if conc:
        md.append(f"## 一个进程里几批同时跑（CUDA 流，L{conc['length']}）\n")
        md.append(conc.get("note", "") + "\n")
        md.append(_table(conc["rows"], [("batch", "batch", ""), ("k1_req_per_s", "1 条流 req/s", ".0f"),
                                        ("k2_req_per_s", "2 条 req/s", ".0f"), ("k4_req_per_s", "4 条 req/s", ".0f"),
                                        ("speedup_k2", "2 条倍数", ".2f"), ("speedup_k4", "4 条倍数", ".2f")]))
    if data.get("skipped"):
        md.append("## 跳过\n" + "".join(f"- {k}：{v}\n" for k, v in data["skipped"].items()))
    if data.get("errors"):
        md.append("## 错误\n" + "".join(f"- {k}：{v.splitlines()[0]}\n" for k, v in data["errors"].items()))
    md.append(f"\n用时 {data.get('elapsed_s', 0):.0f}s\n")
    return "\n".join(md)


# ---------------------------------------------------------------- 各节
def _to_device(feeds, device):
    import torch

    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])).to(device) for n in INPUT_NAMES)


NOT_PACKED = "拼行的程序（engine.pack_rows）：这一节按 [B, L] 的 6 个输入直接调用编译函数，不适用"


def _pt2_args(feeds, contract, packed: bool, device):
    """.pt2 的参数：拼行的程序先把 [B, L] 的一批拼成行（宽 = 最长者，不按桶）。"""
    if not packed:
        return _to_device(feeds, device)
    import torch

    from algorithm.serving.runtime import rowpack

    bufs = rowpack.pack_requests(contract, [feeds], ())
    return tuple(torch.from_numpy(bufs[n]).to(device) for n in rowpack.input_names(contract))


def _top_ops(prof, n: int = 25, device: bool = True) -> List[Dict[str, Any]]:
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) if device else None
        if t is None and device:
            t = getattr(e, "self_cuda_time_total", 0)
        if not device:
            t = e.self_cpu_time_total
        rows.append({"name": e.key, "ms": t / 1e3, "count": e.count})
    rows = [r for r in rows if r["ms"] > 0]
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def run_profile(args) -> Dict[str, Any]:
    t0 = time.time()
    import torch

    from algorithm.models.config import UGTConfig
    from algorithm.models.ugt import flops_per_request
    from algorithm.serving.accuracy import compare_topk
    from algorithm.serving.bucket_plan import (default_lengths, execute_padding, model_cost, padding_report,
                                               plan_seq_buckets)
    from algorithm.serving.bench.offline import grouped_seconds
    from algorithm.serving.runtime.buckets import round_up

    rep = Report(args.out, t0, args.budget_s, [x for x in args.only.split(",") if x])
    meta = load_repository(args.repo)
    cfg = UGTConfig.from_dict(dict(meta["model"]))
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if not on_gpu:
        print("没有 CUDA：计时用 perf_counter（CUDA 事件、torch.cuda.synchronize、CUDA Graph 与 GPU 内核列表跳过）",
              flush=True)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else ([2, 4] if args.quick else [8, 16, 64])
    repeats = 1 if args.quick else 3
    # --quick（CPU 检查）默认不编译：CPU 上 Inductor 编译 fp32 与 int8 各要 30-60 s；要测编译路径就显式给 --compile-mode
    compile_mode = args.compile_mode or ("none" if args.quick else meta["compile_mode"])
    clock = Clock(device)
    state: Dict[str, Any] = {}
    Runner = _torch_runner_cls(args.runner)
    sig = inspect.signature(Runner.__init__).parameters

    def environment():
        from algorithm.serving.runtime.engines.torch_int8 import torchao_version

        return {"device": torch.cuda.get_device_name(device) if on_gpu else "cpu", "torch": torch.__version__,
                "torchao": torchao_version(), "model": cfg.name, "precision": meta["precision"],
                "repo": meta["repo"], "batches": batches, "runner": f"{Runner.__module__}.{Runner.__name__}",
                "compile_mode": compile_mode,
                "seq_buckets": meta["seq_buckets"], "batch_buckets": meta["batch_buckets"],
                "cuda_graphs": meta["cuda_graphs"] and on_gpu, "checkpoint": meta["checkpoint"],
                "budget_s": args.budget_s, "quick": args.quick, "decoder_kv_cache": meta["decoder_kv_cache"]}
    rep.section("environment", environment)

    def load():
        t = time.time()
        program = torch.export.load(meta["engine_file"])
        from algorithm.serving.runtime.rowpack import is_packed_program

        packed = is_packed_program(program, cfg.contract())  # engine.pack_rows 的程序（运行器也这样认）
        gm = program.module().to(device)
        model = eager_from_pt2(gm, meta["model"], meta["decoder_kv_cache"])
        state.update(gm=gm, model=model, dtype=next(model.parameters()).dtype, packed=packed)
        return {"load_s": time.time() - t, "dtype": str(state["dtype"]), "constrained": model.constrained,
                "packed_rows": packed}
    if rep.section("load", load) is None:
        rep.write()
        return rep.data
    model, gm = state["model"], state["gm"]
    hist = Histories(meta["catalog"], meta["length_median"], meta["length_sigma"], meta["max_seq_length"])

    def stage_check():
        rng = np.random.default_rng(0)
        feeds = cfg.contract().random_inputs(min(batches), 37 if args.quick else 100, rng)
        real = hist.encode(hist.sample(max(2, min(batches)), seed=7))
        with torch.no_grad():
            x = _to_device(feeds, device)
            want = model(*x)
            got = staged_forward(model, x, StageTimer(None))
            ref_pt2 = gm(*_pt2_args(real, cfg.contract(), state["packed"], device))
            eager = model(*_to_device(real, device))
        rec_equal = bool(torch.equal(want[0], got[0]))
        diff = float((want[1] - got[1]).abs().max())
        cmp = compare_topk(ref_pt2[0].cpu().numpy(), ref_pt2[1].float().cpu().numpy(), eager[0].cpu().numpy(),
                           eager[1].float().cpu().numpy(), 0.01)
        state["stage_ok"] = rec_equal and diff <= 1e-5
        return {"rec_equal": rec_equal, "score_max_abs": diff, "eager_vs_pt2_overlap": cmp.overlap,
                "eager_vs_pt2": cmp.to_dict()}
    rep.section("stage_check", stage_check)

    def stages():
        out = {}
        b = max(batches)
        lengths = [16, 64] if args.quick else [L for L in meta["seq_buckets"] if L <= meta["max_seq_length"]]
        wbytes = torch.finfo(state["dtype"]).bits // 8
        for L in lengths:
            x = _to_device(hist.batch(b, L, seed=11), device)
            runs = []
            with torch.no_grad():
                for r in range(repeats + 1):
                    st = StageTimer(clock)
                    staged_forward(model, x, st)
                    clock.sync()
                    if r:
                        runs.append(st.seconds())
            med = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
            costs = stage_costs(cfg, b, L, wbytes, meta["decoder_kv_cache"])
            total_flops = sum(c["flops"] for c in costs.values())
            want = b * flops_per_request(cfg, L, meta["decoder_kv_cache"])
            assert math.isclose(total_flops, want, rel_tol=1e-9), "阶段 FLOPs 之和与公式不符"
            peak = PEAK_FP16_TFLOPS if wbytes == 2 else PEAK_FP32_TFLOPS
            out[f"b{b}xL{L}"] = {"batch": b, "length": L, "dtype": str(state["dtype"]), "repeats": repeats,
                                 "total_ms": sum(med.values()) * 1e3, "flops_total": total_flops,
                                 "peak_tflops": peak, "roofline": roofline(costs, med, peak)}
        return out
    rep.section("stages", stages, need_s=5)

    def sdpa():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        h, dh = cfg.num_heads, cfg.d_model // cfg.num_heads
        dtype = state["dtype"]
        b = max(batches)
        shapes = {"encoder b{}xL{}".format(b, L): (b, L, L) for L in ([16, 64] if args.quick else [128, 512])}
        q = cfg.beam_width * (1 if meta["decoder_kv_cache"] else 3)  # 步 3 每个用户的交叉注意力查询数
        shapes[f"cross b{b} q{q}xL128"] = (b, q, 16 if args.quick else 128)
        backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                    "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
        out: Dict[str, Dict[str, Any]] = {}
        for name, (bb, lq, lk) in shapes.items():
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(bb, h, lq, dh, device=device, dtype=dtype, generator=g)
            k = torch.randn(bb, h, lk, dh, device=device, dtype=dtype, generator=g)
            v = torch.randn(bb, h, lk, dh, device=device, dtype=dtype, generator=g)
            mask = torch.zeros(bb, lk, device=device, dtype=dtype)
            mask[:, lk // 2:] = float(torch.finfo(dtype).min) / 2  # 与模型一样的有限大负数
            bias = mask[:, None, None, :]
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
            out[name] = {}
            for bname, be in backends.items():
                try:
                    with sdpa_kernel([be]):
                        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                        times = []
                        for _ in range(3 if args.quick else 10):
                            a = clock.mark()
                            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
                            times.append(clock.seconds(a, clock.mark()))
                    out[name][bname] = {"ok": True, "ms": float(np.median(times)) * 1e3,
                                        "max_abs_vs_default": float((y - ref).abs().max())}
                except Exception as e:  # 不支持时 PyTorch 抛 RuntimeError 并说明原因
                    out[name][bname] = {"ok": False, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        # 默认选择：profiler 里的 aten 算子名（_scaled_dot_product_{flash,efficient,cudnn}_attention 或 math 的 bmm/softmax）
        acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if on_gpu else [])
        feeds = hist.encode(hist.sample(min(batches), seed=3))
        with torch.profiler.profile(activities=acts) as prof, torch.no_grad():
            model(*_to_device(feeds, device))
            clock.sync()
        words = ("scaled_dot_product", "attention", "fmha", "flash", "cudnn")
        names = sorted({e.key for e in prof.key_averages() if any(s in e.key.lower() for s in words)})
        return {"backends": out, "default_ops": names}
    rep.section("sdpa", sdpa, need_s=5)

    def eager_ab(seed: int, variants, restore) -> Dict[str, Any]:
        """同一权重、同一批历史、eager、同一进程里对照模型的两种算法。variants = [(名字, 切到这种算法的函数)]，基线在前；
        每个 batch 一行：各自的中位 ms、加速、推荐是否逐位一致、分数最大差、两者的 top-50 重合。
        fp16 里两种算法的舍入不同（矩阵乘的形状不同），近似相等的候选会换位、其后的 beam 随之不同：逐位相等只在 fp32 里
        成立（测试），半精度看重合（各自对 fp32 的门禁见构建）。"""
        (base, _), (new, _) = variants
        L = 16 if args.quick else 128
        out = {}
        for b in batches:
            x = _to_device(hist.batch(b, L, seed=seed), device)
            row, results = {"batch": b, "length": L}, {}
            try:
                for name, switch in variants:
                    switch()
                    with torch.no_grad():
                        results[name] = model(*x)
                        times = []
                        for _ in range(repeats * 3 + 1):
                            a0 = clock.mark()
                            model(*x)
                            times.append(clock.seconds(a0, clock.mark()))
                    row[f"{name}_ms"] = float(np.median(times[1:])) * 1e3
            finally:
                restore()
            (b_rec, b_sc), (n_rec, n_sc) = results[base], results[new]
            row["rec_equal"] = bool(torch.equal(b_rec, n_rec))
            row["score_max_abs"] = float((b_sc - n_sc).abs().max())
            row["overlap"] = compare_topk(b_rec.cpu().numpy(), b_sc.float().cpu().numpy(), n_rec.cpu().numpy(),
                                          n_sc.float().cpu().numpy(), 0.01).overlap
            row["speedup"] = row[f"{base}_ms"] / row[f"{new}_ms"]
            out[f"b{b}xL{L}"] = row
        return out

    def set_explicit(flag: bool) -> None:
        for layer in model.decoder:
            layer.self_attn.explicit = flag

    def set_kv_cache(flag: bool) -> None:
        model.decoder_kv_cache = flag

    # 解码器自注意力：SDPA 对显式 softmax（模型的做法）
    rep.section("self_attention", lambda: eager_ab(21, [("sdpa", lambda: set_explicit(False)),
                                                         ("explicit", lambda: set_explicit(True))],
                                                   lambda: set_explicit(True)), need_s=5)
    # 解码器：每步重算前缀对 KV 缓存（编译后的对照要两个构建：gpu_bench.sh 的 profile 与 profile_variants）
    rep.section("kv_cache", lambda: eager_ab(23, [("recompute", lambda: set_kv_cache(False)),
                                                  ("kv_cache", lambda: set_kv_cache(True))],
                                            lambda: set_kv_cache(meta["decoder_kv_cache"])), need_s=5)

    def length_dist() -> np.ndarray:
        if "lengths" not in state:  # 默认长度分布的 10 万个样本（填充一节与规划桶的吞吐共用）
            state["lengths"] = default_lengths(meta["length_median"], meta["length_sigma"], meta["max_seq_length"],
                                               100_000, seed=0)
        return state["lengths"]

    def planned(n: int) -> List[int]:
        """bucket_plan 在默认分布下规划的 n 个长度桶（算一次）。"""
        if f"planned_{n}" not in state:
            state[f"planned_{n}"] = plan_seq_buckets(length_dist(), n, meta["max_seq_length"])
        return state[f"planned_{n}"]

    def padding():
        max_len = meta["max_seq_length"]
        lengths = length_dist()
        flops = model_cost(cfg, meta["decoder_kv_cache"])
        rows = []
        for name, buckets in (("仓库", meta["seq_buckets"] or [max_len]), ("规划 4 桶", planned(4)),
                              ("规划 8 桶", planned(8))):
            r = padding_report(lengths, buckets)
            r["flops_ratio"] = padding_report(lengths, buckets, flops)["cost_ratio"]
            r["name"] = name
            r["request_share"] = {k: round(v, 3) for k, v in r["request_share"].items()}
            rows.append(r)
        # 服务时一次 execute 的填充（按长度分组、行数补到 batch 桶）与拼行的估算：编码器去填充值不值得做（#12）
        seq = meta["seq_buckets"] or [max_len]
        bb = meta["batch_buckets"] or [1]
        per_execute = [execute_padding(lengths, b, seq, bb, pack_width=w, trials=200 if args.quick else 2000)
                       for b in sorted({2, *batches}) for w in (0, -1, 256, 512) if w <= max_len]
        return {"rows": rows, "mean_flops_unpadded": float(np.mean(flops(lengths))), "planned_4": planned(4),
                "per_execute": per_execute}
    rep.section("padding", padding)

    # ---- 离线吞吐 ----
    samples = args.samples or (32 if args.quick else 1000)
    pool = hist.sample(samples, seed=99)
    mean_flops = float(np.mean([flops_per_request(cfg, min(len(h), meta["max_seq_length"]), meta["decoder_kv_cache"]) for h in pool]))
    flops_fn = model_cost(cfg, meta["decoder_kv_cache"])

    def make_runner(mode: str, graphs: bool, transform=None, path: str = ""):
        """按构造函数建运行器（warmup=False：CUDA Graph 在首次运行时按需捕获）。transform 在加载后、编译前作用于模块；
        运行器没有 transform 参数（旧版）时，在首次调用前替换 module/fn（torch.compile 是惰性的）。"""
        kw = dict(device=device.type, device_id=device.index or 0, compile_mode=mode, cuda_graphs=graphs,
                  batch_buckets=meta["batch_buckets"], seq_buckets=meta["seq_buckets"],
                  cache_dir=meta["compile_cache_dir"], warmup=False)
        kw = {k: v for k, v in kw.items() if k in sig}
        if transform is not None and "transform" in sig:
            return Runner(path or meta["engine_file"], cfg.contract(), transform=transform, **kw), "TorchRunner(transform=...)"
        runner = Runner(path or meta["engine_file"], cfg.contract(), **kw)
        if transform is None:
            return runner, "TorchRunner"
        runner.module = transform(runner.module)
        runner.fn = runner.module if mode == "none" else torch.compile(runner.module, mode=mode, dynamic=True)
        return runner, "TorchRunner，首次调用前替换 module/fn"

    def offline(runner, seq_buckets, label: str, peak_tflops: float) -> Dict[str, Any]:
        groups: Dict[int, List[np.ndarray]] = {}
        for h in pool:
            groups.setdefault(round_up(len(h), sorted(seq_buckets)), []).append(h)
        share = {k: len(v) / len(pool) for k, v in groups.items()}
        rows = []
        for b in batches:
            per = grouped_seconds(groups, b, repeats, runner.run, hist.encode)
            sec = sum(share[k] * t for k, t in per.items())
            rps = b / sec
            padded = sum(share[k] * float(flops_fn(np.array([k]))[0]) for k in per)
            rows.append({"batch": b, "req_per_s": rps, "mfu": rps * mean_flops / (peak_tflops * 1e12),
                         "hw_util": rps * padded / (peak_tflops * 1e12),
                         "ms_by_bucket": {str(k): round(t * 1e3, 3) for k, t in sorted(per.items())}})
        return {"label": label, "seq_buckets": list(seq_buckets), "length_share": {str(k): v for k, v in
                                                                                    sorted(share.items())},
                "rows": rows, "mean_flops_per_request": mean_flops, "peak_tflops": peak_tflops}

    n_gate = 32 if args.quick else 64
    gate_hist = hist.sample(n_gate, seed=4242)  # 与构建门禁同一种子与长度分布
    gate_feeds = [hist.encode(gate_hist[i:i + 16]) for i in range(0, n_gate, 16)]

    def reference_outputs():
        if "ref" in state:
            return state["ref"]
        if meta["checkpoint"]:
            from algorithm.models.checkpoint import load_checkpoint

            ref_model, _ = load_checkpoint(meta["checkpoint"])
            if meta["constrained"]:
                ref_model.attach_catalog(hist.catalog.semantic_ids)
            source = f"检查点 {meta['checkpoint']}（fp32）"
        else:
            ref_model = eager_from_pt2(gm, meta["model"], meta["decoder_kv_cache"])
            source = ".pt2 的权重升到 fp32（没有找到检查点）"
        ref_model = ref_model.float().to(device).eval()
        with torch.no_grad():
            outs = [ref_model(*_to_device(f, device)) for f in gate_feeds]
        state["ref"] = (np.concatenate([o[0].cpu().numpy() for o in outs]),
                        np.concatenate([o[1].float().cpu().numpy() for o in outs]), source)
        del ref_model
        return state["ref"]

    def gates(runner) -> Dict[str, Any]:
        ref_rec, ref_scores, source = reference_outputs()
        outs = [runner.run(f) for f in gate_feeds]
        cmp = compare_topk(ref_rec, ref_scores, np.concatenate([o[0] for o in outs]),
                           np.concatenate([o[1] for o in outs]), 0.01)
        return {**cmp.to_dict(), "reference": source}

    peak = PEAK_FP16_TFLOPS if on_gpu else PEAK_FP32_TFLOPS

    def throughput():
        t = time.time()
        runner, how = make_runner(compile_mode, meta["cuda_graphs"])
        state["runner"] = runner
        res = offline(runner, meta["seq_buckets"], f"仓库的 TorchRunner（{compile_mode}，CUDA Graph "
                                                   f"{'开' if meta['cuda_graphs'] and on_gpu else '关'}），"
                                                   f"桶 {meta['seq_buckets']}", peak)
        res["seconds_incl_compile"] = time.time() - t
        res["gates"] = gates(runner)
        res["note"] = (f"{samples} 条历史按长度组成批；吞吐 = b / Σ_k p_k t_k(b)；MFU 以 {peak:g} TFLOP/s 为峰值，"
                       f"分子用未填充的 FLOPs（{mean_flops:.3g}/请求），“含填充”用桶长的 FLOPs。")
        return res
    rep.section("throughput", throughput, need_s=20 if on_gpu else 0)

    def kernel_runs(runner, sizes: Sequence[int]) -> List[Dict[str, Any]]:
        """GPU：一次 CUDA Graph 重放里的内核（按 GPU 时间）；CPU（--quick 检查同一段代码）：运行器的 CPU 算子。"""
        L = 128 if 128 in meta["seq_buckets"] else (meta["seq_buckets"] or [64])[0]
        runs = []
        for b in sizes:
            feeds = hist.batch(b, L, seed=5)
            runner.run(feeds)
            walls = []
            for _ in range(repeats):
                a = clock.mark()
                runner.run(feeds)
                walls.append(clock.seconds(a, clock.mark()))
            acts = [torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU]
            with torch.profiler.profile(activities=acts) as prof:
                runner.run(feeds)
                clock.sync()
            every = _top_ops(prof, 10 ** 6, device=on_gpu)
            runs.append({"shape": f"b{b}xL{L}", "device": device.type, "wall_ms": float(np.median(walls)) * 1e3,
                         "busy_ms": sum(r["ms"] for r in every), "launches": sum(r["count"] for r in every),
                         "top": every[:25]})
        return runs

    def kernels_compiled():
        # 最小与最大 batch 各一次：服务时每次 execute 只有几个请求，小 batch 的一次运行约 2 ms 里多少是内核、多少是内核之间的
        # 空隙（内核个数 × 每个的最短时间），决定该去减内核数还是加大 batch
        runs = kernel_runs(state["runner"], sorted({min(batches), max(batches)}))
        return {"runs": runs, "note": KERNEL_NOTE}
    if "runner" in state and state["packed"]:
        rep.data["skipped"]["kernels_compiled"] = NOT_PACKED
    elif "runner" in state:
        rep.section("kernels_compiled", kernels_compiled, need_s=5)

    def concurrency():
        # 一个进程里几张 CUDA Graph 同时在不同的流上重放（同一形状、各自的静态输入与内存池）：小 batch 时每个内核只有几微秒、
        # 占不满 SM，NVML 的“忙”不等于算力用满。k 条流的吞吐对 1 条流的倍数，就是“一个进程里同时跑几批”（解耦的引擎模型、
        # 或多实例 + MPS）最多能拿到多少——决定 #11 值不值得换托管方式
        runner = state["runner"]
        fn = runner.fn
        L = 128 if 128 in meta["seq_buckets"] else meta["seq_buckets"][0]
        out = {"length": L, "rows": []}
        for b in [b for b in batches if b <= 16] or [min(batches)]:  # 服务时的小批
            feeds = hist.batch(b, L, seed=6)
            graphs, keep = [], []
            for _ in range(4):
                static = _to_device(feeds, device)
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side), torch.no_grad():
                    fn(*static)
                torch.cuda.current_stream().wait_stream(side)
                g = torch.cuda.CUDAGraph()
                # 各自的捕获流：cuBLAS 工作区按 (句柄, 流) 缓存，同一个捕获流上的图共用它，同时重放会互相踩
                # （pytorch/pytorch#193402；H100 上服务器因此卡死过，见 runtime/engines/torch.py）
                with torch.cuda.graph(g, stream=torch.cuda.Stream()), torch.no_grad():
                    fn(*static)
                # 静态输入要活到重放结束：释放后内存被别的张量复用，重放读到的 id 可能越界（设备端断言会毁掉整个 CUDA 上下文）
                keep.append(static)
                graphs.append(g)
            streams = [torch.cuda.Stream() for _ in graphs]
            rounds = 30
            row = {"batch": b}
            for k in (1, 2, 4):
                torch.cuda.synchronize()
                t = time.perf_counter()
                for _ in range(rounds):
                    for g, st in zip(graphs[:k], streams[:k]):
                        with torch.cuda.stream(st):
                            g.replay()
                torch.cuda.synchronize()
                sec = time.perf_counter() - t
                row[f"k{k}_req_per_s"] = rounds * k * b / sec
                row[f"k{k}_ms_per_round"] = sec / rounds * 1e3
            row["speedup_k2"] = row["k2_req_per_s"] / row["k1_req_per_s"]
            row["speedup_k4"] = row["k4_req_per_s"] / row["k1_req_per_s"]
            out["rows"].append(row)
            del graphs, keep
        out["note"] = (f"同一编译函数、b x L{L}，每条流一张各自的图；k 条流各重放 {rounds} 轮。k=1 是现在一个实例的串行重放")
        return out
    if "runner" in state and state["packed"]:
        rep.data["skipped"]["concurrency"] = NOT_PACKED
    elif "runner" in state and on_gpu:
        rep.section("concurrency", concurrency, need_s=10)
    elif "runner" in state:
        rep.data["skipped"]["concurrency"] = "要 CUDA：几张图在不同流上同时重放"

    def planned_throughput(n: int):
        def run():
            runner, buckets = state["runner"], planned(n)
            # 同一个运行器（已编译，dynamic=True）：只换长度桶，新的桶在首次运行时惰性捕获
            runner.seq_buckets = type(runner.seq_buckets)(sorted(buckets))
            try:
                res = offline(runner, buckets, f"规划的 {n} 个桶 {buckets}（同一运行器，只换桶）", peak)
            finally:
                runner.seq_buckets = type(runner.seq_buckets)(meta["seq_buckets"])
            res["note"] = "与“仓库的 TorchRunner”同一运行器、同一批历史，只把 seq 桶换成 bucket_plan 的结果。"
            return res
        return run
    if "runner" in state:
        rep.section("throughput_planned", planned_throughput(4), need_s=20 if on_gpu else 0)
        # 8 个桶：填充从约 36 % 降到约 20 %（padding 一节），但每个长度组更小、启动更多；测出来才知道哪边赢
        rep.section("throughput_planned_8", planned_throughput(8), need_s=30 if on_gpu else 0)

    def int8_base() -> Tuple[str, str]:
        """int8 的底本 .pt2 与它的精度：与构建相同（engines/torch.int8_base_precision：GPU 上 bf16，因为 fp16 在 torchao
        缩放之前溢出）；仓库的 .pt2 精度不同时，用由它重建的 eager 模型按底本精度重新导出到临时目录（只导出一次）。"""
        from algorithm.serving.engines.torch import export_program, int8_base_precision

        want = args.int8_base if args.int8_base != "auto" else int8_base_precision(device.type)
        if meta["precision"] == want:
            return meta["engine_file"], want
        if "int8_base" not in state:
            # 门禁一批 64 条等：batch 上界放宽到 4096
            path = os.path.join(tempfile.mkdtemp(prefix="int8_base_"), f"{want}.pt2")
            state["int8_base"] = export_program(state["model"], path, want, 4096, meta["max_seq_length"])
        return state["int8_base"], want

    def int8(qmode: str):
        from algorithm.serving.runtime.engines.torch_int8 import INT_MM_PATHS, quantize_int8

        t = time.time()
        base_path, base = int8_base()
        attempts: List[Dict[str, Any]] = []  # 失败的方式（按顺序尝试，第一个成功的给出数字）
        ways = [(compile_mode, meta["cuda_graphs"])]
        if compile_mode != "none":
            ways.append(("none", meta["cuda_graphs"]))  # 编译失败时退到 eager int8（仍可 CUDA Graph）
        if meta["cuda_graphs"] and on_gpu:
            ways.append(("none", False))
        for mode, graphs in ways:
            if attempts and on_gpu and rep.left() < 30:
                attempts.append({"compile_mode": mode, "skipped": f"预算只剩 {rep.left():.0f}s"})
                continue
            try:
                paths_before = dict(INT_MM_PATHS)
                runner, how = make_runner(mode, graphs, lambda m: quantize_int8(m, qmode), path=base_path)
                res = offline(runner, meta["seq_buckets"], f"int8 {qmode}（{how}；compile {mode}，"
                                                           f"CUDA Graph {'开' if graphs and on_gpu else '关'}）", peak)
                res["gates"] = g = gates(runner)
                g["passed"] = bool(g["overlap"] >= INT8_GATE["overlap"] and g["top1_agreement"] >= INT8_GATE["top1"])
                g["thresholds"] = INT8_GATE
                res.update(attempts=attempts, seconds_incl_compile=time.time() - t, peak_int8_tops=PEAK_INT8_TOPS, base=base,
                           int8_mode=qmode, compile_mode=mode, cuda_graphs=bool(graphs and on_gpu),
                           # dynamic 的 int8 矩阵乘各走了哪条路（预热、捕获与不用图时的调用；回退多说明没用上 int8 张量核）
                           int_mm_paths={k: v - paths_before[k] for k, v in INT_MM_PATHS.items()})
                # 最小 batch 的内核表：int8 为什么比 fp16 慢（第 6 台 dynamic 0.15 倍，没有剖析过）——与 kernels_compiled 的 fp16
                # 表对照内核个数与时间；预算不够就不做，不影响上面的数字
                if rep.left() > 15:
                    try:
                        res["kernels"] = kernel_runs(runner, [min(batches)])
                    except Exception as e:  # noqa: BLE001
                        res["kernels_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                res["note"] = (f"服务时量化：{base} 底本的 .pt2 加载、移到 {device.type} 后 quantize_int8(mode={qmode!r})"
                               f"{'（CUDA 上把小行数补到 17：torch._int_mm 的限制）' if on_gpu and qmode == 'dynamic' else ''}，"
                               f"再 torch.compile（{mode}）。MFU 仍以 {peak:g} TFLOP/s 为分母（H100 int8 稠密峰值 "
                               f"{PEAK_INT8_TOPS:g} TOPS）。")
                return res
            except Exception as e:
                attempts.append({"compile_mode": mode, "cuda_graphs": graphs,
                                 "error": f"{type(e).__name__}: {str(e)[:500]}"})
                print(f"  int8 {qmode}（compile {mode}，graphs {graphs}）失败：{type(e).__name__}: {str(e)[:200]}",
                      flush=True)
                if on_gpu:
                    try:  # 捕获失败等错误之后上下文可能已坏：同步再失败也只记下，下一种方式照样试
                        torch.cuda.synchronize()
                    except Exception as e2:  # noqa: BLE001
                        attempts[-1]["sync_error"] = f"{type(e2).__name__}: {str(e2)[:200]}"
        raise RuntimeError(f"int8 {qmode} 的所有方式都失败：{attempts}")

    try:
        import torchao  # noqa: F401
        have_torchao = True
    except Exception as e:  # torchao 缺失或与 torch 版本不符
        have_torchao = False
        rep.data["skipped"]["throughput_int8"] = f"torchao 不能导入：{type(e).__name__}: {e}"
    if have_torchao and not args.no_int8:
        # 每种量化方式各一节（dynamic 与 weight_only 各自的速度与门禁，README“引擎与精度”引用这些数字）
        for qmode in args.int8_modes.split(","):
            rep.section(f"throughput_int8_{qmode}", lambda qm=qmode: int8(qm), need_s=60 if on_gpu else 0)
    elif args.no_int8:
        rep.data["skipped"]["throughput_int8"] = "--no-int8"

    rep.data["stage_check_passed"] = bool(state.get("stage_ok")) if "stage_check" in rep.data["sections"] else None
    rep.write()
    return rep.data


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repo", required=True, help="已构建的模型仓库（engine=torch）")
    p.add_argument("--out", required=True, help="输出目录（profile.json、profile.md）")
    p.add_argument("--batches", default="", help="离线吞吐的 batch，逗号分隔（默认 8,16,64；--quick 为 2,4）")
    p.add_argument("--quick", action="store_true", help="CPU 上的小规模检查（ugt_tiny）：小形状、1 次重复")
    p.add_argument("--device", default="auto", help="auto / cuda / cpu")
    p.add_argument("--compile-mode", default="", help="覆盖仓库的 compile_mode（例如 none）")
    p.add_argument("--int8-modes", default="dynamic", help="逗号分隔：dynamic、weight_only（各测一节）")
    p.add_argument("--no-int8", action="store_true")
    p.add_argument("--int8-base", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="int8 量化前的底本精度（auto = 与构建相同：GPU 上 bf16、CPU 上 fp32）")
    p.add_argument("--only", default="", help="逗号分隔的节名（如 throughput,int8），只跑这些节；environment、load 总会跑")
    p.add_argument("--samples", type=int, default=0, help="离线吞吐抽样的历史数（默认 1000；--quick 为 64）")
    p.add_argument("--runner", default="", help="运行器类 模块:类（默认找 TorchRunner 的新、旧位置）")
    p.add_argument("--budget-s", type=float, default=140.0, help="总预算：剩余时间不够的节跳过并写明原因")
    args = p.parse_args(argv)
    modes = list(dict.fromkeys(m for m in args.int8_modes.split(",") if m))  # 去重、保序
    bad = set(modes) - {"dynamic", "weight_only"}
    if bad or not modes:
        p.error(f"--int8-modes 只能是 dynamic、weight_only（逗号分隔），得到 {args.int8_modes!r}")
    args.int8_modes = ",".join(modes)
    unknown = {x for x in args.only.split(",") if x} - set(SECTIONS)
    if unknown:
        p.error(f"--only 里有未知的节 {sorted(unknown)}；可选 {', '.join(SECTIONS)}")
    return args


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    data = run_profile(args)
    print(f"写入 {os.path.join(args.out, 'profile.json')} 与 profile.md（{data['elapsed_s']:.0f}s）", flush=True)
    if data["sections"].get("stage_check") and not data.get("stage_check_passed"):
        print("分阶段重写与 model(...) 的输出不一致：分阶段耗时不可信（见 profile.json 的 stage_check）", file=sys.stderr)
        sys.exit(3)
    return data


if __name__ == "__main__":
    main()
