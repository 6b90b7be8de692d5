"""进程内流水线：用构建好的仓库里同一份配置、目录与引擎文件，在本进程里跑
前处理 -> 引擎 -> 后处理（与 Triton 中运行的是同一批类）。集成测试与离线吞吐拿它作参考。"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from algorithm.interfaces import BEHAVIOR_INPUT, HISTORY_INPUT, POST_IN_REC, POST_IN_SCORES, UNKNOWN_COUNT_OUTPUT
from algorithm.serving.runtime import params
from algorithm.serving.runtime.models import EngineModel, PostprocessModel, PreprocessModel
from algorithm.serving.triton_config import ENGINE, POSTPROCESS, PREPROCESS, parse_pbtxt


def read_runtime(repo: str, name: str):
    """仓库里某个模型的 (ServingConfig, RuntimeSpec)：与 Triton 交给 initialize 的是同一个参数。"""
    with open(os.path.join(repo, name, "config.pbtxt")) as f:
        mc = parse_pbtxt(f.read())
    return params.decode({k: v.string_value for k, v in mc.parameters.items()})


class InProcessPipeline:
    def __init__(self, repository: str, engine: bool = True, lanes: int = 1):
        """lanes：引擎运行器每个桶几套暂存区（离线吞吐测流水线时要 2 套，见 bench/offline.pipelined）。
        不做过载丢弃（模型类的默认）：进程内没有服务器的队列，请求可以攒着晚些再执行。"""
        d = lambda name: os.path.join(repository, name, "1")  # noqa: E731
        self.pre = PreprocessModel(d(PREPROCESS), *read_runtime(repository, PREPROCESS))
        self.engine = EngineModel(d(ENGINE), *read_runtime(repository, ENGINE), lanes=lanes) if engine else None
        self.post = PostprocessModel(d(POSTPROCESS), *read_runtime(repository, POSTPROCESS))

    def recommend(self, item_ids: Sequence[int], behavior_types: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
        """一条历史 -> {item_ids [K], scores [K], semantic_ids [K, 3], num_unknown_items}；请求不合法时抛出异常。"""
        return self.recommend_many([np.asarray(item_ids)], None if behavior_types is None else [behavior_types])[0]

    def recommend_many(self, histories: List[np.ndarray], behaviors: Optional[List] = None
                       ) -> List[Dict[str, np.ndarray]]:
        """多条历史当作同一次 execute 的多个请求（与服务器动态合批时相同的路径）。"""
        reqs = [{HISTORY_INPUT: np.asarray(h, dtype=np.int64).reshape(1, -1),
                 BEHAVIOR_INPUT: None if behaviors is None or behaviors[i] is None
                 else np.asarray(behaviors[i], np.int64).reshape(1, -1)} for i, h in enumerate(histories)]
        pre = [self._unwrap(r) for r in self.pre.execute(reqs)]
        unknown = [int(p.pop(UNKNOWN_COUNT_OUTPUT)[0, 0]) for p in pre]
        eng = [self._unwrap(r) for r in self.engine.execute(pre)]
        post = [self._unwrap(r) for r in self.post.execute(
            [{POST_IN_REC: e["recommendations"], POST_IN_SCORES: e["scores"]} for e in eng])]
        return [{k: v[0] for k, v in p.items()} | {"num_unknown_items": u} for p, u in zip(post, unknown)]

    @staticmethod
    def _unwrap(res):
        if isinstance(res, Exception):
            raise res
        return res
