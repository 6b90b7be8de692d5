"""一次构建：目录 -> 检查点 / 用户的模型 -> ONNX（验证）-> 引擎产物（按 engine / precision）-> 精度门禁 -> 仓库。

模型来源见 model_source.py：reference（参考模型，缺检查点时短时训练）或用户的 module / exported / onnx。
用户的模型先在临时目录里构建，全部成功才移进 build_dir：被拒的模型不在 build_dir 留下半成品。
每个阶段都有进度输出，并把报告写进 build_info.json。
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from algorithm.errors import CatalogError, ConfigError
from algorithm.models.catalog import Catalog, load_catalog, synthetic_catalog
from algorithm.serving.config import ServingConfig

Log = Callable[[str], None]


@dataclass
class BuildResult:
    repository: str
    catalog: str
    checkpoint: str
    onnx: str
    engine_artifact: str
    reports: Dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"模型仓库：{self.repository}", f"目录：{self.catalog}", f"检查点：{self.checkpoint}",
                 f"ONNX：{self.onnx if os.path.exists(self.onnx) else '（未导出）'}", f"引擎产物：{self.engine_artifact}"]
        gate = self.reports.get("gates")
        if gate:
            lines.append(f"精度门禁：{'通过' if gate['passed'] else '未通过'}（{gate['summary']}）")
        return "\n".join(lines)


def paths(config: ServingConfig) -> Dict[str, str]:
    b = os.path.abspath(config.build_dir)
    name = config.model.name
    return {"build": b, "catalog": os.path.join(b, "catalog.npz"),
            "checkpoint": os.path.abspath(config.checkpoint) if config.checkpoint
            else os.path.join(b, "checkpoints", f"{name}.pt"),
            "onnx": os.path.join(b, "onnx", f"{name}.onnx"),
            "engine_dir": os.path.join(b, "engines"),
            "repository": os.path.join(b, "model_repository")}


def ensure_catalog(config: ServingConfig, log: Log = print, save: bool = True) -> Catalog:
    """目录：配置了 path 就加载（校验），否则生成带种子的合成目录；save 时保存到 build 目录。"""
    p = paths(config)
    if config.catalog.path:
        catalog = load_catalog(config.catalog.path)
        if tuple(catalog.codebook_sizes) != tuple(config.model.codebook_sizes):
            raise CatalogError(f"目录 {config.catalog.path} 的码本大小 {list(catalog.codebook_sizes)} 与模型的契约 "
                               f"model.codebook_sizes={list(config.model.codebook_sizes)} 不一致")
    else:
        catalog = synthetic_catalog(config.catalog.num_items, config.model.codebook_sizes, config.catalog.seed)
    if not save:
        log(f"[1/5] 目录：{len(catalog)} 个物品，码本 {list(catalog.codebook_sizes)} 与模型的契约一致")
        return catalog
    catalog.save(p["catalog"])
    log(f"[1/5] 目录：{len(catalog)} 个物品 -> {p['catalog']}")
    return catalog


def ensure_checkpoint(config: ServingConfig, catalog: Catalog, log: Log = print):
    """检查点：存在就加载（weights_only=True），否则构建参考模型、做短时训练并保存。"""
    from algorithm.models.checkpoint import load_checkpoint, save_checkpoint
    from algorithm.models.train import train_reference
    from algorithm.models.ugt import build_model
    from algorithm.serving.runtime.engines.torch import resolve_device
    from algorithm.serving.runtime.preprocess import Preprocessor

    p = paths(config)
    if os.path.isfile(p["checkpoint"]):
        model, meta = load_checkpoint(p["checkpoint"])
        if model.cfg.to_dict() != config.model.to_dict():
            if config.checkpoint:
                raise ConfigError(f"检查点 {p['checkpoint']} 的模型配置与 model.* 不一致：{model.cfg.to_dict()}")
        elif meta.get("catalog_seed") == config.catalog.seed and meta.get("train") == dataclasses.asdict(config.train):
            log(f"[2/5] 检查点：复用 {p['checkpoint']}")
            return _prepare_for_export(model, catalog, config), meta
    if config.checkpoint:
        raise ConfigError(f"检查点不存在：{config.checkpoint}")
    log(f"[2/5] 检查点：构建 {config.model.name}，在合成序列上训练 {config.train.steps} 步")
    model = build_model(config.model, seed=config.seed)
    pre = Preprocessor(catalog, config.contract())
    t = config.train
    device = resolve_device(t.device)
    stats = train_reference(model.to(device), catalog, t.steps, t.batch_size, t.seq_length, t.lr, t.seed,
                            encode=lambda hs: pre.encode_batch(hs), log=log)
    model.to("cpu")
    stats["device"] = device
    meta = {"catalog_seed": config.catalog.seed, "train": dataclasses.asdict(t), "train_stats": stats}
    save_checkpoint(model, p["checkpoint"], meta)
    log(f"      -> {p['checkpoint']}")
    return _prepare_for_export(model, catalog, config), meta


def _prepare_for_export(model, catalog: Catalog, config: ServingConfig):
    """检查点之外、决定导出计算图的两项：目录约束与解码器的 KV 缓存（导出、门禁与参考输出都用这个模型）。"""
    model.decoder_kv_cache = config.export.decoder_kv_cache
    return model.attach_catalog(catalog.semantic_ids) if config.catalog.constrained_decoding else model


def build(config: ServingConfig, log: Log = print, gpus: Optional[List[int]] = None) -> BuildResult:
    """完整构建；返回各产物路径与报告。"""
    from algorithm.serving.engines import resolve_auto

    asked = config.engine.kind
    if config.model.source == "onnx" and asked == "auto":
        # ONNX 来源没有 PyTorch 模型，auto 在 GPU 上会选的 torch 引擎用不了
        config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, kind="onnxruntime",
                                                                        pack_rows=False))
    config = resolve_auto(config)
    if config.model.source != "reference":
        return _staged(config, lambda staged: _build(staged, asked, log, gpus))
    return _build(config, asked, log, gpus)


def _staged(config: ServingConfig, run: Callable[[ServingConfig], BuildResult]) -> BuildResult:
    """在 build_dir 旁的临时目录里构建，成功后把产物逐项移进 build_dir；失败时删掉临时目录，build_dir 不动。"""
    final = os.path.abspath(config.build_dir)
    parent = os.path.dirname(final)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(final)}-staging-", dir=parent)
    engine = config.engine
    if engine.kind == "torch" and not engine.compile_cache_dir:  # 写进 config.pbtxt 的路径要是最终的
        engine = dataclasses.replace(engine, compile_cache_dir=os.path.join(final, "compile_cache"))
    try:
        result = run(dataclasses.replace(config, build_dir=tmp, engine=engine))
        os.makedirs(final, exist_ok=True)
        for name in os.listdir(tmp):
            src, dst = os.path.join(tmp, name), os.path.join(final, name)
            if os.path.isdir(dst) and not os.path.islink(dst):
                old = tempfile.mkdtemp(prefix=".old-", dir=final)
                os.rename(dst, os.path.join(old, name))
                os.rename(src, dst)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def moved(path: str) -> str:
        return os.path.join(final, os.path.relpath(path, tmp)) if path.startswith(tmp + os.sep) else path

    return dataclasses.replace(result, repository=moved(result.repository), catalog=moved(result.catalog),
                               checkpoint=moved(result.checkpoint), onnx=moved(result.onnx),
                               engine_artifact=moved(result.engine_artifact))


def _build(config: ServingConfig, asked: str, log: Log, gpus: Optional[List[int]]) -> BuildResult:
    from algorithm.serving.engines import build_engine_artifact, engine_module
    from algorithm.serving.export_onnx import export_to_onnx
    from algorithm.serving.repository import build_repository

    t0 = time.time()
    p = paths(config)
    user = None
    if config.model.source == "reference":
        os.makedirs(p["build"], exist_ok=True)
        catalog = ensure_catalog(config, log)
        model, meta = ensure_checkpoint(config, catalog, log)
    else:
        from algorithm.serving.model_source import load_user_model

        catalog = ensure_catalog(config, log, save=False)  # 码本不符在加载模型之前就停
        user = load_user_model(config, catalog, p["onnx"], log)
        model, config, meta = user.model, user.config, {"user_model": user.report}
        os.makedirs(p["build"], exist_ok=True)
        catalog.save(p["catalog"])
    if user is not None and user.onnx_path:
        log(f"[3/5] ONNX：用 model.path 的图（按契约修补后 {p['onnx']}），不重新导出")
        export_report = {"source": "model.path", "onnx": config.model.path}
    elif not engine_module(config.engine.kind).NEEDS_ONNX:
        # 例如 torch 引擎的产物是 torch.export 的 .pt2（门禁检查它）；ONNX 只给 onnxruntime / TensorRT 用
        log(f"[3/5] 导出 ONNX：engine={config.engine.kind} 不需要，跳过")
        export_report = {"skipped": f"engine.kind={config.engine.kind}"}
    else:
        log(f"[3/5] 导出 ONNX 并在多个形状上验证：{config.export.checked_shapes()}")
        export_to_onnx(model, p["onnx"], config.export, tie_tolerance=config.gates.tie_tolerance,
                       contract=None if user is None else config.contract())
        with open(p["onnx"] + ".report.json") as f:
            export_report = json.load(f)
        log("      " + _export_line(export_report))
    chosen = f"{asked} -> {config.engine.kind}（按本机是否有 GPU）" if asked != config.engine.kind else config.engine.kind
    log(f"[4/5] 引擎：{chosen} / {config.export.precision}")
    from algorithm.serving.speed_check import after_gates  # 8 位引擎对同一模型的 fp16 引擎

    artifact, engine_reports = build_engine_artifact(config, model, catalog, p["onnx"], p["engine_dir"], log,
                                                     after_gates=after_gates(config, model, p["engine_dir"], log))
    extra = [artifact + ".data"] if os.path.exists(artifact + ".data") else []
    info = {"config": dataclasses.asdict(config), "checkpoint_meta": meta, "export": export_report,
            **engine_reports}
    if user is not None:
        info["user_model"] = user.report
    log(f"[5/5] 生成 ensemble 仓库（{config.export.model_name}）")
    repo = build_repository(config, p["repository"], artifact, p["catalog"], gpus=gpus,
                            info=info, extra_engine_files=extra)
    log(f"构建完成（{time.time() - t0:.0f}s）")
    ck = p["checkpoint"] if config.model.source == "reference" or config.checkpoint else "（无：model.source=" \
        + config.model.source + "）"
    return BuildResult(repo, p["catalog"], ck, p["onnx"], artifact, reports=engine_reports)


def _export_line(report: Dict[str, Any]) -> str:
    parts = []
    for s in report["shapes"]:
        c = s.get("comparison")
        parts.append(f"({s['batch']},{s['seq_len']}): " + (f"重合 {c['overlap']:.3f} 误差 {c['score_max_abs']:.1e}" if c else "形状"))
    return f"{report['exporter']}；" + "；".join(parts)
