#!/usr/bin/env bash
# 准备 .carry/（已被 .gitignore 忽略）：GPU 机器的镜像缺少、又无法联网下载的全部东西。
# GPU 机器：x86-64，/opt/torch/.venv 里的 Python 3.12（torch 2.11+cu130、numpy 2.x、onnx、onnxruntime、onnxscript、
# triton、protobuf、pynvml），没有网络，也没有 pip 包源。tools/gpu_bench.sh setup 用这里的产物建 /tmp/ugtvenv。
#
# 产物（device 工具连同工作树一起最多带 64 MiB，本脚本要求工作树 + .carry 不超过 UGT_CARRY_BUDGET_MIB，默认 60）：
#   .carry/site312.tar.xz    cp312 / manylinux x86_64 的 wheel 解开后的 site-packages 内容（numpy<2、tritonclient[grpc]、
#                            hydra、torchao……）。不直接带 wheel：wheel 是 zip（deflate），解开后用 xz -9e 压缩小约 40%
#                            （17 个 wheel 共 36.7 MB -> 20.8 MB），预算里给以后留出余量。
#   .carry/triton312.tar.xz  nvidia-pytriton wheel 里的服务器部分：tritonserver、python backend、3.12 的 stub、
#                            nvidia_pytriton.libs（去掉自带的 libpython3.13）。server.py 经 UGT_TRITON_SITE 找到它。
#   .carry/MANIFEST.txt      每个 wheel 的文件名、大小、sha256，以及两个 tar 的 sha256（setup 阶段以它判断环境是否过期）。
#
# 用法：bash tools/make_carry.sh
#   幂等：已下载的 wheel 不再下载；输入没变时不重新打包（xz -9e 在 2 核机器上每个 tar 要一两分钟）。
#   UGT_CARRY_CACHE       下载缓存目录（默认 ~/.cache/ugt-carry；不放在 .carry 里，否则会占用随行预算）
#   UGT_CARRY_EXTRA       额外的 NAME==VER（空格分隔），例如镜像里若没有 matplotlib 时要带的那一组
#   UGT_CARRY_BUDGET_MIB  工作树 + .carry 的上限（默认 60）
#   UGT_CARRY_FORCE=1     忽略指纹，重新打包
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=$ROOT/.carry
CACHE=${UGT_CARRY_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ugt-carry}
DL=$CACHE/whl
BUDGET_MIB=${UGT_CARRY_BUDGET_MIB:-60}
HOSTPY=${HOSTPY:-python3}   # 本机的 Python 只用来运行 pip download 与校验；目标版本由 --python-version 指定
mkdir -p "$CARRY" "$DL" "$CACHE/pytriton"

# tritonclient 与 nvidia-pytriton 与本机 .venv 保持同一版本（CPU 上测过的组合）；没有 .venv 时用下面的默认值
venv_version() {
  if [ -x .venv/bin/python ]; then
    .venv/bin/python -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null && return
  fi
  echo "$2"
}
TC_VER=$(venv_version tritonclient 2.73.0)
PYTRITON_VER=$(venv_version nvidia-pytriton 0.7.0)

# 要带的 wheel，每个项目只有一个版本。版本与本机 .venv 一致（除非另有说明）。
PINS=(
  numpy==1.26.4                  # pytriton 0.7 的 python stub 在 numpy 2 下输出为空或全零（server.check_numpy）
  "tritonclient==$TC_VER"        # 只用 gRPC；http 附加依赖（geventhttpclient、gevent、aiohttp）不带
  grpcio==1.85.3                 # tritonclient 的 grpc 附加依赖：grpcio>=1.81.1（service_pb2_grpc 生成于 1.81.1）
  protobuf==6.33.6               # tritonclient 的 *_pb2.py 由 protobuf 6.33.5 生成：更旧的运行时直接报错（7.x 只警告）；
                                 # 镜像里 protobuf 的版本不确定，所以自带；onnx 1.23 的生成码（6.31.1）在 6.33.6 下可用
  ml-dtypes==0.5.4               # tritonclient 必需（tritonclient.utils 直接 import），且要求 <=0.5.4；0.5.4 支持 numpy 1.26
  python-rapidjson==1.25         # tritonclient 必需（tritonclient.utils import rapidjson）
  urllib3==2.8.0                 # tritonclient 必需
  packaging==26.3                # tritonclient[grpc] 与 hydra-core 必需
  typing-extensions==4.16.0      # grpcio 要求 ~=4.12；镜像里 torch 也依赖它，但版本下限只有 4.10
  hydra-core==1.3.8
  omegaconf==2.3.1
  antlr4-python3-runtime==4.9.3  # hydra/omegaconf 要求 4.9.*；PyPI 上只有源码包，下面在本机构建成 py3-none-any wheel
  PyYAML==6.0.4                  # omegaconf 必需；镜像里多半已有，体积小，自带更稳妥
  tqdm==4.70.1
  psutil==7.2.2
  nvidia-ml-py==13.615.71        # 压测的 GPU 利用率采样（import pynvml）
  torchao==0.18.0                # 最新版；0.17/0.18 的 C++ 扩展只用 torch 的稳定 C ABI（aoti_torch_*/torch_*），
                                 # torchao 自己的检查是 torch>=2.11 才加载；int8 的 quantize_ 路径是纯 Python
)
SDIST_ONLY=(antlr4-python3-runtime)
# shellcheck disable=SC2206
PINS+=(${UGT_CARRY_EXTRA:-})

# 目标平台：cp312、manylinux x86_64。镜像是 glibc >= 2.35（pytriton 的 wheel 就是 manylinux_2_35，已在 H100 上运行过），
# 所以 manylinux_2_5 .. 2_35 的 wheel 都能用；pip download 需要逐个列出平台标签。
PLATFORMS=(manylinux1_x86_64 manylinux2010_x86_64 manylinux2014_x86_64)
for n in $(seq 5 35); do PLATFORMS+=("manylinux_2_${n}_x86_64"); done
PLAT_ARGS=(); for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done
TARGET_ARGS=(--only-binary=:all: --python-version 3.12 --implementation cp "${PLAT_ARGS[@]}")

# ---------------------------------------------------------------- 下载（已有则跳过）
norm() { echo "$1" | tr 'A-Z' 'a-z' | sed -E 's/[-_.]+/_/g'; }
wheel_file() {  # $1=name $2=version：缓存里该版本的 wheel（wheel 文件名里项目名已规范化为小写 + 下划线）
  local n b; n=$(norm "$1")
  for f in "$DL"/*.whl; do
    b=$(basename "$f" | tr 'A-Z' 'a-z')
    case "$b" in "${n}-${2}-"*) echo "$f"; return ;; esac
  done
}
WHEELS=()
for spec in "${PINS[@]}"; do
  name=${spec%%==*}; ver=${spec#*==}
  [ "$name" != "$spec" ] || { echo "版本必须写成 NAME==VER：$spec" >&2; exit 2; }
  if [ -z "$(wheel_file "$name" "$ver")" ]; then
    if [[ " ${SDIST_ONLY[*]} " == *" $name "* ]]; then
      echo "构建 $spec（只有源码包；纯 Python，构建结果是 py3-none-any）"
      "$HOSTPY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DL" "$spec"
    else
      echo "下载 $spec"
      "$HOSTPY" -m pip download -q --no-deps "${TARGET_ARGS[@]}" -d "$DL" "$spec"
    fi
  fi
  f=$(wheel_file "$name" "$ver")
  [ -n "$f" ] || { echo "缓存里找不到 $spec 的 wheel" >&2; exit 1; }
  WHEELS+=("$f")
done
PYTRITON_WHL=$(ls "$CACHE/pytriton"/nvidia_pytriton-"$PYTRITON_VER"-*.whl 2>/dev/null | head -1 || true)
if [ -z "$PYTRITON_WHL" ]; then
  echo "下载 nvidia-pytriton==$PYTRITON_VER（py3-none-manylinux_2_35_x86_64，约 55 MB）"
  "$HOSTPY" -m pip download -q --no-deps "${TARGET_ARGS[@]}" -d "$CACHE/pytriton" "nvidia-pytriton==$PYTRITON_VER"
  PYTRITON_WHL=$(ls "$CACHE/pytriton"/nvidia_pytriton-"$PYTRITON_VER"-*.whl | head -1)
fi

# ---------------------------------------------------------------- 校验 wheel
# 每个 wheel 的标签须能装在 cp312 / manylinux x86_64 上；每个项目只有一个版本；
# 每个 wheel 的非 extra 依赖（按 Linux、Python 3.12 求值标记）要么在所带的集合里且版本满足，要么由镜像提供。
"$HOSTPY" - "${PLATFORMS[@]}" -- "${WHEELS[@]}" <<'EOF'
import sys, zipfile
from pip._vendor.packaging import tags
from pip._vendor.packaging.requirements import Requirement
from pip._vendor.packaging.utils import parse_wheel_filename, canonicalize_name
from pip._vendor.packaging.version import Version

i = sys.argv.index("--")
platforms, wheels = sys.argv[1:i], sys.argv[i + 1:]
supported = set(tags.cpython_tags((3, 12), platforms=platforms)) | set(tags.compatible_tags((3, 12), "cp312", platforms))
IMAGE = {"torch", "onnx", "onnxruntime", "onnxscript", "triton"}  # 由镜像提供
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "extra": ""}
have, bad = {}, []
for w in wheels:
    name, ver, _, wtags = parse_wheel_filename(w.rsplit("/", 1)[-1])
    if not (set(wtags) & supported):
        bad.append(f"{w}: 标签 {sorted(map(str, wtags))} 不适用于 cp312 manylinux x86_64")
    if name in have:
        bad.append(f"{name} 有两个版本：{have[name]} 与 {ver}")
    have[name] = ver
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = z.read(meta).decode()
    for line in text.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        r = Requirement(line.split(":", 1)[1].strip())
        if r.marker is not None and not r.marker.evaluate(env):
            continue  # extra 依赖或不适用于本平台
        n = canonicalize_name(r.name)
        if n in have:
            if not r.specifier.contains(have[n], prereleases=True):
                bad.append(f"{w.rsplit('/', 1)[-1]} 要求 {r}，但带的是 {n} {have[n]}")
        elif n not in IMAGE:
            bad.append(f"{w.rsplit('/', 1)[-1]} 依赖 {r}，既没带也不在镜像里")
if bad:
    sys.exit("wheel 校验失败：\n  " + "\n  ".join(bad))
print(f"wheel 校验通过：{len(wheels)} 个，均适用于 cp312 manylinux x86_64，依赖齐全")
EOF

# 指纹：输入 wheel 的 sha256 + 打包方式。没变且产物存在时跳过打包。
RECIPE_SITE="site-v1 strip=bin,test/,example.py,*/tests"
RECIPE_TRITON="triton-v1 bin/tritonserver backends/python python_backend_stubs/3.12 nvidia_pytriton.libs-minus-libpython"
fingerprint() { { echo "$1"; shift; for f in "$@"; do echo "$(basename "$f") $(sha256sum "$f" | cut -c1-64)"; done; } | sha256sum | cut -c1-64; }
up_to_date() {  # $1=产物 $2=指纹
  [ -z "${UGT_CARRY_FORCE:-}" ] && [ -f "$1" ] && [ -f "$1.fp" ] && [ "$(cat "$1.fp")" = "$2" ]
}
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/ugt-carry.XXXXXX")
trap 'rm -rf "$STAGE"' EXIT
# 固定成员属性（属主 0、按名排序），产物只由输入决定
TAR_OPTS=(--sort=name --owner=0 --group=0 --numeric-owner)

# ---------------------------------------------------------------- site312.tar.xz
FP_SITE=$(fingerprint "$RECIPE_SITE" "${WHEELS[@]}")
if up_to_date "$CARRY/site312.tar.xz" "$FP_SITE"; then
  echo "site312.tar.xz 已是最新"
else
  echo "解开 ${#WHEELS[@]} 个 wheel（pip install --target，按 cp312 的标签；不编译 .pyc）"
  "$HOSTPY" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --root-user-action=ignore \
      "${TARGET_ARGS[@]}" --target "$STAGE/site" "${WHEELS[@]}"
  [ -f "$STAGE/site/numpy/__init__.py" ] || { echo "pip install --target 失败" >&2; exit 1; }
  # bin/ 里是入口脚本，shebang 指向本机解释器，GPU 机器上无用；torchao 的 wheel 带了顶层 test/ 包（会遮住标准库的 test），
  # nvidia-ml-py 带了顶层 example.py；各包的 tests/ 目录运行时不用（约 9 MB 未压缩）。
  rm -rf "$STAGE/site/bin" "$STAGE/site/test" "$STAGE/site/example.py"
  find "$STAGE/site" -mindepth 2 -type d -name tests -prune -exec rm -rf {} +
  find "$STAGE/site" -name __pycache__ -prune -exec rm -rf {} +
  echo "压缩 site312.tar.xz（xz -9e，约 1-2 分钟）"
  tar -C "$STAGE/site" "${TAR_OPTS[@]}" -cf - . | xz -9e -T1 > "$CARRY/site312.tar.xz.tmp"
  mv "$CARRY/site312.tar.xz.tmp" "$CARRY/site312.tar.xz"
  echo "$FP_SITE" > "$CARRY/site312.tar.xz.fp"
  rm -rf "$STAGE/site"
fi

# ---------------------------------------------------------------- triton312.tar.xz
FP_TRITON=$(fingerprint "$RECIPE_TRITON" "$PYTRITON_WHL")
if up_to_date "$CARRY/triton312.tar.xz" "$FP_TRITON"; then
  echo "triton312.tar.xz 已是最新"
else
  echo "从 $(basename "$PYTRITON_WHL") 取出服务器部分"
  # 只取 server.py 用到的：bin/tritonserver、backends/python、3.12 的 stub、nvidia_pytriton.libs。
  # 不要：pytriton 的 Python 代码（代码经 UGT_TRITON_SITE 直接找服务器）、其它 Python 版本的 stub、
  # libpython3.13（只有 3.13 的 stub 用它，32 MB）、caches/（只在 --cache-config 时加载）。
  # zip 里不可靠地记录可执行位，这里显式设置：两个可执行文件 755，其余 644。
  "$HOSTPY" - "$PYTRITON_WHL" "$STAGE/triton" <<'EOF'
import os, re, sys, zipfile
whl, out = sys.argv[1], sys.argv[2]
EXE = {"pytriton/tritonserver/bin/tritonserver",
       "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"}
keep = re.compile(r"^(pytriton/tritonserver/bin/tritonserver"
                  r"|pytriton/tritonserver/backends/python/.+"
                  r"|pytriton/tritonserver/python_backend_stubs/3\.12/.+"
                  r"|nvidia_pytriton\.libs/.+)$")
n = 0
with zipfile.ZipFile(whl) as z:
    for info in z.infolist():
        name = info.filename
        if info.is_dir() or not keep.match(name) or "__pycache__" in name:
            continue
        if re.match(r"nvidia_pytriton\.libs/libpython\d", name):
            continue
        dst = os.path.join(out, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        with z.open(info) as src, open(dst, "wb") as f:
            f.write(src.read())
        os.chmod(dst, 0o755 if name in EXE else 0o644)
        n += 1
missing = [e for e in EXE if not os.path.exists(os.path.join(out, e))]
if missing:
    sys.exit(f"wheel 里缺少 {missing}")
print(f"取出 {n} 个文件")
EOF
  echo "压缩 triton312.tar.xz（xz -9e，约 1-2 分钟）"
  tar -C "$STAGE/triton" "${TAR_OPTS[@]}" -cf - pytriton nvidia_pytriton.libs | xz -9e -T1 > "$CARRY/triton312.tar.xz.tmp"
  mv "$CARRY/triton312.tar.xz.tmp" "$CARRY/triton312.tar.xz"
  echo "$FP_TRITON" > "$CARRY/triton312.tar.xz.fp"
  rm -rf "$STAGE/triton"
fi

# ---------------------------------------------------------------- 校验 tar 的内容
tar -tvJf "$CARRY/triton312.tar.xz" > "$STAGE/triton.list"
tar -tJf "$CARRY/site312.tar.xz" > "$STAGE/site.list"
"$HOSTPY" - "$STAGE/triton.list" "$STAGE/site.list" <<'EOF'
import sys
tl = [l.split(None, 5) for l in open(sys.argv[1]).read().splitlines()]
mode = {p[5].removeprefix("./"): p[0] for p in tl}
site = {l.removeprefix("./").rstrip("/") for l in open(sys.argv[2]).read().splitlines()}
bad = []
for exe in ("pytriton/tritonserver/bin/tritonserver",
            "pytriton/tritonserver/python_backend_stubs/3.12/triton_python_backend_stub"):
    m = mode.get(exe)
    if m is None or not m.startswith("-rwx") or m[6] != "x" or m[9] != "x":
        bad.append(f"{exe}: {m or '缺失'}（须为可执行文件）")
for need in ("pytriton/tritonserver/backends/python/libtriton_python.so",
             "pytriton/tritonserver/backends/python/triton_python_backend_utils.py"):
    if need not in mode:
        bad.append(f"缺少 {need}")
libs = [p for p in mode if p.startswith("nvidia_pytriton.libs/") and not p.endswith("/")]
if not any("libtritonserver" in p for p in libs):
    bad.append("缺少 libtritonserver")
for p in mode:
    if "libpython" in p or "perf_analyzer" in p or ("python_backend_stubs/" in p and "/3.12" not in p and not p.endswith("python_backend_stubs/")):
        bad.append(f"不应带：{p}")
for need in ("numpy/__init__.py", "numpy-1.26.4.dist-info/METADATA", "tritonclient/grpc/__init__.py",
             "tritonclient/grpc/aio/__init__.py", "tritonclient/grpc/model_config_pb2.py", "grpc/__init__.py",
             "google/protobuf/__init__.py", "hydra/__init__.py", "omegaconf/__init__.py", "antlr4/__init__.py",
             "torchao/__init__.py", "pynvml.py", "rapidjson.cpython-312-x86_64-linux-gnu.so"):
    if need not in site:
        bad.append(f"site312.tar.xz 缺少 {need}")
if bad:
    sys.exit("tar 校验失败：\n  " + "\n  ".join(bad))
print(f"tar 校验通过：triton312 {len(libs)} 个共享库、tritonserver 与 3.12 stub 可执行；site312 {len(site)} 项")
EOF

# ---------------------------------------------------------------- 对照与探针
# gpu_bench.sh 的 oldbuild / bench_old 阶段要旧服务路径的代码（git archive，几百 KB），floor 阶段要共享的地板探针
# （../shared 不随 device 工具走）
OLD_COMMIT=${UGT_OLD_COMMIT:-28b27eb}
if git rev-parse -q --verify "$OLD_COMMIT^{commit}" >/dev/null; then
  git archive "$OLD_COMMIT" | xz -9 > "$CARRY/old.tar.xz"
fi
# gpu_bench.sh 的 gputest 阶段（GPU 上跑 pytest -m gpu）：镜像里没有 pytest；纯 Python 的 wheel，版本同本机 .venv
mkdir -p "$CARRY/test"
for spec in "pytest==$(venv_version pytest 9.2.0)" "pluggy==$(venv_version pluggy 1.7.0)" \
            "iniconfig==$(venv_version iniconfig 2.3.1)"; do
  ls "$CARRY/test/${spec%%==*}-${spec##*==}-"*.whl >/dev/null 2>&1 || \
    "$HOSTPY" -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/test" "$spec"
done
if [ -d ../shared/probes/python-backend-floor ]; then
  rm -rf "$CARRY/probe" && cp -r ../shared/probes/python-backend-floor "$CARRY/probe"
fi

# ---------------------------------------------------------------- 清单与大小
# 旧布局（whl/、py/）与其它杂物会占随行预算：只留本脚本的产物
for f in "$CARRY"/* "$CARRY"/.[!.]*; do
  [ -e "$f" ] || continue
  case "$(basename "$f")" in
    site312.tar.xz|site312.tar.xz.fp|triton312.tar.xz|triton312.tar.xz.fp|MANIFEST.txt|old.tar.xz|probe|test) ;;
    *) echo "删除 .carry 中的旧文件 $(basename "$f")"; rm -rf "$f" ;;
  esac
done
{
  echo "# tools/make_carry.sh 生成；tools/gpu_bench.sh setup 以本文件的 sha256 判断 /tmp/ugtvenv 是否过期"
  echo "# 目标：CPython 3.12，manylinux x86_64；tritonclient $TC_VER，nvidia-pytriton $PYTRITON_VER"
  echo "site312.tar.xz   $(stat -c %s "$CARRY/site312.tar.xz") $(sha256sum "$CARRY/site312.tar.xz" | cut -c1-64)"
  echo "triton312.tar.xz $(stat -c %s "$CARRY/triton312.tar.xz") $(sha256sum "$CARRY/triton312.tar.xz" | cut -c1-64)"
  echo "# site312.tar.xz 由这些 wheel 解开："
  for f in "${WHEELS[@]}"; do echo "$(basename "$f") $(stat -c %s "$f") $(sha256sum "$f" | cut -c1-64)"; done
  echo "# triton312.tar.xz 取自："
  echo "$(basename "$PYTRITON_WHL") $(stat -c %s "$PYTRITON_WHL") $(sha256sum "$PYTRITON_WHL" | cut -c1-64)"
} > "$CARRY/MANIFEST.txt"

ls -l "$CARRY"
# 工作树：device 工具带的是 git 跟踪的与未被忽略的文件；这里按 du 排除 .venv、build、.git 与 .carry 估计（偏大）
TREE_KB=$(du -sk --exclude=./.venv --exclude=./build --exclude=./.git --exclude=./.carry . | cut -f1)
CARRY_KB=$(du -sk "$CARRY" | cut -f1)
TOTAL_KB=$((TREE_KB + CARRY_KB))
awk -v t="$TREE_KB" -v c="$CARRY_KB" -v b="$BUDGET_MIB" \
  'BEGIN { printf "工作树 %.1f MiB + .carry %.1f MiB = %.1f MiB（上限 %s MiB）\n", t/1024, c/1024, (t+c)/1024, b }'
if [ "$TOTAL_KB" -gt $((BUDGET_MIB * 1024)) ]; then
  echo "超出预算 ${BUDGET_MIB} MiB" >&2; exit 1
fi
