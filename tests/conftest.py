"""共用夹具：一个小的已构建仓库（整个会话构建一次）与一个真实的内嵌 Triton 服务器。"""
import os
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS_DIR, REPO_ROOT = HERE, ROOT  # 子目录里的测试用它们找 fixtures / golden / conf
for _p in (ROOT, HERE):  # 子目录里的测试也能 from conftest import tiny_config
    if _p not in sys.path:
        sys.path.insert(0, _p)

from algorithm.serving.config import (CatalogConfig, ExportConfig, GateConfig, ServingConfig,  # noqa: E402
                                      TrainConfig, TritonConfig)


def tiny_config(build_dir: str, **overrides) -> ServingConfig:
    """CI 用的小配置：ugt_tiny、3000 个物品的目录、短训练、CPU 上单实例。"""
    kw = dict(
        build_dir=build_dir,
        export=ExportConfig(precision="fp32", max_batch_size=16, max_seq_length=256,
                            validation_shapes=[[1, 3], [5, 37], [16, 256]]),
        # 过载丢弃的队列深度 64（单实例、preferred 最大 16 时默认只有 16）：并发的集成测试最多几十个客户端，不算过载
        triton=TritonConfig(instance_count=1, preferred_batch_sizes=[4, 8, 16], max_queue_delay_us=2000,
                            preprocess_instance_count=1, postprocess_instance_count=1, shed_queue_depth=64),
        catalog=CatalogConfig(num_items=3000, seed=3),
        train=TrainConfig(steps=80, batch_size=32, seq_length=24),
        gates=GateConfig(num_samples=16),
    )
    kw.update(overrides)
    return ServingConfig(**kw)


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """构建一次 tiny 仓库（onnxruntime / fp32）。"""
    from algorithm.serving.build import build

    cfg = tiny_config(str(tmp_path_factory.mktemp("build")))
    result = build(cfg, log=lambda s: None, gpus=[])
    return cfg, result


@pytest.fixture(scope="session")
def catalog(built):
    from algorithm.models.catalog import load_catalog

    return load_catalog(built[1].catalog)


@pytest.fixture(scope="session")
def server(built):
    """在 tiny 仓库上运行的真实 Triton（整个会话一个）。"""
    from algorithm.serving.server import EmbeddedTritonServer

    cfg, result = built
    with EmbeddedTritonServer(result.repository, cfg.server, ready_models=[cfg.export.model_name]) as s:
        yield s


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture
def sleep_repo(tmp_path):
    """fixtures/sleep_repo 的私有副本（一个 python 模型、启动快）：锁按仓库目录，别的测试或会话用原件不受影响。"""
    import shutil

    repo = str(tmp_path / "repo")
    shutil.copytree(os.path.join(TESTS_DIR, "fixtures", "sleep_repo"), repo,
                    ignore=shutil.ignore_patterns("__pycache__"))
    return repo
