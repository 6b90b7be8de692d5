"""Triton Python 模型：引擎运行器：onnxruntime / torch（逻辑见 algorithm/serving/triton_models.py 与 engines.py）。

保持很薄：解析请求、调用 algorithm 包、封装响应。
"""
import json
import os
import sys

for _p in filter(None, os.environ.get("UGT_PYTHONPATH", "").split(os.pathsep)):
    if _p not in sys.path:  # 内嵌服务器传入本包路径（stub 的解释器不读 PYTHONPATH）
        sys.path.insert(0, _p)

import triton_python_backend_utils as pb_utils  # noqa: E402

from algorithm.serving import triton_glue  # noqa: E402
from algorithm.serving.triton_models import EngineModel, parse_parameters  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        model_dir = os.path.join(args["model_repository"], args["model_version"])
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        self.impl = EngineModel(model_dir, parse_parameters(config), device_id=device_id)
        self.input_names = [i["name"] for i in config["input"]]

    def execute(self, requests):
        return triton_glue.write_responses(
            pb_utils, self.impl.execute(triton_glue.read_requests(pb_utils, requests, self.input_names)))
