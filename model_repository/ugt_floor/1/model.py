"""Triton Python 模型：压测的“地板”：与 ensemble 同样的输入输出，但不做任何计算（返回固定形状的填充值）。

同一个发压端、同一台服务器、同样的速率下测它，就得到客户端与 Triton 前端自身的延迟（bench/suite.py）。
只出现在压测生成的仓库里，不进生产仓库。
"""
import json
import os
import sys

for _p in filter(None, os.environ.get("UGT_PYTHONPATH", "").split(os.pathsep)):
    if _p not in sys.path:  # 内嵌服务器传入本包路径（stub 的解释器不读 PYTHONPATH）
        sys.path.insert(0, _p)

import triton_python_backend_utils as pb_utils  # noqa: E402

from algorithm.serving.runtime import glue, params  # noqa: E402
import numpy as np  # noqa: E402

from algorithm.interfaces import HISTORY_INPUT, EnsembleContract  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        config, _ = params.decode(json.loads(args["model_config"]))
        self.outputs = EnsembleContract(config.model.top_k).outputs
        glue.settle_process()

    def execute(self, requests):
        responses = []
        for r in requests:
            b = pb_utils.get_input_tensor_by_name(r, HISTORY_INPUT).as_numpy().shape[0]
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(s.name, np.zeros((b,) + tuple(s.dims[1:]), dtype=s.dtype)) for s in self.outputs]))
        return responses
