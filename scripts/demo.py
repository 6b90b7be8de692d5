"""README 的第一条命令：构建（CPU / 内嵌默认）-> 启动内嵌 Triton -> 发送几条原始历史 -> 打印推荐。

  python scripts/demo.py                  # 可加任意 Hydra 覆盖，如 precision=int8
"""
import sys

import hydra
import numpy as np
from omegaconf import DictConfig

from algorithm.serving.cli import setup_logging
from algorithm.serving.config import register_configs, to_serving_config
from algorithm.serving.errors import UGTServingError

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    from algorithm.models.catalog import load_catalog
    from algorithm.models.train import SyntheticSequences
    from algorithm.serving.build import build
    from algorithm.serving.client import RecommendClient
    from algorithm.serving.server import EmbeddedTritonServer

    config = to_serving_config(cfg)
    try:
        result = build(config)
        print(result.summary())
        catalog = load_catalog(result.catalog)
        data = SyntheticSequences(catalog, seed=2024)
        with EmbeddedTritonServer(result.repository, config.server, ready_models=[config.export.model_name]) as server:
            print(f"\nTriton 就绪：gRPC {server.grpc_url}，HTTP {server.http_url}")
            client = RecommendClient(server.grpc_url, config.export.model_name)
            for n in (1, 12, 150):
                history = data.sample(1, n, random_lengths=False)[0][0]
                sent = np.concatenate([history, [-7]])  # 末尾加一个未知 id，演示“跳过并计数”
                r = client.recommend(sent)
                topics = sorted(set(catalog.lookup_items(history)[0][:, 0].tolist()))
                rec_topics = catalog.lookup_items(r.item_ids[r.item_ids >= 0])[0][:, 0]
                share = float(np.isin(rec_topics, topics).mean()) if rec_topics.size else 0.0
                print(f"\n历史 {n} 个物品（+1 个未知 id，跳过 {r.num_unknown_items} 个），主题 {topics[:5]}")
                print(f"  top-10 物品：{r.item_ids[:10].tolist()}")
                print(f"  top-10 分数：{[round(float(s), 3) for s in r.scores[:10]]}")
                print(f"  有效推荐 {int((r.item_ids >= 0).sum())}/{len(r.item_ids)}，其中 {share:.0%} 属于历史中的主题")
            client.close()
    except UGTServingError as e:
        print(f"失败：{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
