"""torch 引擎的 fp8：量化 / 反量化与按行缩放的乘积对 float64 参考的误差界，逐层选择（假的计时器），
CPU 与老 GPU 上的明确错误，以及 .pt2 -> 计划 -> 改图的整条路（CPU 上 torch 2.13 的 _scaled_mm 可以运行）。"""
import math
import shutil

import numpy as np
import pytest
import torch

from algorithm.errors import ConfigError, UnsupportedPrecisionError
from algorithm.serving.engines import layer_choice
from algorithm.serving.runtime.engines import torch_fp8 as f8

pytestmark = pytest.mark.skipif(not hasattr(torch, "float8_e4m3fn"), reason="这个 PyTorch 没有 float8_e4m3fn")

# e4m3 有 3 位尾数：正规数的相对舍入误差 <= 2^-4（舍到最近），次正规数的绝对误差 <= 2^-10（乘上缩放）
REL = 2.0 ** -4
SUB = 2.0 ** -10


def _x(m, k, seed=0, spread=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g, dtype=torch.float64)
    if spread:  # 各行的量级相差 6 个数量级：每行自己的缩放才能都保住精度
        x = x * torch.logspace(-3, 3, m, dtype=torch.float64).reshape(-1, 1)
    return x


def test_quantize_rows_round_trip_error_is_within_e4m3_rounding():
    x = _x(33, 96)
    x[7] = 0.0  # 全零行：缩放取下限，量化为 0，不出现 NaN
    q, s = f8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (33, 1) and s.dtype == torch.float32
    back = f8.dequantize(q, s).double()
    assert torch.isfinite(back).all()
    assert torch.equal(back[7], torch.zeros(96, dtype=torch.float64))
    err = (back - x).abs()
    bound = REL * x.abs() + SUB * s.double() + 1e-6 * x.abs()  # 最后一项：缩放本身是 fp32
    assert (err <= bound).all(), float((err - bound).max())
    # 每行的最大值正好落在 ±448（缩放 = amax / 448）
    amax = q.float().abs().amax(dim=1)
    assert torch.allclose(amax[torch.arange(33) != 7], torch.full((32,), f8.FP8_MAX))


def test_quantize_stays_finite_for_huge_values():
    # e4m3fn 没有 inf；超出 448 的值的转换依实现而定（这里的 CPU 版夹到 448），量化自己先夹到 ±448
    q, s = f8.quantize_rows(torch.tensor([[1e30, -1e30, 1.0]]))
    assert torch.isfinite(q.float()).all() and q.float().abs().max() == f8.FP8_MAX


def test_weight_scales_are_per_output_channel_in_scaled_mm_layout():
    w = _x(48, 64, seed=1)
    wq, sw = f8.quantize_weight(w.float())
    assert wq.shape == (48, 64) and sw.shape == (1, 48) and wq.is_contiguous() and sw.is_contiguous()
    expect = w.abs().amax(dim=1) / f8.FP8_MAX
    assert torch.allclose(sw[0].double(), expect, rtol=1e-6)


def _scaled_reference(x, w, b):
    """按同样的量化、在 float64 里做乘积与缩放：_scaled_mm（或其仿真）应只差输出类型的舍入。"""
    xq, sx = f8.quantize_rows(x)
    wq, sw = f8.quantize_weight(w)
    return (xq.double() @ wq.double().t()) * sx.double() * sw.double() + b.double()


# 容差：输出类型的两次舍入（乘积转成输出类型、再加上同类型的 bias），各至多半个 ulp（bf16 2^-8、fp16 2^-11 的相对值）
@pytest.mark.parametrize("out_dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)])
def test_rowwise_scaled_mm_matches_float64(out_dtype, rtol):
    x, w, b = _x(40, 64, seed=2).float(), _x(32, 64, seed=3, spread=False).float() * 0.1, torch.randn(32)
    xq, sx = f8.quantize_rows(x)
    wq, sw = f8.quantize_weight(w)
    y = f8.scaled_mm(xq, sx, wq, sw, b, out_dtype)
    assert y.dtype == out_dtype and y.shape == (40, 32)
    ref = _scaled_reference(x, w, b)
    # 输出类型的舍入（相对该行的量级）+ fp32 累加
    scale = ref.abs().amax(dim=1, keepdim=True)
    assert ((y.double() - ref).abs() <= rtol * scale + 1e-6 * scale).all()


def test_fp8_linear_error_against_float64_linear_is_bounded():
    """整层（量化 x 与 W 再乘）对 float64 的 F.linear：误差来自两次 e4m3 舍入，每项至多 ~2 * 2^-4 的相对误差，
    K 项之和按随机误差约 sqrt(K) 增长；这里要求最坏的元素也在 |x||w| 的 1/8 以内、平均相对误差 < 3 %。"""
    x, w, b = _x(24, 128, seed=4, spread=False).float(), _x(64, 128, seed=5, spread=False).float() * 0.1, torch.randn(64)
    wq, sw = f8.quantize_weight(w)
    y = f8.fp8_linear(x.reshape(2, 12, 128), w, b, wq, sw, 0).reshape(24, 64).double()
    ref = x.double() @ w.double().t() + b.double()
    mag = x.double().abs() @ w.double().abs().t()
    assert ((y - ref).abs() <= mag / 8).all()
    assert float(((y - ref).abs() / mag).mean()) < 0.03
    # 行数少于门槛：原精度的 F.linear，逐位相同
    same = f8.fp8_linear(x, w, b, wq, sw, 25)
    assert torch.equal(same, torch.nn.functional.linear(x, w, b))


def test_unsupported_reason_names_cpu_and_old_gpus():
    assert "cpu" in f8.unsupported_reason("cpu")
    old = f8.unsupported_reason("cuda", (8, 0))
    assert "8.0" in old and "Hopper" in old
    assert f8.unsupported_reason("cuda", (9, 0)) is None
    assert f8.unsupported_reason("cuda", (8, 9)) is None  # Ada 有 fp8 张量核（没有测过速度）


def test_fp8_build_on_cpu_raises_a_named_error_that_says_what_to_use(tmp_path):
    from conftest import tiny_config

    from algorithm.serving.config import EngineConfig, ExportConfig
    from algorithm.serving.engines import resolve_auto
    from algorithm.serving.engines.torch import check_fp8_device

    with pytest.raises(UnsupportedPrecisionError, match="Hopper") as e:
        check_fp8_device("cpu")
    assert "precision=fp16" in str(e.value) and isinstance(e.value, ConfigError)
    with pytest.raises(UnsupportedPrecisionError, match="compute capability 是 8.0"):
        check_fp8_device("cuda", (8, 0))
    cfg = tiny_config(str(tmp_path), export=ExportConfig(precision="fp8", max_batch_size=16, max_seq_length=256),
                      engine=EngineConfig(kind="auto"))
    if not torch.cuda.is_available():
        with pytest.raises(UnsupportedPrecisionError, match="onnxruntime"):
            resolve_auto(cfg)
        # engine=torch：构建的第一步（resolve_auto，在训练与导出之前）就拒绝
        with pytest.raises(UnsupportedPrecisionError, match="设备是 cpu"):
            resolve_auto(tiny_config(str(tmp_path), export=ExportConfig(precision="fp8", max_batch_size=16,
                                                                        max_seq_length=256),
                                     engine=EngineConfig(kind="torch")))
    with pytest.raises(ConfigError, match="engine.kind=torch"):
        tiny_config(str(tmp_path), export=ExportConfig(precision="fp8", max_batch_size=16, max_seq_length=256),
                    engine=EngineConfig(kind="onnxruntime"))


# ---------------------------------------------------------------- 逐层选择
def test_choose_min_rows_takes_the_smallest_row_count_from_which_8bit_always_wins():
    t = {2: (1.0, 2.0), 64: (1.0, 1.1), 512: (2.0, 1.5), 4096: (10.0, 6.0)}
    assert layer_choice.choose_min_rows(t, 1.05) == 512
    assert layer_choice.choose_min_rows(t, 1.5) == 4096
    assert layer_choice.choose_min_rows(t, 2.0) is None
    # 中间有一个不够快的行数：门槛在它之上（假设不了“更小的行数也快”）
    assert layer_choice.choose_min_rows({8: (2.0, 1.0), 16: (1.0, 1.0), 32: (2.0, 1.0)}, 1.05) == 32
    assert layer_choice.choose_min_rows({8: (1.0, math.inf)}, 1.0) is None


def _fake_timer(calls):
    """原精度：与乘加数成正比；fp8：乘加快一倍，但每次多 2 µs 的量化与发射——大矩阵乘 fp8 快，小的慢。"""
    def timer(prec, m, k, n):
        calls.append((prec, m, k, n))
        flops = m * k * n * 1e-15  # 1 PFLOP/s 量级的乘加时间（秒）
        if prec == "base":
            return 1e-6 + flops
        if n == 48:  # 这个形状 8 位跑不了
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")
        return 3e-6 + flops / 2
    return timer


def test_choose_layers_with_a_fake_timer():
    shapes = {"enc.fc1.weight": {"k": 768, "n": 3072, "rows": [256, 8192, 65536]},
              "enc.fc2.weight": {"k": 3072, "n": 768, "rows": [256, 8192, 65536]},
              "dec.q.weight": {"k": 768, "n": 768, "rows": [2, 16]},
              "odd.weight": {"k": 64, "n": 48, "rows": [65536]}}
    calls = []
    lines = []
    plan, report = layer_choice.choose_layers(shapes, _fake_timer(calls), min_speedup=1.05, log=lines.append)
    # 768x3072：256 行 = 0.6 µs 的乘加，fp8 的 2 µs 开销不划算；8192 行起划算
    assert plan["layers"]["enc.fc1.weight"]["min_rows"] == 8192
    assert plan["layers"]["enc.fc2.weight"]["min_rows"] == 8192
    assert plan["layers"]["dec.q.weight"]["min_rows"] is None  # 解码器的小矩阵乘保持原精度
    assert plan["layers"]["odd.weight"]["min_rows"] is None  # 8 位出错的形状不选
    assert report["quantized_layers"] == 2 and report["layers_total"] == 4
    assert any("RuntimeError" in v for v in report["timer_errors"].values())
    assert report["layers"]["enc.fc1.weight"]["precision"] == "fp8 (行数 >= 8192)"
    assert report["layers"]["enc.fc1.weight"]["timings_us"]["65536"][1] < report["layers"]["enc.fc1.weight"]["timings_us"]["65536"][0]
    assert report["linear_speedup_estimate"] > 1.0
    # 同一 (精度, 行数, K, N) 只计时一次；最大的乘积先计时
    assert len(calls) == len(set(calls))
    assert calls[0][1] == 65536
    assert any("2/4 层量化" in s for s in lines)


def test_choose_layers_keeps_everything_when_8bit_is_never_faster():
    slow = lambda prec, m, k, n: 1.0 if prec == "base" else 1.01  # noqa: E731
    plan, report = layer_choice.choose_layers({"a.weight": {"k": 16, "n": 16, "rows": [4, 8]}}, slow)
    assert plan["layers"]["a.weight"]["min_rows"] is None and report["quantized_layers"] == 0
    assert report["linear_speedup_estimate"] == pytest.approx(1.0)


# ---------------------------------------------------------------- .pt2 -> 计划 -> 改图
def test_plan_is_stored_in_the_pt2_and_applied_to_the_loaded_program(tmp_path):
    """CPU 上的整条路：ugt_tiny 按 fp32 导出，记下各桶的行数、用假的计时器选层、计划写进 .pt2，
    运行器按计划改图（只换被选中的层），输出与 fp32 程序接近。"""
    from conftest import tiny_config

    from algorithm.models.catalog import synthetic_catalog
    from algorithm.models.ugt import build_model
    from algorithm.serving.config import EngineConfig, ExportConfig, TritonConfig
    from algorithm.serving.engines.torch import export_program, plan_fp8
    from algorithm.serving.runtime.engines.torch import TorchRunner, _spec_transform

    cfg = tiny_config(str(tmp_path), export=ExportConfig(precision="fp8", max_batch_size=4, max_seq_length=32),
                      engine=EngineConfig(kind="torch", device="cpu", compile_mode="none", cuda_graphs=False,
                                          batch_buckets=[2, 4], seq_buckets=[16, 32]),
                      triton=TritonConfig(instance_count=1, preferred_batch_sizes=[2, 4]))
    model = build_model(cfg.model, seed=0).eval()
    model.attach_catalog(synthetic_catalog(3000, cfg.model.codebook_sizes, seed=3).semantic_ids)
    path = export_program(model, str(tmp_path / "m.pt2"), "fp32", 4, 32)
    ref_path = str(tmp_path / "ref.pt2")
    shutil.copy(path, ref_path)  # 同一个程序，没有计划
    calls = []

    def timer(prec, m, k, n):  # 只有宽的层（一边是 128：FFN 与 kv 投影）在 64 行起 fp8 快，d_model x d_model 的层慢
        calls.append(m)
        return 1.0 if prec == "base" else (0.5 if 128 in (k, n) and m >= 64 else 2.0)

    plan, report = plan_fp8(path, cfg, "cpu", timer=timer)
    assert f8.read_plan(path) == plan  # 计划在 .pt2 里，不加载程序就能读出
    chosen = sorted(n for n, e in plan["layers"].items() if e["min_rows"] is not None)
    assert chosen and len(chosen) < len(plan["layers"])
    assert all(not n.startswith("heads") for n in plan["layers"])  # 打分头不在候选里
    assert report["buckets_run"] == 4 and report["quantizer"] == "eager"

    spec = type("Spec", (), {"precision": "fp8", "int8_mode": "auto"})()
    runner = TorchRunner.load(path, cfg.contract(), "cpu", compile_mode="none", transform=_spec_transform(path, spec))
    assert f8.quantized_layers(runner.module) == chosen
    ref = TorchRunner.load(ref_path, cfg.contract(), "cpu", compile_mode="none")
    feeds = cfg.contract().random_inputs(4, 32, np.random.default_rng(1), lengths=np.array([32, 20, 9, 1]))
    (rec, scores), (rrec, rscores) = runner.run(feeds), ref.run(feeds)
    assert rec.shape == rrec.shape and np.isfinite(scores).all()
    assert float(np.abs(scores - rscores).max()) < 0.5  # 未训练的模型，分数是几个对数概率之和（量级约 -20）


def test_apply_plan_rejects_a_plan_for_another_program(tmp_path):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.fc(x)

    ep = torch.export.export(M(), (torch.randn(4, 32),))
    gm = ep.module()
    assert [name for _, name in f8.linear_nodes(gm)] == ["fc.weight"]
    with pytest.raises(ConfigError, match="找不到"):
        f8.apply_plan(gm, {"layers": {"other.weight": {"min_rows": 0}}})
    torch.export.save(ep, str(tmp_path / "plain.pt2"))
    with pytest.raises(ConfigError, match="没有 fp8 计划"):
        f8.read_plan(str(tmp_path / "plain.pt2"))
    x = torch.randn(4, 32)
    want = gm(x)
    f8.apply_plan(gm, {"layers": {"fc.weight": {"min_rows": 0}}})
    assert f8.quantized_layers(gm) == ["fc.weight"]
    got = gm(x)
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=0.1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="需要 CUDA GPU")
def test_fused_row_quantizer_matches_eager_on_gpu():
    if f8.unsupported_reason("cuda"):
        pytest.skip(f8.unsupported_reason("cuda"))
    fn, name = f8.row_quantizer("cuda")
    x = (torch.randn(300, 3072, device="cuda") * 3).to(torch.bfloat16)
    q, s = fn(x)
    rq, rs = f8.quantize_rows(x)
    assert torch.allclose(s, rs, rtol=1e-6)
    d = (f8.dequantize(q, s) - f8.dequantize(rq, rs)).abs()
    assert (d <= f8.dequantize(rq, rs).abs() / 8 + rs * 2 ** -9).all(), name


def test_scoring_heads_stay_out_of_8bit_when_the_model_is_wrapped(tmp_path):
    """拼行导出把模型包在 PackedUGT.model 里（权重名 model.heads.N.weight）：打分头仍不是 fp8 候选，int8 也不量化它。"""
    from conftest import tiny_config

    from algorithm.models.ugt import build_model
    from algorithm.serving.engines.torch import export_program
    from algorithm.serving.runtime.engines import torch_int8

    cfg = tiny_config(str(tmp_path))
    model = build_model(cfg.model, seed=0).eval()
    path = export_program(model, str(tmp_path / "packed.pt2"), "fp32", 4, 32, packed=True)
    gm = torch.export.load(path).module()
    names = [name for _, name in f8.linear_nodes(gm)]
    assert names and not [n for n in names if ".heads." in f".{n}"]
    heads = [n for n in torch_int8.linear_weight_names(gm) if "heads" in n]
    assert heads and all(n.startswith("model.heads.") for n in heads)  # 确实包了一层
    assert all(torch_int8._keep(n.rsplit(".", 1)[0]) for n in heads)
    assert not f8.keep_module("model.encoder.layers.0.linear1", f8.KEEP_PREFIXES)
    assert not f8.keep_module("model.headsx.0", f8.KEEP_PREFIXES)
