"""参考检查点的短时带种子训练：在合成行为序列上学“下一个物品”。

合成数据：每个用户有 1-3 个主题（一级码），历史与下一个物品都从这些主题的物品中抽取。
训练后模型的分数像训练过的模型一样尖锐（top-1 与第 50 名拉开差距），并且大多生成目录里存在的码，
这样精度门禁（top-50 重合、top-1 一致）才有意义：随机初始化的模型分数几乎平坦，任何微小误差都会打乱排序。
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional

import numpy as np
import torch

from algorithm.models.catalog import Catalog
from algorithm.models.sequences import SyntheticSequences  # noqa: F401  （压测与门禁从这里或 sequences 导入）
from algorithm.models.ugt import UGTModel, teacher_forcing_loss


def train_reference(model: UGTModel, catalog: Catalog, steps: int, batch_size: int, seq_length: int,
                    lr: float, seed: int, encode: Callable[[list], Dict[str, np.ndarray]],
                    log: Optional[Callable[[str], None]] = print) -> Dict[str, float]:
    """训练 steps 步；encode 把原始历史变成六个引擎输入（与服务的前处理同一段代码）。"""
    if steps <= 0:
        return {"steps": 0}
    torch.manual_seed(seed)
    data = SyntheticSequences(catalog, seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    device = next(model.parameters()).device
    t0 = time.time()
    first = last = float("nan")
    for step in range(steps):
        histories, next_rows = data.sample(batch_size, seq_length)
        feeds = encode(histories)
        inputs = [torch.from_numpy(feeds[k]).to(device) for k in model.cfg.contract().input_names]
        targets = torch.from_numpy(catalog.semantic_ids[next_rows]).to(device)
        loss = teacher_forcing_loss(model, inputs, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        last = float(loss.item())
        if step == 0:
            first = last
        if log and (step % max(1, steps // 5) == 0 or step == steps - 1):
            log(f"  训练 {step + 1}/{steps}  loss {last:.3f}  ({time.time() - t0:.0f}s)")
    model.eval()
    return {"steps": steps, "loss_first": first, "loss_last": last, "seconds": time.time() - t0}
