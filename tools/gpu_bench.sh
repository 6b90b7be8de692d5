#!/usr/bin/env bash
# GPU 机器上的测量（benchmarks/ 下的 GPU 结果由它得到）。分阶段运行，结果写到 $OUT（device 工具带回）。
# 环境不 pip install 本包：下面导出 PYTHONPATH=仓库根目录，scripts/ 与 tools/ 的 Python 文件都能 import algorithm。
#   bash tools/gpu_bench.sh setup      # 用 .carry/（tools/make_carry.sh 生成）建环境（numpy<2，见 server.check_numpy）
#   bash tools/gpu_bench.sh gputest    # pytest -m gpu（.carry/test 的 pytest wheel）：CUDA Graph、各长度组同时重放等与参考一致
#   bash tools/gpu_bench.sh build      # ugt_base / torch 引擎 / fp16：训练、torch.export、编译 + CUDA Graph、门禁
#   bash tools/gpu_bench.sh oldbuild   # 旧的服务路径（.carry/old.tar.xz = make_carry.sh 的 UGT_OLD_COMMIT）用同一检查点构建
#   bash tools/gpu_bench.sh profile    # 引擎剖析（python -m algorithm.serving.profile，不含 int8）；PROFILE_ARGS 追加参数
#   bash tools/gpu_bench.sh profile_variants # 同样剖析 sweep 按产物选项构建的变体（$G/new/variants/*）
#   bash tools/gpu_bench.sh int8       # int8 两种方式各一个限时的进程（只测 fp16 与 int8 的离线吞吐与门禁）
#   bash tools/gpu_bench.sh fp8        # 同一次运行：ugt_base 按 fp16、fp8、int8（FP8_PRECISIONS）各构建一次（门禁、fp8 的逐层选择与速度检查），
#                                        # 再在一个进程里测三者的离线吞吐 b8/16/64 各 3 轮（tools/precision_bench.py）与 fp8 线性层的内核名
#   bash tools/gpu_bench.sh int8mm     # 单个线性层：fp16、int8 两种权重布局、fp8、编译的 int8 各自多快、用哪个内核（tools/int8_gemm_probe.py）
#   bash tools/gpu_bench.sh profile_old # 同一剖析脚本对旧路径的仓库（旧代码导出的 .pt2，新运行器）：同一运行里的引擎对照
#   bash tools/gpu_bench.sh bench_old  # 旧路径的服务器 + 新的压测工具（benchmark.url），3 次重复
#   bash tools/gpu_bench.sh bench_new  # 新路径，同样的 Triton 设置与压测，3 次重复，含地板、追踪、离线吞吐
#   bash tools/gpu_bench.sh floor      # ../shared/probes/python-backend-floor（拷在 .carry/probe）的 4/2 实例配置
#   bash tools/gpu_bench.sh sweep      # Triton 设置的 multirun（SWEEP 覆盖；每组 SWEEP_REPEATS 次，默认 1），一张汇总表
#   bash tools/gpu_bench.sh sweep_mps  # 同一 multirun（SWEEP_MPS 覆盖，默认同 SWEEP），加 server.mps=true（CUDA MPS：几个引擎实例的内核同时在 GPU 上跑），结果在 $G/sweep_mps
#   bash tools/gpu_bench.sh soak       # 生产设置：SLA 搜索 1 次，再以其 70% 浸泡 10 分钟，再 2 倍过载 60 s
#   bash tools/gpu_bench.sh overload   # 默认的过载丢弃：SLA 搜索、c=64/128 闭环与 2 倍过载（OVERLOAD_S 秒，默认 60）
#   bash tools/gpu_bench.sh overload_timeout # 同上，对照以前的默认：不按容量丢弃、引擎排队超时 OVERLOAD_QT_US（默认 15000）
#   bash tools/gpu_bench.sh own_model  # 示例的“团队自己的模型”（examples/pooled_cnn，model.source=module）：torch 引擎 fp16 构建、门禁、压测 3 次
# 一整轮超过 device 工具单次调用的 10 分钟：用 tools/gpu_campaign.sh 在后台按序运行多个阶段。
# 构建产物在 /tmp/gpubuild（不在带来的目录里，同一台机器热着时各阶段复用）。
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
STAGE=${1:?用法：gpu_bench.sh setup|gputest|build|oldbuild|profile|profile_variants|int8|fp8|int8mm|profile_old|bench_old|bench_new|floor|sweep|sweep_mps|soak|overload|overload_timeout|own_model}
OUT=${OUT:-benchmarks/out}
mkdir -p "$OUT"
VENV=/tmp/ugtvenv
PY=$VENV/bin/python
G=/tmp/gpubuild
export UGT_TRITON_SITE=/tmp/ugt-triton PYTHONUNBUFFERED=1
BASE_SITE=${BASE_SITE:-/opt/torch/.venv/lib/python3.12/site-packages}

# 模型与引擎（新旧两条路径共用）；MFU 的峰值：H100 SXM 稠密 fp16 989 TFLOP/s
# batch 桶：新路径用 NEW_BUCKETS（= 现在配置的默认，含 4），旧路径用 OLD_BUCKETS（= 旧提交 UGT_OLD_COMMIT 的默认；换提交时按它改）；
# 压测命令用新路径的设置（它只从构建里读工作负载，旧服务器经 benchmark.url 访问）
NEW_BUCKETS=${NEW_BUCKETS:-[2,4,8,16,32,64]}
OLD_BUCKETS=${OLD_BUCKETS:-[2,8,16,32,64]}
BASE=(model=ugt_base "export.validation_shapes=[[1,5],[7,37],[16,256]]" server.startup_timeout_s=900
      engine=torch precision=fp16 "engine.seq_buckets=[128,256,512,1024]")
COMMON=("${BASE[@]}" "engine.batch_buckets=$NEW_BUCKETS")
COMMON_OLD=("${BASE[@]}" "engine.batch_buckets=$OLD_BUCKETS")
# Triton 设置：conf/triton/h100.yaml（引擎 2 实例、前/后处理各 4 实例、preferred [8,16,32,64]、500 µs、引擎流水线 2 层），新旧路径相同（旧代码没有流水线），
# 差别只在代码；ENGINE_INSTANCES / QUEUE_DELAY_US 覆盖其中两项
TRITON=(triton=h100 ${ENGINE_INSTANCES:+triton.instance_count=$ENGINE_INSTANCES} ${QUEUE_DELAY_US:+triton.max_queue_delay_us=$QUEUE_DELAY_US})
# 旧提交的代码（/tmp/old）没有 conf/triton/h100.yaml：同样的设置逐项给出
TRITON_OLD=(triton.instance_count=${ENGINE_INSTANCES:-2} triton.preprocess_instance_count=4 triton.postprocess_instance_count=4
            "triton.preferred_batch_sizes=[8,16,32,64]" triton.max_queue_delay_us=${QUEUE_DELAY_US:-500})
# 压测：每点至少 10,000 个请求或 5 s（不足 10,000 时报告 P99 的置信区间），3 次重复
BENCH=(benchmark.processes=4 "benchmark.concurrency=[1,8,64]" benchmark.duration_s=3 benchmark.min_requests=10000
       benchmark.max_point_s=5 benchmark.sla_start_rate=${SLA_START:-500} benchmark.sla_steps=3 benchmark.warmup_requests=200
       benchmark.light_rate=50 benchmark.light_duration_s=10 benchmark.repeats=${REPEATS:-3} benchmark.peak_tflops=989
       benchmark.trace_rate=10)

# 浸泡与过载共用：生产设置、1 次 SLA 搜索（不测闭环、地板与离线），再 overload_s 秒的 2 倍过载；报告在 $G/bench_<名字>
reliability() {
  local name=$1; shift
  $PY scripts/benchmark.py "${COMMON[@]}" "${TRITON[@]}" build_dir=$G/new "${BENCH[@]}" benchmark.repeats=1 \
      "benchmark.concurrency=[]" benchmark.floor=false benchmark.offline_samples=0 benchmark.trace_rate=0 \
      benchmark.overload_s=${OVERLOAD_S:-60} benchmark.output_dir=$G/bench_$name "$@" ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/$name.log"
}

# 剖析一个仓库（不含 int8，它在 int8 阶段各方式各自限时）：profile_repo 仓库 名字 [限时秒数]，报告在 $G/名字，日志 $OUT/名字.log
profile_repo() {
  timeout "${3:-240}" $PY -m algorithm.serving.profile --repo "$1" --out "$G/$2" --no-int8 \
      ${PROFILE_ARGS:-} 2>&1 | tee "$OUT/$2.log" || true
}

# 剖析与 int8 用的已构建仓库：build 阶段写的 $G/new/model_repository；只跑过 sweep 时（它按产物选项构建到
# $G/new/variants/*）取唯一的变体；PROFILE_REPO 可直接指定
built_repo() {
  if [ -n "${PROFILE_REPO:-}" ]; then echo "$PROFILE_REPO"; return; fi
  if [ -f $G/new/model_repository/ugt_engine/config.pbtxt ]; then echo $G/new/model_repository; return; fi
  local v=() r
  for r in $G/new/variants/*/model_repository; do [ -f "$r/ugt_engine/config.pbtxt" ] && v+=("$r"); done
  if [ ${#v[@]} -eq 1 ]; then echo "${v[0]}"; return; fi
  echo "找不到要剖析的仓库：$G/new/model_repository 不存在，$G/new/variants 下有 ${#v[@]} 个构建好的变体" \
       "（先跑 build 阶段，或用 PROFILE_REPO=… 指定）" >&2
  return 1
}

case "$STAGE" in
  setup)
    # .carry/ 由 tools/make_carry.sh 生成：site312.tar.xz（numpy<2、tritonclient[grpc]、hydra、torchao 等解开的 wheel）、
    # triton312.tar.xz（tritonserver、python backend、3.12 stub、nvidia_pytriton.libs）、MANIFEST.txt。
    # 环境与 .carry 一致（MANIFEST 的 sha256 相同）时不重建，只重新打印版本。
    [ -f .carry/MANIFEST.txt ] || { echo "缺少 .carry/：先在有网络的机器上运行 bash tools/make_carry.sh" >&2; exit 1; }
    STAMP=$(sha256sum .carry/MANIFEST.txt | cut -c1-64)
    if [ -x $PY ] && [ "$(cat "$VENV/.carry-stamp" 2>/dev/null)" = "$STAMP" ] && [ -x "$UGT_TRITON_SITE/pytriton/tritonserver/bin/tritonserver" ]; then
      echo "环境已在 $VENV（与 .carry 一致）"
    else
      rm -rf "$VENV" "$UGT_TRITON_SITE"
      python3 -m venv --without-pip "$VENV"
      # 带来的二进制都是 cp312 的：解释器必须是 3.12
      $PY -c 'import sys; assert sys.version_info[:2] == (3, 12), f"需要 Python 3.12，python3 是 {sys.version}"'
      SITE=$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
      tar -xJf .carry/site312.tar.xz -C "$SITE"
      echo "$BASE_SITE" > "$SITE/zz_base_site.pth"   # torch 等来自镜像；排在本环境的 numpy<2 之后
      mkdir -p "$UGT_TRITON_SITE" && tar -xJf .carry/triton312.tar.xz -C "$UGT_TRITON_SITE"
      # tar 里已是 755；这里再设一次，防止解包时的 umask 或旧 tar 丢掉可执行位
      chmod 755 "$UGT_TRITON_SITE/pytriton/tritonserver/bin/tritonserver" \
                "$UGT_TRITON_SITE/pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"
      echo "$STAMP" > "$VENV/.carry-stamp"
    fi
    # 必需的导入失败则本阶段失败；torchao 只打印失败原因（int8 的 Python 路径不依赖它的 C++ 扩展）
    $PY - <<'PYEOF'
import importlib.metadata as md
import sys

import numpy
assert int(numpy.__version__.split(".")[0]) < 2, f"numpy {numpy.__file__} 是 {numpy.__version__}：.pth 的顺序不对"
import torch
import tritonclient.grpc
import tritonclient.grpc.aio
from tritonclient.grpc import model_config_pb2  # noqa: F401  （protobuf 运行时须 >= 生成码的 6.33.5）
import google.protobuf
import grpc
import onnxruntime
from hydra.core.override_parser.overrides_parser import OverridesParser

OverridesParser.create().parse_overrides(["a=1"])  # 经 antlr4 解析命令行覆盖
print("python", sys.version.split()[0], sys.executable)
print("numpy", numpy.__version__, numpy.__file__)
print("torch", torch.__version__, "cuda", torch.version.cuda)
print("tritonclient", md.version("tritonclient"), "grpcio", grpc.__version__, "protobuf", google.protobuf.__version__,
      "hydra", md.version("hydra-core"), "onnxruntime", onnxruntime.__version__)
try:
    import torchao
except Exception as e:  # noqa: BLE001
    print("torchao 导入失败：", f"{type(e).__name__}: {e}")
else:
    # C++ 扩展（_C*.so）加载失败时 torchao 只打警告：看它们是否真的映射进了本进程
    with open("/proc/self/maps") as f:
        so = sorted({l.rsplit("/", 1)[-1].strip() for l in f if "/torchao/_C" in l})
    print("torchao", torchao.__version__, "C++ 扩展：", ", ".join(so) or "未加载（只有 Python 实现可用）")
try:
    import matplotlib

    print("matplotlib", matplotlib.__version__, matplotlib.__file__)
except ImportError as e:
    print("没有 matplotlib（压测不画 benchmark.png）：", e)
print("GPU", torch.cuda.get_device_name(0))
PYEOF
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    # 同型号的机器之间也会差很多：整份设备状态（时钟、功耗上限、ECC、MIG、计算模式、
    # 型号 SXM / NVL）与此刻 GPU 上的进程，留在 $OUT 里备查
    nvidia-smi -q > "$OUT/nvidia_smi_q.txt" 2>&1 || true
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv > "$OUT/gpu_processes_at_setup.csv" 2>&1 || true
    ;;
  build)
    $PY scripts/build.py "${COMMON[@]}" "${TRITON[@]}" build_dir=$G/new 2>&1 | tee "$OUT/build_new.log"
    cp $G/new/model_repository/build_info.json "$OUT/build_info_new.json"
    ;;
  oldbuild)
    rm -rf /tmp/old && mkdir -p /tmp/old && tar -xJf .carry/old.tar.xz -C /tmp/old
    (cd /tmp/old && PYTHONPATH=/tmp/old $PY scripts/build.py "${COMMON_OLD[@]}" "${TRITON_OLD[@]}" build_dir=$G/old \
        checkpoint=$G/new/checkpoints/ugt_base.pt 2>&1 | tee "$OUT/build_old.log")
    ;;
  profile)
    REPO=$(built_repo) || exit 1
    profile_repo "$REPO" profile
    ;;
  profile_variants)
    # 压测的 multirun 按产物选项构建的变体（$G/new/variants/*，例如 SWEEP='export.decoder_kv_cache=false,true' 的 false）
    # 逐个剖析：与 profile 阶段同样的参数，同一台机器上的引擎对照
    for r in $G/new/variants/*/model_repository; do
      [ -d "$r" ] || { echo "没有构建变体（$G/new/variants 为空）" >&2; exit 1; }
      profile_repo "$r" "profile_$(basename "$(dirname "$r")")"
    done
    ;;
  int8)
    # int8（torchao）单独测：每种方式一个进程、各自限时（INT8_TIMEOUT，整数秒；编译可能几分钟都编不完）。
    # INT8_COMPILE_MODE=none 测 eager（+ CUDA Graph），fp16 基线也用同一编译模式。INT8_MODES 用空格或逗号分隔；
    # TORCH_LOGS=recompiles 记下重新编译的原因。底本默认与构建相同（GPU 上 bf16：fp16 会溢出），INT8_BASE 可改
    MODES=${INT8_MODES:-weight_only dynamic}
    REPO=$(built_repo) || exit 1
    for m in ${MODES//,/ }; do
      CM=()
      [ -n "${INT8_COMPILE_MODE:-}" ] && CM=(--compile-mode "$INT8_COMPILE_MODE")
      [ -n "${INT8_BASE:-}" ] && CM+=(--int8-base "$INT8_BASE")
      rc=0
      TORCH_LOGS=recompiles timeout -k 10 ${INT8_TIMEOUT:-240} $PY -m algorithm.serving.profile --repo "$REPO" \
          --out $G/profile_int8_$m${INT8_COMPILE_MODE:+_$INT8_COMPILE_MODE} --only throughput,int8 --int8-modes $m \
          --batches ${INT8_BATCHES:-16,64} ${CM[@]+"${CM[@]}"} --budget-s $(( ${INT8_TIMEOUT:-240} - 10 )) 2>&1 | tee "$OUT/profile_int8_$m.log" || rc=$?
      echo "int8 $m：退出码 $rc（124 = 超时）" | tee -a "$OUT/profile_int8_$m.log"
    done
    ;;
  fp8)
    # 每个精度一个构建目录（$G/fp8/<精度>），共用一个检查点（先建的 fp16 训练它；build 阶段的 $G/new 里有就用那个）与一个
    # 编译缓存（fp8 / int8 构建的速度检查要再建一个 fp16 对照引擎，缓存是热的）。一个精度构建失败（例如 fp8 在不是 Hopper 的
    # GPU 上报 UnsupportedPrecisionError）只记下原因，接着建下一个、测建好的。int8 的构建不做速度检查（本阶段的对照里有它），
    # FP8_BUILD_EXTRA 追加覆盖（例如 engine.layer_choice_min_speedup=1.1 或 engine.fp8_layers=all）
    D=$G/fp8; mkdir -p $D
    ARGS=(); for a in "${COMMON[@]}"; do [[ $a == precision=* ]] || ARGS+=("$a"); done
    CK=$G/new/checkpoints/ugt_base.pt; [ -f "$CK" ] || CK=$D/fp16/checkpoints/ugt_base.pt
    REPOS=()
    for p in ${FP8_PRECISIONS:-fp16 fp8 int8}; do
      EXTRA=(); if [ "$p" = int8 ]; then EXTRA=(engine.speed_check=off); fi
      if [ -f "$CK" ]; then EXTRA+=(checkpoint=$CK); fi
      rc=0
      timeout -k 10 ${FP8_BUILD_TIMEOUT:-420} $PY scripts/build.py "${ARGS[@]}" "${TRITON[@]}" precision=$p build_dir=$D/$p \
          engine.compile_cache_dir=$D/compile_cache ${EXTRA[@]+"${EXTRA[@]}"} ${FP8_BUILD_EXTRA:-} 2>&1 | tee "$OUT/fp8_build_$p.log" || rc=$?
      echo "构建 $p：退出码 $rc（124 = 超时）" | tee -a "$OUT/fp8_build_$p.log"
      if [ $rc -eq 0 ] && [ -f $D/$p/model_repository/build_info.json ]; then
        cp $D/$p/model_repository/build_info.json "$OUT/build_info_$p.json"
        REPOS+=(--repo $p=$D/$p/model_repository)
      else
        grep -E "Error|错误|不能构建" "$OUT/fp8_build_$p.log" | tail -3 || true
      fi
    done
    grep -h -E "逐层选择|fp8 计划|速度检查|警告" "$OUT"/fp8_build_*.log || true
    if [ ${#REPOS[@]} -gt 0 ]; then
      timeout -k 10 ${FP8_BENCH_TIMEOUT:-300} $PY tools/precision_bench.py "${REPOS[@]}" --out "$OUT/fp8" \
          --batches ${FP8_BATCHES:-8,16,64} --rounds ${FP8_ROUNDS:-3} 2>&1 | tee "$OUT/fp8_bench.log" || echo "precision_bench：退出码 $?"
    else
      echo "没有建好的仓库可测" | tee "$OUT/fp8_bench.log"
    fi
    ;;
  int8mm)
    # 不需要构建：随机张量、ugt_base 的线性层形状；结果 $OUT/int8mm/int8_gemm_probe.json
    timeout -k 10 ${INT8MM_TIMEOUT:-240} $PY tools/int8_gemm_probe.py --out "$OUT/int8mm" --budget-s $(( ${INT8MM_TIMEOUT:-240} - 60 )) 2>&1 | tee "$OUT/int8mm.log"
    ;;
  profile_old)
    profile_repo $G/old/model_repository profile_old 200
    ;;
  sweep|sweep_mps)
    SWEEP_DIR=$G/$STAGE
    SWEEP_ARGS=${SWEEP:-triton.instance_count=1,2 triton.max_queue_delay_us=500,2000}
    # sweep_mps：每组都开 server.mps（服务器自己起停 CUDA MPS 守护进程，日志在各组目录的 mps_log/）；SWEEP_MPS 是
    # 开着 MPS 时另扫的设置（同一轮里 sweep 与 sweep_mps 可以扫不同的键），默认同 SWEEP。
    # 同一个 multirun 里对照有无 MPS：SWEEP='server.mps=false,true' bash tools/gpu_bench.sh sweep。不给时 server.mps=auto：
    # 引擎 >= 2 个 GPU 实例的组开 MPS（h100.yaml 是 2 个），1 个实例的组不开；各组报告的 mps 一项写明
    if [ "$STAGE" = sweep_mps ]; then SWEEP_ARGS="${SWEEP_MPS:-$SWEEP_ARGS} server.mps=true"; fi
    # 每组：重启服务器、SLA 搜索、轻负载点、c=64，SWEEP_REPEATS 次（默认 1；比较设置要 3 次：同一设置重复间的 SLA 范围约 ±10–18 %）；
    # 不测地板与离线（主测量里有）。例：SWEEP='triton.max_queue_delay_us=500,3000' SWEEP_REPEATS=3
    # 固定的是 triton=h100（conf/triton/h100.yaml）；SWEEP 里的键覆盖它（Hydra 的组先于单个键生效）
    $PY scripts/benchmark.py -m "${COMMON[@]}" triton=h100 build_dir=$G/new "${BENCH[@]}" benchmark.repeats=${SWEEP_REPEATS:-1} "benchmark.concurrency=[64]" \
        benchmark.floor=false benchmark.offline_samples=0 benchmark.trace_rate=0 \
        hydra.sweep.dir=$SWEEP_DIR $SWEEP_ARGS \
        ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/$STAGE.log"
    ;;
  gputest)
    # 镜像里没有 pytest：解开 make_carry.sh 带来的 wheel 放到 PYTHONPATH（-p no:cacheprovider：不往工作树写缓存）
    ls .carry/test/pytest-*.whl >/dev/null 2>&1 || { echo "缺少 .carry/test/pytest-*.whl：重新运行 tools/make_carry.sh" >&2; exit 1; }
    rm -rf /tmp/ugttest && mkdir -p /tmp/ugttest
    for w in .carry/test/*.whl; do $PY -m zipfile -e "$w" /tmp/ugttest; done
    # 限时：卡住的 GPU 测试（例如同时重放的图互相等待）不能拖住后面的阶段
    PYTHONPATH=/tmp/ugttest:$PYTHONPATH timeout -k 10 ${GPUTEST_TIMEOUT:-240} $PY -m pytest -q -rs -p no:cacheprovider -m gpu tests/serving/runtime/engines 2>&1 | tee "$OUT/gputest.log"
    ;;
  soak)
    # 浸泡默认不追踪（以前 100）：内嵌 Triton 2.51 的追踪会破坏堆（tools/probe_trace_crash.py；每 10 个追踪一个时本机 30 万个请求里
    # 出过 1 次输入丢失），10 分钟的浸泡要追踪几千个请求；要找停顿时用 SOAK_TRACE_RATE=100
    reliability soak benchmark.soak_s=${SOAK_S:-600} benchmark.soak_trace_rate=${SOAK_TRACE_RATE:-0}
    ;;
  overload)
    # 默认的过载丢弃（triton.load_shedding，按容量）：SLA 搜索、c=64/128 闭环（应 0 拒绝）与 2 倍过载
    reliability overload "benchmark.concurrency=[64,128]" benchmark.soak_s=0
    ;;
  overload_timeout)
    # 对照：以前的默认（不按容量丢弃、引擎排队超时 OVERLOAD_QT_US，默认 15000），其余与 overload 相同
    reliability overload_timeout "benchmark.concurrency=[64,128]" benchmark.soak_s=0 triton.load_shedding=false \
        triton.queue_timeout_us=${OVERLOAD_QT_US:-15000}
    ;;
  bench_old)
    # 旧代码的服务器（同样的 Triton 设置），新的压测工具经 benchmark.url 测它（旧仓库没有地板模型与自定义指标）
    (cd /tmp/old && PYTHONPATH=/tmp/old exec $PY scripts/serve.py "${COMMON_OLD[@]}" "${TRITON_OLD[@]}" build_dir=$G/old checkpoint=$G/new/checkpoints/ugt_base.pt \
        server.http_port=18000 server.grpc_port=18001 server.metrics_port=18002 > "$OUT/serve_old.log" 2>&1) &
    SP=$!
    for i in $(seq 300); do curl -sf localhost:18000/v2/models/ugt_recommend/ready >/dev/null && break; sleep 1; done
    # triton.engine_pipeline_depth=1：报告记下的设置与旧服务器一致（旧代码没有流水线；h100.yaml 的 2 层会让报告把 execute 的拆分写成“不适用”）
    $PY scripts/benchmark.py "${COMMON[@]}" "${TRITON[@]}" triton.engine_pipeline_depth=1 build_dir=$G/new "${BENCH[@]}" benchmark.url=127.0.0.1:18001 \
        benchmark.offline_samples=0 benchmark.trace_rate=0 benchmark.floor=false benchmark.output_dir=$G/bench_old \
        ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/bench_old.log"
    kill $SP; wait $SP 2>/dev/null || true
    ;;
  bench_new)
    # BENCH_EXTRA：追加的覆盖（例如设备时间不够时减少负载点）；NEW_EXTRA：只加在本阶段的覆盖（例如 server.mps=true，
    # 同一轮的 sweep 另扫 server.mps=false,true 时不能放进 BENCH_EXTRA）
    $PY scripts/benchmark.py "${COMMON[@]}" "${TRITON[@]}" build_dir=$G/new "${BENCH[@]}" benchmark.offline_samples=1000 \
        benchmark.output_dir=$G/bench_new ${BENCH_EXTRA:-} ${NEW_EXTRA:-} 2>&1 | tee "$OUT/bench_new.log"
    ;;
  floor)
    # 共享的地板探针：三步恒等模型的 ensemble，与 ugt_recommend 同样的 I/O；只跑 4/2 实例，并发 16 与 64，每点 5 s
    P=/tmp/floorprobe; rm -rf $P && cp -r .carry/probe $P
    # ensemble 也要一个版本目录；git 不存空目录，共享的探针里没有 repo/ens/1，Triton 因此不加载 ens、服务器不起来
    mkdir -p $P/repo/ens/1
    sed -i 's/for cfg in "2 1" "4 2" "8 4"/for cfg in "4 2"/' $P/run.sh
    sed -i 's/for conc in (4, 16, 64, 128)/for conc in (16, 64)/; s/def run(url, model, conc, dur=8/def run(url, model, conc, dur=5/' $P/client.py
    # 探针的服务器用固定端口 18000-18002（与 bench_old 的旧服务器相同）：等这些端口空出来，否则它的就绪检查会问到
    # 正在退出的旧服务器、客户端连不上 gRPC 而挂住；整个探针限时
    for i in $(seq 60); do
      $PY -c 'import socket
for p in (18000, 18001, 18002):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", p)); s.close()' 2>/dev/null && break
      sleep 1
    done
    PY=$PY TS=$UGT_TRITON_SITE OUT=$G timeout 240 bash $P/run.sh 2>&1 | tee "$OUT/floor_probe.log" || true
    pkill -f 'grpc-port=18001' 2>/dev/null || true   # 超时时 run.sh 在后台起的服务器还在
    cp $G/floor_server_*.log "$OUT/" 2>/dev/null || true
    ;;
  own_model)
    # 团队自己的模型走 README 的同一组命令：准备目录与检查点（CPU 上的短训练），model=pooled_cnn（model.source=module）
    # 用 torch 引擎 fp16 构建（门禁对照它自己的 fp32），再压测 3 次；MFU 的 FLOPs 来自 torch.utils.flop_counter
    A=$G/own_assets
    $PY examples/pooled_cnn/prepare.py --out $A 2>&1 | tee "$OUT/own_prepare.log"
    OWN=(model=pooled_cnn checkpoint=$A/pooled_cnn.pt catalog.path=$A/catalog.npz engine=torch precision=fp16
         "export.validation_shapes=[[1,5],[7,37],[16,256]]" server.startup_timeout_s=900)
    $PY scripts/build.py "${OWN[@]}" "${TRITON[@]}" build_dir=$G/own 2>&1 | tee "$OUT/own_build.log"
    cp $G/own/model_repository/build_info.json "$OUT/own_build_info.json"
    # 精简的一轮（SLA 搜索与 c=8/64，不测地板与追踪），3 次重复：几分钟的 GPU 时间
    $PY scripts/benchmark.py "${OWN[@]}" "${TRITON[@]}" build_dir=$G/own "${BENCH[@]}" benchmark.repeats=3 \
        "benchmark.concurrency=[8,64]" benchmark.floor=false benchmark.trace_rate=0 benchmark.output_dir=$G/bench_own ${BENCH_EXTRA:-} 2>&1 | tee "$OUT/own_bench.log"
    cp $G/bench_own/benchmark.json $G/bench_own/benchmark.csv $G/bench_own/benchmark.png "$OUT/" 2>/dev/null || true
    ;;
  *) echo "未知阶段 $STAGE" >&2; exit 2 ;;
esac
