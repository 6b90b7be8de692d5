"""profile.json 的数据 -> profile.md：每节一个渲染函数，没有这一节时不写。"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

KERNEL_NOTE = ("wall = 运行器一次 run 的时间（中位数，含拷入拷出）；busy = 各内核（CPU 上是算子）自身时间之和；"
               "launches = 内核（算子）次数")
THROUGHPUT_SECTIONS = ("throughput", "throughput_planned", "throughput_planned_8")


def table(rows: List[Dict], cols: List[Tuple[str, str, str]]) -> str:
    """cols = [(键, 表头, 数字格式)]；缺的值写 -。"""
    head = "| " + " | ".join(c[1] for c in cols) + " |\n| " + " | ".join("---" for _ in cols) + " |\n"
    body = ""
    for r in rows:
        cells = []
        for key, _, fmt in cols:
            v = r.get(key)
            cells.append("-" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v)))
        body += "| " + " | ".join(cells) + " |\n"
    return head + body


def _environment(env: Dict[str, Any]) -> List[str]:
    if not env:
        return []
    keys = ("device", "torch", "torchao", "model", "precision", "decoder_kv_cache", "repo")
    return ["设备：{device}；torch {torch}；torchao {torchao}；模型 {model}；精度 {precision}；"
            "解码器 KV 缓存 {decoder_kv_cache}；仓库 {repo}\n".format(**{k: env.get(k) for k in keys})]


def _stage_check(chk) -> List[str]:
    if not chk:
        return []
    return [f"分阶段版本 vs model(...)：recommendations 一致 {chk['rec_equal']}，分数最大差 "
            f"{chk['score_max_abs']:.2e}；eager（.pt2 权重重建）vs .pt2 模块：top-50 重合 "
            f"{chk['eager_vs_pt2_overlap']:.4f}\n"]


def _stages(stages, device) -> List[str]:
    md = []
    for key, st in (stages or {}).items():
        md.append(f"## a/d. 分阶段耗时与 roofline：{key}（eager {st['dtype']}，中位数，{st['repeats']} 次）\n")
        if device == "cpu":
            md.append("（CPU 上运行：roofline 的峰值取 H100 的，只用于检查脚本本身）\n")
        md.append(f"总计 {st['total_ms']:.2f} ms（{st['flops_total'] / 1e9:.1f} GFLOP，"
                  f"{st['flops_total'] / max(st['total_ms'], 1e-9) / 1e9:.1f} TFLOP/s）\n")
        md.append(table(st["roofline"], [("stage", "阶段", ""), ("ms", "ms", ".3f"), ("share", "占比", ".1%"),
                                         ("gflop", "GFLOP", ".2f"), ("mb", "MB", ".1f"),
                                         ("flop_per_byte", "FLOP/B", ".0f"), ("tflops", "TFLOP/s", ".1f"),
                                         ("gbps", "GB/s", ".0f"), ("compute_util", "算力利用", ".1%"),
                                         ("bw_util", "带宽利用", ".1%"), ("bound", "受限于", ""),
                                         ("vs_roofline", "达到 roofline", ".1%")]))
    return md


def _sdpa(sdpa) -> List[str]:
    if not sdpa:
        return []
    rows = [dict(shape=shape, backend=b, **r) for shape, by in sdpa["backends"].items() for b, r in by.items()]
    return ["## b. SDPA 后端（加性浮点掩码）\n", f"默认选中（profiler 算子名）：{sdpa.get('default_ops')}\n",
            table(rows, [("shape", "形状", ""), ("backend", "后端", ""), ("ok", "可用", ""),
                         ("ms", "ms", ".3f"), ("error", "错误", "")])]


def _ab(rows, title: str, base: Tuple[str, str], new: Tuple[str, str]) -> List[str]:
    """同一进程里两种算法的对照表（self_attention、kv_cache）：base / new = (键前缀, 表头)。"""
    if not rows:
        return []
    return [title, table(list(rows.values()), [
        ("batch", "batch", ""), ("length", "长度", ""), (f"{base[0]}_ms", f"{base[1]} ms", ".2f"),
        (f"{new[0]}_ms", f"{new[1]} ms", ".2f"), ("speedup", "加速", ".2f"), ("rec_equal", "推荐逐位一致", ""),
        ("overlap", "top-50 重合", ".4f"), ("score_max_abs", "分数最大差", ".1e")])]


def _padding(pad) -> List[str]:
    if not pad:
        return []
    md = ["## c. 长度桶的填充（默认长度分布）\n",
          table(pad["rows"], [("name", "桶", ""), ("buckets", "上界", ""), ("padded_token_share", "填充 token", ".1%"),
                              ("cost_ratio", "代价比（二次模型）", ".3f"), ("flops_ratio", "FLOPs 比（模型）", ".3f"),
                              ("request_share", "各桶请求", "")])]
    if pad.get("per_execute"):
        md.append("一次 execute 有 batch 个请求时（按仓库的长度桶分组、行数补到 batch 桶；拼行宽 W = 不超过 W 的历史拼进宽 W 的行、"
                  "更长的照旧分组，0 = 按长度分组，-1 = engine.pack_rows 的做法：W = 最长者的长度桶、全部拼行）的估算：编码器算的 token ÷ 需要的 token，与长度组数\n")
        md.append(table(pad["per_execute"], [("batch", "batch", ""), ("pack_width", "拼行宽 W", ""),
                                             ("token_ratio", "token 比", ".2f"), ("launches", "组数", ".2f")]))
    return md


def _gates(g) -> str:
    verdict = "" if "passed" not in g else ("，**通过**" if g["passed"] else
                                            f"，**不通过**（要求重合 >= {g['thresholds']['overlap']}、"
                                            f"top-1 >= {g['thresholds']['top1']}）")
    return (f"门禁（对 fp32 eager，{g['rows']} 条）：top-50 重合 {g['overlap']:.4f}，top-1 一致 "
            f"{g['top1_agreement']:.3f}，分数 MAE {g['score_mae']:.2e}{verdict}\n")


def _throughput(tp) -> List[str]:
    if not tp:
        return []
    md = [f"## e. 离线吞吐：{tp['label']}\n", tp.get("note", "") + "\n",
          table(tp["rows"], [("batch", "batch", ""), ("req_per_s", "req/s", ".0f"), ("mfu", "MFU（未填充 FLOPs）", ".1%"),
                             ("hw_util", "含填充 FLOPs", ".1%"), ("ms_by_bucket", "各组 ms", "")])]
    if tp.get("gates"):
        md.append(_gates(tp["gates"]))
    if any((tp.get("int_mm_paths") or {}).values()):
        md.append("int8 矩阵乘走的路（capture_safe_int_mm 的调用次数，不含 CUDA Graph 重放）："
                  + "，".join(f"{k} {v}" for k, v in tp["int_mm_paths"].items()) + "\n")
    return md


def _int8_keys(s) -> List[str]:
    return sorted(k for k in s if k.startswith("throughput_int8"))


def _kernels(s) -> List[str]:
    """fp16 的各个内核表（kernels_compiled），再是 int8 各方式最小 batch 的一张。"""
    tables = [("", run) for run in (s.get("kernels_compiled") or {}).get("runs", [])]
    tables += [(f"{k[len('throughput_'):]}，", run) for k in _int8_keys(s) for run in (s[k] or {}).get("kernels", [])]
    md = []
    for what, run in tables:
        md.append(f"## 运行器一次运行的内核 / 算子（{what}{run['shape']}，{run.get('device')}，按自身时间）\n")
        md.append(f"一次 run {run['wall_ms']:.3f} ms；内核自身时间合计 {run['busy_ms']:.3f} ms，{run['launches']} 个内核"
                  f"（{KERNEL_NOTE}）\n")
        md.append(table(run["top"], [("name", "内核", ""), ("ms", "ms", ".3f"), ("count", "次数", "")]))
    return md


def _concurrency(conc) -> List[str]:
    if not conc:
        return []
    return [f"## 一个进程里几批同时跑（CUDA 流，L{conc['length']}）\n", conc.get("note", "") + "\n",
            table(conc["rows"], [("batch", "batch", ""), ("k1_req_per_s", "1 条流 req/s", ".0f"),
                                 ("k2_req_per_s", "2 条 req/s", ".0f"), ("k4_req_per_s", "4 条 req/s", ".0f"),
                                 ("speedup_k2", "2 条倍数", ".2f"), ("speedup_k4", "4 条倍数", ".2f")])]


def _skipped_and_errors(data) -> List[str]:
    md = []
    if data.get("skipped"):
        md.append("## 跳过\n" + "".join(f"- {k}：{v}\n" for k, v in data["skipped"].items()))
    if data.get("errors"):
        md.append("## 错误\n" + "".join(f"- {k}：{v.splitlines()[0]}\n" for k, v in data["errors"].items()))
    return md


def render_markdown(data: Dict[str, Any]) -> str:
    s = data["sections"]
    env = s.get("environment") or {}
    md = ["# torch 引擎剖析\n"]
    md += _environment(env)
    md += _stage_check(s.get("stage_check"))
    md += _stages(s.get("stages"), env.get("device"))
    md += _sdpa(s.get("sdpa"))
    md += _ab(s.get("self_attention"), "## b2. 解码器自注意力：显式 softmax 对 SDPA（eager，同一权重与历史）\n",
              ("sdpa", "SDPA"), ("explicit", "显式"))
    md += _ab(s.get("kv_cache"), "## b3. 解码器的 KV 缓存对每步重算前缀（eager，同一权重与历史）\n",
              ("recompute", "重算"), ("kv_cache", "KV 缓存"))
    md += _padding(s.get("padding"))
    for key in list(THROUGHPUT_SECTIONS) + _int8_keys(s):
        md += _throughput(s.get(key))
    md += _kernels(s)
    md += _concurrency(s.get("concurrency"))
    md += _skipped_and_errors(data)
    md.append(f"\n用时 {data.get('elapsed_s', 0):.0f}s\n")
    return "\n".join(md)
