"""读已构建的仓库：剖析需要的事实（引擎文件、目录、模型配置、桶、编译设置、检查点）与运行器类。"""
from __future__ import annotations

import importlib
import json
import os
import re
from typing import Any, Dict, List

DEFAULT_RUNNER = "algorithm.serving.runtime.engines.torch:TorchRunner"


def engine_params(repo: str) -> Dict[str, str]:
    """ugt_engine/config.pbtxt 的 parameters -> {键: 字符串}；没有 protobuf 时用正则读。"""
    with open(os.path.join(repo, "ugt_engine", "config.pbtxt")) as f:
        text = f.read()
    try:
        from algorithm.serving.triton_config import parse_pbtxt

        mc = parse_pbtxt(text)
    except ImportError:
        return _regex_params(text)
    return {k: v.string_value for k, v in mc.parameters.items()}


def _regex_params(text: str) -> Dict[str, str]:
    out = {}
    for k, v in re.findall(r'key:\s*"([^"]+)"\s*value\s*\{\s*string_value:\s*"((?:[^"\\]|\\.)*)"', text):
        out[k] = v.encode("latin-1", "backslashreplace").decode("unicode_escape").encode("latin-1").decode("utf-8")
    return out


def ints(v) -> List[int]:
    """[1, 2] 或 "1,2" -> [1, 2]。"""
    if isinstance(v, (list, tuple)):
        return [int(x) for x in v]
    return [int(x) for x in str(v or "").split(",") if x.strip()]


def _config_and_runtime(repo: str, params: Dict[str, str]):
    """两种参数格式：一个 JSON 键 ugt_serving（{"config", "runtime"}），或逐项的键 + build_info.json 的 config。"""
    if "ugt_serving" in params:
        d = json.loads(params["ugt_serving"])
        return d["config"], d["runtime"]
    info_path = os.path.join(repo, "build_info.json")
    info = json.load(open(info_path)) if os.path.isfile(info_path) else {}
    return info.get("config", {}), params


def _catalog(repo: str, rt: Dict[str, Any]):
    """前处理的目录文件；名字不在参数里时取仓库里第一个 .npz。"""
    catalogs = [os.path.join(repo, "ugt_preprocess", "1", rt.get("catalog_file") or rt.get("catalog") or "catalog.npz")]
    catalogs += [os.path.join(root, f) for root, _, files in os.walk(repo) for f in files if f.endswith(".npz")]
    return next((c for c in catalogs if os.path.isfile(c)), None)


def _checkpoint(repo: str, config: Dict[str, Any]):
    """fp32 检查点（门禁的参考）：配置里的、构建目录的 checkpoints/，或仓库旁的 checkpoints/；都没有时 None。"""
    name = config["model"]["name"]
    build_dir = config.get("build_dir") or os.path.dirname(repo)
    ckpt = config.get("checkpoint") or os.path.join(build_dir, "checkpoints", f"{name}.pt")
    if not os.path.isfile(ckpt):
        ckpt = os.path.join(os.path.dirname(repo), "checkpoints", f"{name}.pt")
    return ckpt if os.path.isfile(ckpt) else None


def load_repository(repo: str) -> Dict[str, Any]:
    """仓库 -> 剖析需要的事实；不是 engine=torch 或找不到模型配置时 SystemExit。"""
    repo = os.path.abspath(repo)
    config, rt = _config_and_runtime(repo, engine_params(repo))
    if not config.get("model"):
        raise SystemExit(f"{repo}: 找不到模型配置（config.pbtxt 的 ugt_serving 或 build_info.json 的 config.model）")
    kind = rt.get("engine_kind", (config.get("engine") or {}).get("kind", "torch"))
    if kind != "torch":
        raise SystemExit(f"{repo}: 引擎是 {kind!r}，剖析只支持 engine=torch 的仓库")
    export = config.get("export") or {}
    bench = config.get("benchmark") or {}
    flag = rt.get("cuda_graphs", "1")
    return {"repo": repo, "engine_file": os.path.join(repo, "ugt_engine", "1", rt.get("engine_file") or "model.pt2"),
            "catalog": _catalog(repo, rt), "model": config["model"],
            "max_seq_length": int(export.get("max_seq_length") or rt.get("max_seq_length")
                                  or config["model"]["max_seq_length"]),
            "seq_buckets": ints(rt.get("seq_buckets")), "batch_buckets": ints(rt.get("batch_buckets")),
            "compile_mode": rt.get("compile_mode", "default"),
            "cuda_graphs": flag is True or str(flag) in ("1", "True", "true"),
            "compile_cache_dir": rt.get("compile_cache_dir", ""), "precision": rt.get("precision") or export.get("precision"),
            "constrained": (config.get("catalog") or {}).get("constrained_decoding", True),
            # 较早的仓库没有这个键：那时的导出每步重算前缀
            "decoder_kv_cache": bool(export.get("decoder_kv_cache", False)),
            "length_median": float(bench.get("length_median", 100.0)),
            "length_sigma": float(bench.get("length_sigma", 1.0)),
            "checkpoint": _checkpoint(repo, config)}


def runner_class(spec: str = ""):
    """运行器类："模块:类"（默认 TorchRunner）。运行器在重构中可能移动：--runner 可显式指定。"""
    mod, _, cls = (spec or DEFAULT_RUNNER).partition(":")
    return getattr(importlib.import_module(mod), cls or "TorchRunner")
