"""容量规划：从提交的压测报告算出副本数、GPU 数、目标负载下的利用率，以及 HPA 的目标值。

  python scripts/plan_capacity.py target_qps=5000
  python scripts/plan_capacity.py target_qps=5000 headroom=0.2 gpus_per_replica=1 \
      report=benchmarks/h100-2026-11-24/torch_fp16_tuned/benchmark.json   # 旧的单次报告也能读

参数（key=value，与其余脚本的 Hydra 覆盖写法相同）：
  target_qps        峰值请求速率（req/s，必填）
  headroom          保留的余量比例，默认 0.3：每副本只计划跑到 SLA 速率的 70 %
  gpus_per_replica  每副本的 GPU 数，默认 1
  report            压测报告（scripts/benchmark.py 写的 benchmark.json），默认见 DEFAULT_REPORT

为什么不用 Hydra：其余脚本的配置是整个 ServingConfig（模型、引擎、Triton…），规划器只有这四个输入、
只读一个文件，而 Hydra 应用默认还会为每次运行建输出目录；一个同样写法的 key=value 解析器就够了。

推导（docs/deploy.md 有完整说明）：
  R   报告里每 GPU 的 SLA 速率（P99 ≤ SLO 的最高速率）：有 headline.sla_rate.median（多次重复）时用它，
      否则用 sla.max_rate（单次搜索）；输出里写明用的是哪个。
  每副本容量 C = R × gpus_per_replica（假设与 GPU 数成正比），计划负载 T = C × (1 − headroom)
  副本数 N = ⌈target_qps / T⌉，GPU 数 = N × gpus_per_replica，利用率 = target_qps / (N × C)
  HPA 目标：每副本平均排队请求数 L = T × W_q(T / gpus_per_replica) / 1000，W_q 是各模型平均排队时间之和（ms），
      在报告 SLA 搜索各点（sla.points 或各次重复的 runs[*].sla.points 的 server.*.queue_ms）之间按每 GPU 吞吐线性插值；它与 Prometheus Adapter
      规则 Σ rate(nv_inference_queue_duration_us[1m]) / 1e6 是同一个量（Little 定律 L = λ·W）。
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, fields
from typing import List, Optional, Sequence, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_REPORT = "benchmarks/h100-2026-11-25-run2/machine1/bench_new/benchmark.json"
HPA_METRIC = "triton_queued_requests"


class PlanError(Exception):
    """输入或报告有问题：消息写明哪个字段、期望什么。"""


@dataclass(frozen=True, kw_only=True)
class PlanInputs:
    target_qps: float
    headroom: float = 0.3
    gpus_per_replica: int = 1
    report: str = DEFAULT_REPORT

    def __post_init__(self):
        if not self.target_qps > 0:
            raise PlanError(f"target_qps 应 > 0，得到 {self.target_qps}")
        if not 0 <= self.headroom < 1:
            raise PlanError(f"headroom 应在 [0, 1) 内（保留的余量比例），得到 {self.headroom}")
        if self.gpus_per_replica < 1:
            raise PlanError(f"gpus_per_replica 应为 ≥ 1 的整数，得到 {self.gpus_per_replica}")


@dataclass(frozen=True)
class SlaFigure:
    rate: float  # req/s，每 GPU
    source: str  # 报告里的哪个字段、怎么来的


@dataclass(frozen=True)
class QueuePoint:
    throughput: float  # req/s
    queue_ms: float  # 各模型平均排队时间之和


@dataclass(frozen=True)
class HpaTarget:
    value: float  # 每副本平均排队请求数
    queue_ms: float  # 计划负载处插值得到的 W_q
    between: Tuple[float, float]  # 插值所用两点的吞吐（相同时为外推到端点）

    @property
    def quantity(self) -> str:
        """HPA averageValue 的写法（毫单位的整数）。"""
        return f"{round(self.value * 1000)}m"


@dataclass(frozen=True)
class Plan:
    inputs: PlanInputs
    sla: SlaFigure
    device: str
    slo_ms: Optional[float]
    capacity: float  # 每副本 req/s
    planned_load: float  # 每副本 req/s
    replicas: int
    gpus: int
    utilisation: float  # 目标负载 / 总 SLA 容量
    hpa: Optional[HpaTarget]
    hpa_note: str = ""


def parse_argv(argv: Sequence[str]) -> PlanInputs:
    """key=value 参数 -> PlanInputs；未知键、缺少 = 或类型不对时报错并列出允许的键。"""
    types = {f.name: f.type for f in fields(PlanInputs)}
    kw = {}
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or key not in types:
            raise PlanError(f"参数应为 key=value，key 取 {sorted(types)}；得到 {arg!r}")
        cast = {"float": float, "int": int, "str": str}[types[key]]
        try:
            kw[key] = cast(value)
        except ValueError as e:
            raise PlanError(f"{key} 应为 {types[key]}，得到 {value!r}") from e
    if "target_qps" not in kw:
        raise PlanError("缺少 target_qps=<峰值 req/s>")
    return PlanInputs(**kw)


def load_report(path: str) -> dict:
    resolved = path if os.path.isabs(path) or os.path.exists(path) else os.path.join(ROOT, path)
    try:
        with open(resolved) as f:
            return json.load(f)
    except OSError as e:
        raise PlanError(f"读不了报告 {path}：{e}") from e


def sla_figure(report: dict) -> SlaFigure:
    """每 GPU 的 SLA 速率：优先多次重复的中位数（headline.sla_rate.median），否则单次的 sla.max_rate。"""
    head = (report.get("headline") or {}).get("sla_rate")
    if isinstance(head, dict) and head.get("median") is not None:
        values = head.get("values") or []
        spread = f"，范围 {head['min']:g}–{head['max']:g}" if head.get("min") is not None else ""
        return SlaFigure(float(head["median"]), f"headline.sla_rate.median（{len(values)} 次重复的中位数{spread}）")
    sla = report.get("sla") or {}
    if sla.get("max_rate") is None:
        raise PlanError(f"报告里没有达标的 SLA 速率（sla.max_rate 为空）：{sla.get('note', '没有 sla 一节')}")
    detail = "单次 SLA 搜索"
    if sla.get("p99_ms") is not None:
        detail += f"；该点 P99 {sla['p99_ms']:.1f} ms"
    if sla.get("avg_batch") is not None:
        detail += f"，平均 batch {sla['avg_batch']:.2f}"
    return SlaFigure(float(sla["max_rate"]), f"sla.max_rate（{detail}）")


def queue_curve(report: dict) -> List[QueuePoint]:
    """SLA 搜索各点的 (吞吐, 各模型平均排队时间之和)，按吞吐排序；没有服务器统计的点跳过。
    重复多次的报告（runs[*].sla）把各次重复的点合在一起。"""
    pts = []
    searches = [report.get("sla")] + [r.get("sla") for r in report.get("runs") or []]
    for p in (q for s in searches if s for q in s.get("points") or []):
        server = p.get("server") or {}
        if p.get("throughput") and server and all("queue_ms" in m for m in server.values()):
            pts.append(QueuePoint(float(p["throughput"]), sum(float(m["queue_ms"]) for m in server.values())))
    return sorted(pts, key=lambda q: q.throughput)


def interpolate_queue_ms(curve: Sequence[QueuePoint], rate: float) -> Tuple[float, Tuple[float, float]]:
    """rate 处的 W_q：两侧点之间线性插值；超出测量范围时取最近端点的值（不外推斜率）。"""
    if rate <= curve[0].throughput:
        return curve[0].queue_ms, (curve[0].throughput, curve[0].throughput)
    for lo, hi in zip(curve, curve[1:]):
        if rate <= hi.throughput:
            t = (rate - lo.throughput) / (hi.throughput - lo.throughput)
            return lo.queue_ms + t * (hi.queue_ms - lo.queue_ms), (lo.throughput, hi.throughput)
    return curve[-1].queue_ms, (curve[-1].throughput, curve[-1].throughput)


def plan(inputs: PlanInputs, report: dict) -> Plan:
    sla = sla_figure(report)
    g = inputs.gpus_per_replica
    capacity = sla.rate * g
    planned = capacity * (1 - inputs.headroom)
    # 减去一个极小量：目标恰好是计划负载的整数倍时不因浮点误差多出一个副本
    replicas = max(1, math.ceil(inputs.target_qps / planned - 1e-9))
    hpa, note = None, ""
    curve = queue_curve(report)
    if curve:
        per_gpu = planned / g
        w, between = interpolate_queue_ms(curve, per_gpu)
        hpa = HpaTarget(value=per_gpu * w / 1000 * g, queue_ms=w, between=between)
    else:
        note = "报告的 sla.points 里没有各模型的排队统计（server.*.queue_ms），算不出 HPA 目标"
    return Plan(inputs=inputs, sla=sla, device=str(report.get("device") or "未记录"),
                slo_ms=report.get("slo_ms"), capacity=capacity, planned_load=planned, replicas=replicas,
                gpus=replicas * g, utilisation=inputs.target_qps / (replicas * capacity), hpa=hpa, hpa_note=note)


def format_plan(p: Plan) -> str:
    i = p.inputs
    slo = f"，SLO P99 ≤ {p.slo_ms:g} ms" if p.slo_ms is not None else ""
    lines = [
        f"报告：{i.report}（{p.device}{slo}）",
        f"每 GPU 的 SLA 速率：{p.sla.rate:.1f} req/s，取自 {p.sla.source}",
        f"目标 {i.target_qps:.1f} req/s，余量 {i.headroom:.2f}，每副本 {i.gpus_per_replica} GPU",
        f"  每副本容量：{p.capacity:.1f} req/s",
        f"  每副本计划负载：{p.planned_load:.1f} req/s（容量 × (1 − {i.headroom:.2f})）",
        f"  副本数：{p.replicas}（⌈{i.target_qps:.1f} / {p.planned_load:.1f}⌉）",
        f"  GPU 数：{p.gpus}",
        f"  目标负载下的利用率：{100 * p.utilisation:.1f} %（相对 SLA 容量；实际余量 {100 * (1 - p.utilisation):.1f} %）",
    ]
    if i.gpus_per_replica > 1:
        lines.append("  注：假设每副本容量与 GPU 数成正比（每块 GPU 一个引擎实例、CPU 同比增加），报告只测了 1 块 GPU")
    if p.hpa is None:
        lines.append(f"HPA 目标：无（{p.hpa_note}）")
    else:
        lo, hi = p.hpa.between
        where = f"在报告的 {lo:.1f} 与 {hi:.1f} req/s 两点间线性插值" if lo != hi else f"取报告 {lo:.1f} req/s 处的值"
        lines += [
            f"HPA 目标（{HPA_METRIC}，每副本平均排队请求数）：{p.hpa.value:.3f}，写作 averageValue: {p.hpa.quantity}",
            f"  = 每副本计划负载 {p.planned_load:.1f} req/s × 各模型平均排队时间之和 {p.hpa.queue_ms:.3f} ms（{where}）/ 1000",
        ]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    try:
        inputs = parse_argv(sys.argv[1:] if argv is None else argv)
        print(format_plan(plan(inputs, load_report(inputs.report))))
        return 0
    except PlanError as e:
        print(f"容量规划失败：{e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
