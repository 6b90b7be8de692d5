#!/usr/bin/env bash
# GPU 机器上的测量（本项目在 H100 上用它得到 benchmarks/ 下的结果）。分阶段运行，每阶段一条命令：
#   bash scripts/gpu_bench.sh setup      # 用 .carry/ 中带来的 wheel 建环境（numpy<2，见 server.check_numpy）
#   bash scripts/gpu_bench.sh build      # ugt_base / torch 引擎 / fp16：训练、torch.export、编译 + CUDA Graph、门禁
#   bash scripts/gpu_bench.sh bench      # 内嵌 Triton 上的 SLA 搜索、闭环扫描、perf_analyzer、引擎离线吞吐
#   bash scripts/gpu_bench.sh baseline   # 朴素基线：eager fp32，无编译、无 CUDA Graph，同样的压测
#   bash scripts/gpu_bench.sh tuned      # 同一引擎，前/后处理各 4 个实例、引擎 2 个实例（CPU 侧是瓶颈时）
#   bash scripts/gpu_bench.sh aoti       # AOTInductor 与 torch.compile + CUDA Graph 的对照（scripts/aoti_probe.py）
# 结果写到 $OUT（device 工具带回）或 benchmarks/out。
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${1:?用法：gpu_bench.sh setup|build|bench|baseline}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
VENV=/tmp/ugtvenv
PY=$VENV/bin/python
export UGT_TRITON_SITE=/tmp/ugt-triton PYTHONUNBUFFERED=1
BASE_SITE=${BASE_SITE:-/opt/torch/.venv/lib/python3.12/site-packages}
# perf_analyzer 的可执行文件由 pip --target 装在 <site>/bin
[ -x $PY ] && export PATH="$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/bin:$PATH"

COMMON=(model=ugt_base "export.validation_shapes=[[1,5],[7,37],[16,256]]"
        server.startup_timeout_s=900 triton.instance_count=1 "triton.preferred_batch_sizes=[8,16,32,64]"
        triton.max_queue_delay_us=2000 "engine.batch_buckets=[2,8,16,32,64]" "engine.seq_buckets=[128,256,512,1024]")
# MFU 的峰值：H100 SXM 稠密 fp16 989 TFLOP/s、fp32（非 TF32）67 TFLOP/s（NVIDIA 规格书）
BENCH=(benchmark.processes=4 "benchmark.concurrency=[1,8,32,64]" benchmark.duration_s=4 benchmark.min_requests=300
       benchmark.sla_start_rate=50 benchmark.sla_steps=3 benchmark.warmup_requests=100)

case "$STAGE" in
  setup)
    if [ -x $PY ] && [ -d "$UGT_TRITON_SITE" ]; then echo "环境已在 $VENV"; exit 0; fi
    python3 -m venv --without-pip "$VENV"
    SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .carry/whl/*.whl
    cp -r .carry/py/* "$SITE"/
    echo "$BASE_SITE" > "$SITE/zz_base_site.pth"   # torch 等来自镜像；排在本环境的 numpy<2 之后
    mkdir -p "$UGT_TRITON_SITE" && tar -xJf .carry/triton312.tar.xz -C "$UGT_TRITON_SITE"
    $PY -c 'import numpy, torch, onnxruntime, tritonclient, hydra; print("numpy", numpy.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0))'
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    ;;
  build)
    $PY scripts/build.py "${COMMON[@]}" build_dir=build/gpu engine=torch precision=fp16 2>&1 | tee "$OUT/build_torch_fp16.log"
    cp build/gpu/model_repository/build_info.json "$OUT/build_info_torch_fp16.json"
    ;;
  bench)
    $PY scripts/benchmark.py "${COMMON[@]}" build_dir=build/gpu engine=torch precision=fp16 "${BENCH[@]}" benchmark.perf_analyzer=true benchmark.peak_tflops=989 \
        benchmark.output_dir=build/gpu/bench_torch_fp16 2>&1 | tee "$OUT/bench_torch_fp16.log"
    cp build/gpu/bench_torch_fp16/benchmark.{json,png,csv} "$OUT/"
    ;;
  baseline)
    # 另一个构建目录（不覆盖 fp16 的仓库）；同一检查点（若 build 阶段已在这台机器上训练过）
    CK=(); [ -f build/gpu/checkpoints/ugt_base.pt ] && CK=(checkpoint=build/gpu/checkpoints/ugt_base.pt)
    $PY scripts/build.py "${COMMON[@]}" build_dir=build/gpu_eager "${CK[@]}" engine=torch precision=fp32 \
        engine.compile_mode=none engine.cuda_graphs=false 2>&1 | tee "$OUT/build_eager_fp32.log"
    $PY scripts/benchmark.py "${COMMON[@]}" build_dir=build/gpu_eager "${CK[@]}" engine=torch precision=fp32 engine.compile_mode=none engine.cuda_graphs=false \
        "${BENCH[@]}" benchmark.peak_tflops=67 benchmark.output_dir=build/gpu_eager/bench 2>&1 | tee "$OUT/bench_eager_fp32.log"
    for f in json png; do cp build/gpu_eager/bench/benchmark.$f "$OUT/baseline.$f"; done
    ;;
  tuned)
    $PY scripts/benchmark.py "${COMMON[@]}" build_dir=build/gpu engine=torch precision=fp16 "${BENCH[@]}" benchmark.peak_tflops=989 \
        triton.preprocess_instance_count=4 triton.postprocess_instance_count=4 triton.instance_count=2 \
        benchmark.output_dir=build/gpu/bench_tuned 2>&1 | tee "$OUT/bench_tuned.log"
    for f in json png; do cp build/gpu/bench_tuned/benchmark.$f "$OUT/tuned.$f"; done
    ;;
  aoti)
    $PY scripts/aoti_probe.py ${AOTI_REPO:-build/gpu/model_repository} "$OUT/aoti_vs_compile.json" 2>&1 | tee "$OUT/aoti.log"
    ;;
  *) echo "未知阶段 $STAGE" >&2; exit 2 ;;
esac
