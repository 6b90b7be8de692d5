"""Triton Python 模型：前处理：原始历史 -> 引擎六个输入（逻辑见 algorithm/serving/runtime/preprocess.py）。

保持很薄：解析请求、调用 algorithm 包、封装响应。
"""
import json
import os
import sys

for _p in filter(None, os.environ.get("UGT_PYTHONPATH", "").split(os.pathsep)):
    if _p not in sys.path:  # 内嵌服务器传入本包路径（stub 的解释器不读 PYTHONPATH）
        sys.path.insert(0, _p)

import triton_python_backend_utils as pb_utils  # noqa: E402

from algorithm.serving.runtime import glue, params  # noqa: E402
from algorithm.interfaces import BEHAVIOR_INPUT, HISTORY_INPUT  # noqa: E402
from algorithm.serving.runtime.models import PreprocessModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config, spec = params.decode(json.loads(args["model_config"]))
        self.impl = PreprocessModel(os.path.join(args["model_repository"], args["model_version"]), config, spec,
                                    shed=True)
        self.input_names = (HISTORY_INPUT, BEHAVIOR_INPUT)
        glue.settle_process()

    def execute(self, requests):
        return glue.write_responses(pb_utils, self.impl.execute(glue.read_requests(pb_utils, requests, self.input_names)))
