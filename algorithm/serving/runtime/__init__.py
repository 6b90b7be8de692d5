"""在 Triton 里运行的部分：前处理、后处理、引擎运行器与 Triton 适配层。

只依赖 numpy、契约（algorithm.interfaces）、配置的 dataclass（algorithm.serving.config）与引擎自己的运行时
（onnxruntime / torch）；不导入导出、优化、仓库生成或压测（tests/test_architecture.py 解析 import 检查这一点），
所以生产容器里的前/后处理进程不需要 torch / onnx，改动构建流程也不会影响服务进程。
"""
