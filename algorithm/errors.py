"""两类异常：用户的错误（配置、输入、缺依赖）与验证失败（导出/精度门禁），
以及工具自身的 bug（InternalError）。"""
from __future__ import annotations

from algorithm.interfaces import ContractError  # noqa: F401  (输入不符合契约，同属用户错误)


class UGTServingError(Exception):
    """本包所有异常的基类。"""


class ConfigError(UGTServingError, ValueError):
    """配置不合法：消息写明字段名与允许的取值。"""


class UnsupportedPrecisionError(ConfigError):
    """这台机器 / 这个引擎不支持所选的精度（例如 fp8 在 CPU 或没有 fp8 张量核的 GPU 上）：消息写明为什么、该用什么。"""


class MissingDependencyError(UGTServingError, ImportError):
    """缺少某个可选依赖（TensorRT、tritonserver 二进制、GPU 等），消息写明如何获得。"""


class ValidationError(UGTServingError):
    """导出或优化后的结果与 PyTorch 参考不一致。report 携带全部数字。"""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class ShapeError(ValidationError):
    """输出形状/dtype 与契约不符，或某个形状上无法运行（例如序列长度被固化）。"""


class AccuracyError(ValidationError):
    """数值或 top-k 集合与参考的差异超过阈值（门禁失败）。"""


class ModelContractError(UGTServingError, ValueError):
    """用户的模型不符合引擎契约：消息写明哪个输入或输出、期望与实际（名字、dtype、形状、丢了动态 batch / 长度）。"""


class ModelExportError(UGTServingError, RuntimeError):
    """用户的模型无法导出（torch.export 或加载 .pt2 / .onnx 失败）：消息带导出器自己的报错。"""


class CatalogError(ConfigError):
    """目录文件不合法（重复、越界、格式不符），或它的码本大小与模型的契约不一致。"""


class ServerError(UGTServingError, RuntimeError):
    """Triton 服务器启动失败或未就绪。"""


class StalledError(UGTServingError, RuntimeError):
    """压测的一步在限时内没有完成（发压进程崩溃或卡住、服务器不回答）：消息写明哪一步、限时与服务器当时的状态。

    partial_run：卡住之前这次重复已经完整测好的部分（例如 SLA 搜索与确认都已做完、卡在其后开着追踪的点上），
    压测把它照样算进结果；None = 这次重复没有可用的部分。"""

    def __init__(self, *args, partial_run=None):
        super().__init__(*args)
        self.partial_run = partial_run


class RolloutError(UGTServingError, RuntimeError):
    """新版本没有上线（门禁、加载、冒烟请求或切换失败）：公开的 ensemble 没有动，旧版本继续服务。消息写明哪一步、为什么。"""


class OverloadError(UGTServingError, RuntimeError):
    """服务过载，这个请求没有处理（UNAVAILABLE，客户端可以稍后重试）：消息写明排队多久、上限多少。"""


class InternalError(UGTServingError, RuntimeError):
    """本工具自身的 bug：请附带消息报告。"""


class EngineOutputError(InternalError):
    """引擎给出的输出不符合契约（形状、dtype）：服务端的故障，客户端收到 INTERNAL，不是它的输入错了。"""
