"""前三节：environment（设备与版本）、load（.pt2 与重建的 eager 模型）、stage_check（分阶段版本可信吗）。"""
from __future__ import annotations

import time
from typing import Any, Dict

import numpy as np
import torch

from algorithm.serving.accuracy import compare_topk
from algorithm.serving.profile.context import Context
from algorithm.serving.profile.data import pt2_args, to_device
from algorithm.serving.profile.eager import eager_from_pt2, staged_forward
from algorithm.serving.profile.timing import StageTimer


def environment(ctx: Context) -> Dict[str, Any]:
    from algorithm.serving.runtime.engines.torch_int8 import torchao_version

    m, args = ctx.meta, ctx.args
    return {"device": torch.cuda.get_device_name(ctx.device) if ctx.on_gpu else "cpu", "torch": torch.__version__,
            "torchao": torchao_version(), "model": ctx.cfg.name, "precision": m["precision"],
            "repo": m["repo"], "batches": ctx.batches,
            "runner": f"{ctx.runner_cls.__module__}.{ctx.runner_cls.__name__}", "compile_mode": ctx.compile_mode,
            "seq_buckets": m["seq_buckets"], "batch_buckets": m["batch_buckets"],
            "cuda_graphs": ctx.graphs_on, "checkpoint": m["checkpoint"],
            "budget_s": args.budget_s, "quick": args.quick, "decoder_kv_cache": m["decoder_kv_cache"]}


def load(ctx: Context) -> Dict[str, Any]:
    """加载 .pt2，由它的权重重建 eager 模型；是否拼行的程序与运行器的判断相同。"""
    from algorithm.serving.runtime.rowpack import is_packed_program

    t = time.time()
    program = torch.export.load(ctx.meta["engine_file"])
    ctx.packed = is_packed_program(program, ctx.cfg.contract())
    ctx.gm = program.module().to(ctx.device)
    ctx.model = eager_from_pt2(ctx.gm, ctx.meta["model"], ctx.meta["decoder_kv_cache"])
    ctx.dtype = next(ctx.model.parameters()).dtype
    return {"load_s": time.time() - t, "dtype": str(ctx.dtype), "constrained": ctx.model.constrained,
            "packed_rows": ctx.packed}


def stage_check(ctx: Context) -> Dict[str, Any]:
    """分阶段版本对 model(...)（随机输入，逐位）；重建的 eager 模型对 .pt2 模块（真实历史，top-50 重合）。"""
    model, contract = ctx.model, ctx.cfg.contract()
    feeds = contract.random_inputs(min(ctx.batches), 37 if ctx.quick else 100, np.random.default_rng(0))
    real = ctx.hist.encode(ctx.hist.sample(max(2, min(ctx.batches)), seed=7))
    with torch.no_grad():
        x = to_device(feeds, ctx.device)
        want = model(*x)
        got = staged_forward(model, x, StageTimer(None))
        ref_pt2 = ctx.gm(*pt2_args(real, contract, ctx.packed, ctx.device))
        eager = model(*to_device(real, ctx.device))
    rec_equal = bool(torch.equal(want[0], got[0]))
    diff = float((want[1] - got[1]).abs().max())
    cmp = compare_topk(ref_pt2[0].cpu().numpy(), ref_pt2[1].float().cpu().numpy(), eager[0].cpu().numpy(),
                       eager[1].float().cpu().numpy(), 0.01)
    ctx.stage_ok = rec_equal and diff <= 1e-5
    return {"rec_equal": rec_equal, "score_max_abs": diff, "eager_vs_pt2_overlap": cmp.overlap,
            "eager_vs_pt2": cmp.to_dict()}
