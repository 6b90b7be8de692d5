"""为示例模型准备目录与检查点（团队那边本来就有这两样，这里在 CPU 上一两分钟做出来）：

  .venv/bin/python examples/pooled_cnn/prepare.py --out build/pooled_cnn_assets

用本包的目录格式与前处理（本包要能导入：pip install -e . 装过）；同目录的 model.py 不在任何包里，按路径加载
（与构建读 model.factory=examples/pooled_cnn/model.py:build 的方式相同）。

写出 <out>/catalog.npz（本包的目录格式：item_ids [N]、semantic_ids [N, 3]、codebook_sizes [3]）
与 <out>/pooled_cnn.pt（state_dict，torch.save；构建以 weights_only=True 读它）。
目录是这个示例自己的：l1 是 32 个类目，l2 是类目内的品牌，l3 是品牌内的款式；item id 从 10,000,001 起、间隔随机。
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from algorithm.interfaces import EngineContract
from algorithm.models.catalog import Catalog
from algorithm.models.sequences import SyntheticSequences
from algorithm.serving.model_source import load_module_file
from algorithm.serving.runtime.preprocess import Preprocessor

example = load_module_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py"))
CODEBOOK_SIZES, MAX_SEQ_LENGTH, NUM_TOKEN_TYPES, TOP_K = (example.CODEBOOK_SIZES, example.MAX_SEQ_LENGTH,
                                                          example.NUM_TOKEN_TYPES, example.TOP_K)
build = example.build


def make_catalog(num_items: int, seed: int) -> Catalog:
    """类目 -> 品牌 -> 款式：每个类目用 8 个品牌，每个品牌的款式随机取，三元组唯一。"""
    v1, v2, v3 = CODEBOOK_SIZES
    rng = np.random.default_rng(seed)
    brands = {c: rng.choice(v2, size=8, replace=False) for c in range(v1)}
    triples = set()
    while len(triples) < num_items:
        c = int(rng.integers(v1))
        triples.add((c, int(rng.choice(brands[c])), int(rng.integers(v3))))
    sem = np.array(sorted(triples), dtype=np.int64)
    rng.shuffle(sem)
    item_ids = 10_000_000 + np.cumsum(rng.integers(1, 50, size=num_items)).astype(np.int64)
    return Catalog(item_ids, sem, CODEBOOK_SIZES)


def train(model, catalog: Catalog, steps: int, seed: int) -> None:
    torch.manual_seed(seed)
    data = SyntheticSequences(catalog, seed)
    pre = Preprocessor(catalog, EngineContract(max_seq_length=MAX_SEQ_LENGTH, codebook_sizes=CODEBOOK_SIZES,
                                               num_token_types=NUM_TOKEN_TYPES, top_k=TOP_K))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    t0 = time.time()
    for step in range(steps):
        histories, nxt = data.sample(64, 32)
        feeds = pre.encode_batch(histories)
        inputs = [torch.from_numpy(feeds[n]) for n in pre.contract.input_names]
        loss = model.loss(inputs, torch.from_numpy(catalog.semantic_ids[nxt]))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  训练 {step + 1}/{steps}  loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    model.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/pooled_cnn_assets")
    ap.add_argument("--num-items", type=int, default=5000)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    catalog = make_catalog(args.num_items, args.seed)
    catalog.save(os.path.join(args.out, "catalog.npz"))
    model = build()
    train(model, catalog, args.steps, args.seed)
    torch.save(model.state_dict(), os.path.join(args.out, "pooled_cnn.pt"))
    print(f"目录 {len(catalog)} 个物品 -> {args.out}/catalog.npz；检查点 -> {args.out}/pooled_cnn.pt")


if __name__ == "__main__":
    main()
