"""由 .pt2 的权重重建的 eager UGTModel，与它的分阶段 forward（给分阶段计时用）。"""
from __future__ import annotations

from typing import Any, Dict

from algorithm.serving.profile.timing import StageTimer


def _unwrap(name: str) -> str:
    """拼行的程序（engine.pack_rows）导出的是包了一层的 PackedUGT：名字多一个 "model." 前缀。"""
    return name[len("model."):] if name.startswith("model.") else name


def eager_from_pt2(gm, cfg_dict: Dict[str, Any], kv_cache: bool):
    """用 .pt2 的权重与缓冲区（含目录约束的前缀树）重建 eager 的 UGTModel（同 dtype、同设备、同样的解码器缓存方式）。"""
    import torch

    from algorithm.models.config import UGTConfig
    from algorithm.models.ugt import UGTModel

    cfg = UGTConfig.from_dict(dict(cfg_dict))
    params = {_unwrap(n): p for n, p in gm.named_parameters()}
    buffers = {_unwrap(n): b for n, b in gm.named_buffers()}
    bos = params["bos"]
    model = UGTModel(cfg).to(device=bos.device, dtype=bos.dtype).eval()
    model.decoder_kv_cache = kv_cache
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(params[name])
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        mod = model.get_submodule(owner) if owner else model
        mod.register_buffer(leaf, b.clone(), persistent=False)
    model.constrained = "valid_l1" in buffers
    return model


def staged_forward(model, args, st: StageTimer):
    """UGTModel.forward 的分阶段版本：按 forward 的顺序调用模型自己的方法，每段包在一个计时区间里。
    任何与 forward 不同之处都会让 stage_check 一节失败（改 UGTModel.forward 要一起改这里）。"""
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
