"""进程内流水线：用构建好的仓库里同一份配置、目录与引擎文件，在本进程里跑
前处理 -> 引擎 -> 后处理（与 Triton 中运行的是同一批类）。集成测试拿它作参考。"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from algorithm.serving.triton_config import ENGINE, POSTPROCESS, PREPROCESS, parse_pbtxt
from algorithm.serving.triton_models import (BEHAVIOR_INPUT, HISTORY_INPUT, EngineModel, PostprocessModel,
                                             PreprocessModel)


def _params(repo: str, name: str) -> Dict[str, str]:
    with open(os.path.join(repo, name, "config.pbtxt")) as f:
        mc = parse_pbtxt(f.read())
    return {k: v.string_value for k, v in mc.parameters.items()}


class InProcessPipeline:
    def __init__(self, repository: str):
        self.pre = PreprocessModel(os.path.join(repository, PREPROCESS, "1"), _params(repository, PREPROCESS))
        self.engine = EngineModel(os.path.join(repository, ENGINE, "1"), _params(repository, ENGINE))
        self.post = PostprocessModel(os.path.join(repository, POSTPROCESS, "1"), _params(repository, POSTPROCESS))

    def recommend(self, item_ids: Sequence[int], behavior_types: Optional[Sequence[int]] = None) -> Dict[str, np.ndarray]:
        """一条历史 -> {item_ids [K], scores [K], semantic_ids [K, 3], num_unknown_items}；请求不合法时抛出异常。"""
        req = {HISTORY_INPUT: np.asarray(item_ids, dtype=np.int64).reshape(1, -1),
               BEHAVIOR_INPUT: None if behavior_types is None else np.asarray(behavior_types, np.int64).reshape(1, -1)}
        out = self._unwrap(self.pre.execute([req])[0])
        unknown = int(out.pop("num_unknown_items")[0, 0])
        eng = self._unwrap(self.engine.execute([out])[0])
        post = self._unwrap(self.post.execute([{"engine_recommendations": eng["recommendations"],
                                                "engine_scores": eng["scores"]}])[0])
        return {k: v[0] for k, v in post.items()} | {"num_unknown_items": unknown}

    def recommend_many(self, histories: List[np.ndarray]) -> List[Dict[str, np.ndarray]]:
        return [self.recommend(h) for h in histories]

    @staticmethod
    def _unwrap(res):
        if isinstance(res, Exception):
            raise res
        return res
