#!/usr/bin/env bash
# 在 GPU 机器上把 tools/gpu_bench.sh 的几个阶段放到后台连续跑完（device 工具一次调用最多 10 分钟，而一整轮测量要
# 20-30 分钟；用 setsid 起的进程在机器归还前一直运行），之后的每次调用等它一段时间并把结果打包带回。
#   bash tools/gpu_campaign.sh start setup build oldbuild bench_new ...   # 拷一份仓库与 .carry 到 /tmp/campaign/src，后台按序运行
#   bash tools/gpu_campaign.sh wait 540                                   # 最多等 540 s（跑完就提前返回），打包到 $OUT
#   bash tools/gpu_campaign.sh stop                                       # 停掉这一轮（含它起的 tritonserver 与存根），打包到 $OUT
# 停的时候不要在 device 命令里写 pkill -f tritonserver 之类：-f 匹配整条命令行，device 工具执行的 bash -c 本身就含这个词，
# 会把自己杀掉；stop 按进程组与精确的进程名杀。
# 拷一份源码再运行：之后的调用会重新同步工作树，bash 边读边执行的脚本不能在运行中被替换。
# STAGE_TIMEOUT（秒，默认不限）：每个阶段的限时，超时的阶段记 rc=124，接着下一个。
# 某个阶段失败时记下来，继续下一个（各阶段互相独立的结果照样有用；依赖它的阶段自己会失败并说明原因）。
# 结果：/tmp/campaign/out（各阶段的日志、status.txt）与 /tmp/gpubuild 下的报告，wait 把它们打成 $OUT/campaign.tar.gz。
set -uo pipefail
cd "$(dirname "$0")/.."
C=/tmp/campaign
G=/tmp/gpubuild
CMD=${1:?用法：gpu_campaign.sh start 阶段... | wait 秒数 | stop}
shift
case "$CMD" in
  start)
    [ -f $C/running ] && kill -0 "$(cat $C/running)" 2>/dev/null && { echo "已有一轮在运行（pid $(cat $C/running)）" >&2; exit 1; }
    rm -rf $C/src && mkdir -p $C/src $C/out
    tar --exclude=./.git --exclude=./.venv --exclude=./build --exclude=./outputs --exclude=./multirun -cf - . | tar -xf - -C $C/src
    printf '%s\n' "$@" > $C/stages.txt
    # 环境变量（ENGINE_INSTANCES、BENCH_EXTRA 等）随 setsid 进程传下去
    setsid bash -c '
      cd '"$C"'/src
      for s in $(cat '"$C"'/stages.txt); do
        echo "$(date +%T) 开始 $s" >> '"$C"'/out/status.txt
        t=$SECONDS
        OUT='"$C"'/out timeout -k 30 ${STAGE_TIMEOUT:-0} bash tools/gpu_bench.sh "$s" > '"$C"'/out/stage_$s.log 2>&1
        rc=$?
        echo "$(date +%T) 结束 $s rc=$rc 用时 $((SECONDS - t)) s" >> '"$C"'/out/status.txt
      done
      echo "$(date +%T) 全部结束" >> '"$C"'/out/status.txt
      rm -f '"$C"'/running' > $C/out/campaign.log 2>&1 < /dev/null &
    echo $! > $C/running
    echo "后台运行（pid $(cat $C/running)）：$*"
    ;;
  wait)
    LIMIT=${1:-540}
    t=0
    while [ -f $C/running ] && [ $t -lt "$LIMIT" ]; do sleep 10; t=$((t + 10)); done
    ;;
  stop)
    # setsid 起的是一个新的进程组（组号 = 记下的 pid）：压测、构建等都在组里；tritonserver 与存根按精确的进程名再清一次
    if [ -f $C/running ]; then
      kill -- -"$(cat $C/running)" 2>/dev/null || true
      echo "$(date +%T) 手动停止" >> $C/out/status.txt
      rm -f $C/running
    fi
    pkill -x tritonserver 2>/dev/null || true
    pkill -x triton_python_b 2>/dev/null || true   # triton_python_backend_stub（进程名截到 15 个字符）
    sleep 3
    echo "剩下的相关进程：$(pgrep -c -x tritonserver || true) 个 tritonserver；显存 $(nvidia-smi --query-gpu=memory.used --format=csv,noheader 2>/dev/null)"
    ;;
  *) echo "未知命令 $CMD" >&2; exit 2 ;;
esac
# 打包：日志、报告（JSON / CSV / PNG / 追踪的分解）、剖析、构建信息；大文件（原始追踪、tritonserver 日志）不带，
# tritonserver 日志只带最后 300 行（卡住或出错时看服务器那边发生了什么）
if [ -n "${OUT:-}" ] && [ -d $C/out ]; then
  mkdir -p $C/out/server_tails
  find $G -name tritonserver.log 2>/dev/null | while read -r f; do
    tail -n 300 "$f" > "$C/out/server_tails/$(echo "${f#$G/}" | tr '/' '_')"
  done
  (cd / && tar -czf "$OUT/campaign.tar.gz" --exclude='*.pt2' --exclude='*.onnx' --exclude='trace.json*' \
      --exclude='tritonserver.log' --exclude='model_repository' --exclude='checkpoints' --exclude='variants' \
      --exclude='compile_cache' --exclude='cache' \
      "${C#/}/out" $(cd / && ls -d tmp/gpubuild/bench_* tmp/gpubuild/profile* tmp/gpubuild/sweep* 2>/dev/null) 2>/dev/null)
  cp $C/out/status.txt "$OUT/" 2>/dev/null
  ls -la "$OUT"
fi
echo "== 状态"; cat $C/out/status.txt 2>/dev/null
# tritonserver 崩溃的痕迹（Triton 2.51 开着追踪时会段错误，进程不退出、只留一行 Signal (11)）：在回复里直接看到。
# 模式与 algorithm/serving/server.py 的 _CRASH_RE 相同（改一处要改另一处）
crash=$(grep -H -m3 -E "Signal \((4|6|7|8|11)\) received|corrupted (double-linked|size|top size)|double free|free\(\): invalid|malloc\(\): " \
        $C/out/server_tails/* 2>/dev/null | head -5)
[ -n "$crash" ] && { echo "== tritonserver 崩溃过："; echo "$crash"; }
[ -f $C/running ] && echo "（仍在运行）"
# 当前阶段的最后几行
last=$(ls -t $C/out/stage_*.log 2>/dev/null | head -1)
[ -n "$last" ] && { echo "== $last"; tail -n 25 "$last"; }
exit 0
