"""命令行入口（scripts/ 下的 Hydra 脚本）共用的日志设置。"""
import logging

# 导出时这些库的 INFO 日志很多，盖住构建自己的进度：只留警告
QUIET_LOGGERS = ("onnx_ir", "torch.onnx", "onnxscript")


def setup_logging(level: int = logging.INFO) -> None:
    """只打印消息本身（进度行给人看）；QUIET_LOGGERS 调到 WARNING。"""
    logging.basicConfig(level=level, format="%(message)s")
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
