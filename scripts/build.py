"""构建 ensemble 模型仓库：目录 -> 检查点 -> ONNX（验证）-> 引擎 -> 精度门禁 -> 仓库。

  python scripts/build.py                          # ugt_tiny / onnxruntime / fp32（CPU 默认）
  python scripts/build.py precision=int8           # ONNX Runtime 静态 int8（CPU 上可用）
  python scripts/build.py model=ugt_base engine=torch precision=fp16   # GPU
"""
import sys

import hydra
from omegaconf import DictConfig

from algorithm.serving.cli import setup_logging
from algorithm.serving.config import register_configs, to_serving_config
from algorithm.serving.errors import UGTServingError

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    from algorithm.serving.build import build

    try:
        result = build(to_serving_config(cfg))
    except UGTServingError as e:
        print(f"构建失败：{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    print(result.summary())


if __name__ == "__main__":
    main()
