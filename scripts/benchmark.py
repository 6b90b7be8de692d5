"""压测（Hydra）：启动内嵌服务器（或用 benchmark.url 指向已运行的服务器），跑配置的压测，写 JSON / CSV / PNG。

  python scripts/benchmark.py benchmark=quick                       # 本机 ugt_tiny，一分钟内
  python scripts/benchmark.py -m triton.instance_count=1,2 triton.max_queue_delay_us=100,2000 benchmark=quick
      # multirun：每个组合重建配置（不重新导出）、重启服务器、压测，最后写一张汇总表
"""
import json
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from algorithm.serving.cli import setup_logging
from algorithm.serving.config import register_configs, to_serving_config
from algorithm.serving.errors import UGTServingError

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    from algorithm.serving.bench.app import benchmark_from_config

    hc = HydraConfig.get()
    out_dir = hc.runtime.output_dir
    config = to_serving_config(cfg)
    try:
        report = benchmark_from_config(config, out_dir, overrides=list(hc.overrides.task))
    except UGTServingError as e:
        print(f"压测失败：{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    if hc.mode.name == "MULTIRUN":
        from algorithm.serving.bench.app import update_sweep_summary

        path = update_sweep_summary(hc.sweep.dir, out_dir, report, list(hc.overrides.task))
        print(f"汇总表：{path}")
    print(json.dumps((report.get("headline") or {}).get("sla_rate", {}).get("median"), ensure_ascii=False))
    if report.get("incomplete"):
        # 已测的写进了报告；单次运行以非零退出，multirun 接着测下一个变体（汇总表的 note 列写明）
        print(f"压测中断：{report['incomplete']}", file=sys.stderr)
        if hc.mode.name != "MULTIRUN":
            sys.exit(3)


if __name__ == "__main__":
    main()
