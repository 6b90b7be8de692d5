"""脚本共用：Hydra 入口的配置转换与日志设置。"""
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
CONF_DIR = os.path.join(ROOT, "conf")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("onnx_ir", "torch.onnx", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
