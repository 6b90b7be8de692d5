"""生成完整的 ensemble 模型仓库（原子写入：先写临时目录，再 rename）。

仓库布局（<out>/）：
  ugt_recommend/config.pbtxt + 1/            ensemble（版本目录为空）
  ugt_preprocess/config.pbtxt + 1/model.py + 1/catalog.npz
  ugt_engine/config.pbtxt + 1/model.py（python 运行器时）+ 1/<引擎文件>
  ugt_postprocess/config.pbtxt + 1/model.py + 1/catalog.npz
  build_info.json                            构建参数（模型、精度、引擎、各阶段报告）
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence

from algorithm.errors import ConfigError
from algorithm.serving.config import ServingConfig
from algorithm.serving.engines import hosting as engine_hosting
from algorithm.serving.triton_config import (ENGINE, FLOOR, POSTPROCESS, PREPROCESS, build_model_configs, to_pbtxt,
                                             validate_model_name, warmup_files)

TEMPLATE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "model_repository")


def _safe_target(path: str) -> str:
    """目标目录不能是符号链接（不跟随链接写到仓库之外）。"""
    path = os.path.abspath(path)
    if os.path.islink(path):
        raise ConfigError(f"仓库路径 {path} 是符号链接；拒绝写入（可能指向仓库之外）")
    return path


def _copy_file(src: str, dst: str) -> None:
    if os.path.islink(src):
        raise ConfigError(f"拒绝复制符号链接 {src}")
    if not os.path.isfile(src):
        raise ConfigError(f"文件不存在：{src}")
    shutil.copyfile(src, dst)


def build_repository(config: ServingConfig, out_dir: str, engine_artifact: str, catalog_path: str,
                     gpus: Optional[Sequence[int]] = None,
                     info: Optional[Dict] = None, extra_engine_files: Sequence[str] = (),
                     include_floor: bool = False) -> str:
    """写出整个仓库并原子替换 out_dir。返回 out_dir 的绝对路径。include_floor：加上压测的地板模型。"""
    out_dir = _safe_target(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    configs = build_model_configs(config, gpus, include_floor=include_floor)
    hosting = engine_hosting(config)
    tmp = tempfile.mkdtemp(prefix=".repo-", dir=parent)
    try:
        for name, mc in configs.items():
            d = os.path.join(tmp, validate_model_name(name))
            os.makedirs(os.path.join(d, "1"))
            with open(os.path.join(d, "config.pbtxt"), "w") as f:
                f.write(to_pbtxt(mc))
        for name in (PREPROCESS, POSTPROCESS):
            _copy_file(os.path.join(TEMPLATE_DIR, name, "1", "model.py"), os.path.join(tmp, name, "1", "model.py"))
            _copy_file(catalog_path, os.path.join(tmp, name, "1", "catalog.npz"))
        if configs[ENGINE].model_warmup:
            os.makedirs(os.path.join(tmp, ENGINE, "warmup"))
            for fname, data in warmup_files(config.contract()).items():
                with open(os.path.join(tmp, ENGINE, "warmup", fname), "wb") as f:
                    f.write(data)
        if include_floor:
            _copy_file(os.path.join(TEMPLATE_DIR, FLOOR, "1", "model.py"), os.path.join(tmp, FLOOR, "1", "model.py"))
        if hosting.python_runner:
            _copy_file(os.path.join(TEMPLATE_DIR, ENGINE, "1", "model.py"), os.path.join(tmp, ENGINE, "1", "model.py"))
        _copy_file(engine_artifact, os.path.join(tmp, ENGINE, "1", hosting.filename))
        for extra in extra_engine_files:  # 如 ONNX 外部数据
            _copy_file(extra, os.path.join(tmp, ENGINE, "1", os.path.basename(extra)))
        with open(os.path.join(tmp, "build_info.json"), "w") as f:
            json.dump(info or {}, f, indent=2, ensure_ascii=False, default=str)
        old = None
        if os.path.exists(out_dir):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(out_dir, os.path.join(old, "repo"))
        os.rename(tmp, out_dir)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
