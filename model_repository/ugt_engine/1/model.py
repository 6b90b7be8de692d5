"""Triton Python 模型：引擎运行器：onnxruntime / torch（逻辑见 algorithm/serving/runtime/models.py 与 runtime/engines/）。

保持很薄：解析请求、调用 algorithm 包、封装响应、记录每次 execute 的计时（自定义指标）。
"""
import json
import os
import sys

for _p in filter(None, os.environ.get("UGT_PYTHONPATH", "").split(os.pathsep)):
    if _p not in sys.path:  # 内嵌服务器传入本包路径（stub 的解释器不读 PYTHONPATH）
        sys.path.insert(0, _p)

import triton_python_backend_utils as pb_utils  # noqa: E402

from algorithm.serving.runtime import glue, params  # noqa: E402
from algorithm.serving.runtime.models import EngineModel  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        model_config = json.loads(args["model_config"])
        config, spec = params.decode(model_config)
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        depth = config.triton.engine_pipeline_depth
        self.impl = EngineModel(os.path.join(args["model_repository"], args["model_version"]), config, spec,
                                device_id=device_id, lanes=depth, instance=glue.instance_name(args) or "engine",
                                shed=True)
        self.input_names = [i["name"] for i in model_config["input"]]
        self.metrics = glue.EngineMetrics(pb_utils, args["model_name"], glue.instance_name(args))
        # 流水线（triton.engine_pipeline_depth > 1）：execute 启动后返回 None，结果由后台线程经 response sender 发回
        self.pipeline = glue.Pipeline(self.impl, pb_utils, self.metrics, depth) if depth > 1 else None
        glue.settle_process()

    def execute(self, requests):
        feeds = glue.read_requests(pb_utils, requests, self.input_names)
        if self.pipeline is not None:
            self.pipeline.submit(requests, feeds)
            return None
        results = self.impl.execute(feeds)
        self.metrics.record(self.impl.stats)
        return glue.write_responses(pb_utils, results)

    def finalize(self):
        if self.pipeline is not None:
            self.pipeline.close()
