"""内嵌 Triton：直接运行 nvidia-pytriton 自带的 tritonserver 二进制（不经 PyTriton 的 Python API）。

做法（CPU 机器与 H100 机器上都验证过）：
- 把 python backend 与当前 Python 版本的 stub 复制到一个临时 backend 目录；
- LD_LIBRARY_PATH = libpython 所在目录 + nvidia_pytriton.libs；
- stub 的嵌入式解释器不读 PYTHONPATH，而是按 PATH 上的 python3 确定 sys.prefix：
  所以把当前解释器（venv）的 bin 目录放在 PATH 最前，stub 才会用 venv 里的 numpy（<2）；
  本包的路径经 UGT_PYTHONPATH 传给 model.py；
- 默认所有端点只绑定 127.0.0.1，端口自动选空闲的，model control mode = none；
- 等到 ensemble 就绪才返回；stop() 先 SIGTERM 再 SIGKILL。可作上下文管理器；
- 同一仓库目录同时只允许一个服务器（临时目录里按仓库路径加 flock 锁，进程死了锁自动释放）；
- 存根被杀后监护线程先卸载再加载该模型（见 _reload），并删掉死存根留下的 /dev/shm 共享内存区；
  运行中加载的模型（rollout.py 上线的新版本）也被监护，有意卸载的不再监护。
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Dict, List, Optional

from algorithm.serving.runtime import shedding
from algorithm.serving.config import ServerConfig
from algorithm.errors import MissingDependencyError, ServerError
from algorithm.serving import mps as mps_mod
from algorithm.serving.mps import MpsDaemon

log = logging.getLogger(__name__)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHM_DIR = "/dev/shm"
# tritonserver 日志里崩溃的信号（不含 SIGINT 2 / SIGTERM 15）与 glibc 的堆错误（tools/gpu_campaign.sh 用同样的模式）
_CRASH_RE = re.compile(r"Signal \((?:4|6|7|8|11)\) received|corrupted (?:double-linked|size|top size)|double free|"
                       r"free\(\): invalid|malloc\(\): ")
# python backend 为每个存根建一个 POSIX 共享内存区，名字（前缀 + UUID）是存根命令行的第 3 个参数：
#   triton_python_backend_stub <model.py> <区名> <默认大小> <增长步长> <父 pid> <backend 目录> ... <实例名> ...
# 加载模型时 python backend 先起一个临时存根补全配置（auto-complete），完成后它自己退出：它的实例名参数就是模型名
#（实例的存根是 <模型>_<组>_<序号>），不是模型的实例，不监护
_SHM_REGION_RE = re.compile(r"^triton_python_backend_shm_region_[0-9A-Za-z-]+$")


@dataclass(frozen=True)
class StubProcess:
    """一个 python backend 存根进程：所属模型、实例名与它的共享内存区名（存根死后就读不到命令行了，所以先记下）。"""

    pid: int
    model: str
    instance: str
    shm_region: str  # 空 = 命令行里没有可识别的区名（不删任何东西）
    create_time: float  # 与 pid 一起识别进程（pid 可能被复用）


def repository_lock_path(model_repository: str) -> str:
    """仓库目录对应的锁文件：放在临时目录里（仓库可能只读），以真实路径的哈希命名（符号链接指向同一目录时同一把锁）。"""
    key = hashlib.sha256(os.path.realpath(model_repository).encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"ugt-triton-repository-{key}.lock")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def check_numpy() -> None:
    """nvidia-pytriton 0.7 的 python backend stub 在 numpy 2 下返回空的（或全零的）输出张量（本项目实测），
    所以服务进程必须用 numpy < 2。"""
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise MissingDependencyError(
            f"当前解释器的 numpy 为 {numpy.__version__}：内嵌 Triton 的 Python stub 在 numpy 2 下输出为空或全零。"
            "请在 numpy<2 的环境中运行（scripts/setup.sh 的 .venv；或 python -m venv --system-site-packages "
            "后在其中安装 numpy<2）")


def find_pytriton() -> str:
    """nvidia-pytriton 的 site-packages 目录（含 pytriton/tritonserver 与 nvidia_pytriton.libs）。
    环境变量 UGT_TRITON_SITE 可直接指定该目录（例如只解出了服务器部分的 wheel）。"""
    if os.environ.get("UGT_TRITON_SITE"):
        return os.environ["UGT_TRITON_SITE"]
    try:
        import pytriton
    except ImportError as e:
        raise MissingDependencyError("找不到 nvidia-pytriton（内嵌 Triton 服务器来自它）：pip install nvidia-pytriton；"
                                     "或在 NVIDIA 的 Triton 容器里用 tritonserver 直接服务生成的仓库") from e
    return os.path.dirname(os.path.dirname(os.path.abspath(pytriton.__file__)))


class EmbeddedTritonServer:
    """在给定仓库上运行的 tritonserver 进程。"""

    def __init__(self, model_repository: str, config: Optional[ServerConfig] = None,
                 ready_models: Optional[List[str]] = None, log_path: Optional[str] = None,
                 extra_args: Optional[List[str]] = None):
        self.repository = os.path.abspath(model_repository)
        self.config = config or ServerConfig()
        self.ready_models = list(ready_models or [])
        self.log_path = log_path
        self._given_log_path = log_path  # None = 放在临时目录里（每次启动一个新的）
        self.extra_args = list(extra_args or [])
        self.process: Optional[subprocess.Popen] = None
        self._tmp: Optional[str] = None
        self._log_file = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._stop_event: Optional[threading.Event] = None
        self._supervisor: Optional[threading.Thread] = None
        self._stubs: Dict[str, List[StubProcess]] = {}  # 监护线程上次看到的各模型存根
        self._known_stubs: Dict[int, StubProcess] = {}  # 见过的全部存根（stop() 据此清理共享内存区）
        self._retry_at: Dict[str, float] = {}  # 重新加载失败后的下次尝试时刻（退避）
        self._failures: Dict[str, int] = {}  # 各模型连续重新加载失败的次数
        self._lock_fd: Optional[int] = None
        self.restarts: Dict[str, int] = {}  # 监护线程重新加载各模型的次数
        self.removed_shm_regions: List[str] = []  # 本服务器删掉的（死存根留下的）共享内存区
        self.mps: Optional[MpsDaemon] = None  # 本服务器起的 MPS 守护进程（server.mps 决定，见 mps.decide）
        # 这次启动是否用了 MPS 与原因（压测报告写出来）：{"setting", "active", "reason"}
        self.mps_state: Dict[str, object] = {}
        self._mps_off_reason: Optional[str] = None  # auto 开着 MPS 时启动失败、已改为不用 MPS 的原因
        self._exited_at_start = False  # tritonserver 在就绪之前自己退出了（不是超时）

    # ---- 地址 ----
    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.metrics_port}/metrics"

    # ---- 准备 ----
    def _paths(self):
        site = find_pytriton()
        root = os.path.join(site, "pytriton", "tritonserver")
        binary = os.path.join(root, "bin", "tritonserver")
        backend = os.path.join(root, "backends", "python")
        ver = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = os.path.join(root, "python_backend_stubs", ver, "triton_python_backend_stub")
        libs = os.path.join(site, "nvidia_pytriton.libs")
        for what, p in (("tritonserver 二进制", binary), ("python backend", backend), (f"Python {ver} 的 stub", stub)):
            if not os.path.exists(p):
                raise MissingDependencyError(f"nvidia-pytriton 中缺少{what}：{p}（该版本可能不支持 Python {ver}）")
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libname = f"libpython{ver}.so.1.0"
        if not any(os.path.exists(os.path.join(d, libname)) for d in (libdir, "/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu")):
            raise MissingDependencyError(f"找不到 {libname}（Python stub 需要共享的 libpython）：安装 libpython{ver} "
                                         "或使用以 --enable-shared 构建的 Python")
        return binary, backend, stub, libs, libdir

    def _command(self, binary: str, backend_dir: str) -> List[str]:
        c = self.config
        if c.supervise:  # 上线过的仓库（rollout.py）只加载当前版本；否则全部
            from algorithm.serving.rollout import startup_models

            models = startup_models(self.repository) or ["*"]
            control = ["--model-control-mode=explicit", *(f"--load-model={m}" for m in models)]
        else:
            control = ["--model-control-mode=none"]
        return [binary, f"--model-repository={self.repository}", f"--backend-directory={backend_dir}", *control,
                "--strict-readiness=true", "--exit-on-error=true",
                f"--http-address={c.host}", f"--http-port={self.http_port}",
                f"--grpc-address={c.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={c.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", f"--log-verbose={c.log_verbose}",
                f"--exit-timeout-secs={int(c.exit_timeout_s)}", *self.extra_args]

    def start(self) -> "EmbeddedTritonServer":
        if self.process is not None:
            raise ServerError("服务器已在运行")
        if not os.path.isdir(self.repository):
            raise ServerError(f"模型仓库不存在：{self.repository}（先运行 python scripts/build.py）")
        self._mps_off_reason = None
        self._lock_repository()
        try:
            self._start()
        except ServerError as e:
            # auto 开着 MPS、tritonserver 就绪前自己退出了：可能是这台机器上 MPS 的客户端连不上（容器、计算模式），
            # 不用 MPS 再起一次（不是超时才重试：超时重试要再等满 startup_timeout_s）
            retry = self.config.mps == "auto" and self.mps is not None and self._exited_at_start
            self.stop()
            if not retry:
                raise
            first = str(e).split("。日志末尾")[0].splitlines()[0][:200]
            log.warning("server.mps=auto：开着 CUDA MPS 时 tritonserver 启动时退出（%s），不用 MPS 再启动一次", first)
            self._mps_off_reason = f"auto：开着 MPS 时 tritonserver 启动时退出（{first}），已不用 MPS 重启"
            self._lock_repository()
            try:
                self._start()
            except BaseException:
                self.stop()
                raise
        except BaseException:
            self.stop()
            raise
        return self

    def _lock_repository(self) -> None:
        """独占、非阻塞地锁住仓库对应的锁文件，拒绝同一仓库目录上的第二个服务器：两者共用模型目录
        （存根写 __pycache__、重建仓库、Triton 按目录修改时间决定是否重新加载），会互相干扰。
        flock 随文件描述符：stop() 关闭即释放，进程死了内核自动释放（不会留下“假锁”）。"""
        path = repository_lock_path(self.repository)
        for _ in range(10):
            fd = self._open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "未知"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ServerError(f"无法锁住仓库锁文件 {path}（仓库 {self.repository}）：{e}") from e
                raise ServerError(f"模型仓库 {self.repository} 已有一个内嵌 tritonserver 在服务（持锁进程 pid {holder}，"
                                  f"锁文件 {path}）：同一仓库目录同时只能有一个服务器。先停掉那个，"
                                  "或把仓库复制一份再启动") from None
            # 上一个持锁者 stop() 时会删掉锁文件：锁住的若已不是目录里的那个文件，重新打开再锁
            try:
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        else:
            raise ServerError(f"仓库锁文件 {path} 反复被删除，无法锁住（仓库 {self.repository}）")
        try:  # 写下持锁 pid，供被拒的那一方在错误里报告
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass
        self._lock_fd = fd

    def _open_lock_file(self, path: str) -> int:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC  # 临时目录是公共的：不跟随别人放的符号链接
        try:
            try:
                return os.open(path, os.O_RDWR | os.O_CREAT | flags, 0o644)
            except PermissionError:  # 别的用户建的锁文件：只读打开也能加 flock
                return os.open(path, os.O_RDONLY | flags)
        except OSError as e:
            raise ServerError(f"无法打开仓库锁文件 {path}（仓库 {self.repository}）：{e}") from e

    def _unlock_repository(self) -> None:
        """持锁时先删锁文件再关闭，临时目录里不留文件；等在旧文件上的一方锁住后会发现它已不在目录里，重新打开。"""
        fd, self._lock_fd = self._lock_fd, None
        if fd is None:
            return
        try:
            os.unlink(repository_lock_path(self.repository))
        except OSError:
            pass
        os.close(fd)

    def _start(self) -> None:
        self._exited_at_start = False
        check_numpy()
        binary, backend, stub, libs, libdir = self._paths()
        self._tmp = tempfile.mkdtemp(prefix="ugt-triton-")
        backend_dir = os.path.join(self._tmp, "backends")
        shutil.copytree(backend, os.path.join(backend_dir, "python"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, os.path.join(backend_dir, "python", "triton_python_backend_stub"))
        c = self.config
        self.http_port = c.http_port or free_port(c.host)
        self.grpc_port = c.grpc_port or free_port(c.host)
        self.metrics_port = c.metrics_port or free_port(c.host)
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, libs, env.get("LD_LIBRARY_PATH", "")]))
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env["UGT_PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("UGT_PYTHONPATH", "")]))
        # 过载丢弃的共享状态按这个键分开（runtime/shedding.py），停止时删掉
        self._server_key = f"embedded{os.getpid()}x{id(self):x}"
        env[shedding.SERVER_ENV] = self._server_key
        log_path = self._given_log_path or os.path.join(self._tmp, "tritonserver.log")
        self.log_path = log_path
        env.update(self._start_mps(log_path))
        self._log_file = open(log_path, "ab")
        self.process = subprocess.Popen(self._command(binary, backend_dir), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready()
        except ServerError as e:
            if self.mps is not None and c.mps == "auto":  # 自动开的 MPS 可能就是原因：说出来，别让人去猜
                raise ServerError(f"{e}\n（server.mps=auto 开了 CUDA MPS（{self.mps_state['reason']}）；"
                                  f"若怀疑是 MPS 的问题，用 server.mps=false 再试；MPS 日志在 {self.mps.log_dir}）") from e
            raise
        log.info("Triton 就绪：HTTP %s  gRPC %s  metrics %s", self.http_url, self.grpc_url, self.metrics_url)
        if self.mps is not None:
            # MPS 服务器在第一个 CUDA 客户端连上时才起：引擎在 GPU 上时，就绪时它应该已在
            servers = self.mps.servers()
            if servers:
                log.info("CUDA MPS：服务器进程 %s（客户端记录在 %s/server.log）", servers, self.mps.log_dir)
            else:
                log.warning("开着 MPS（%s），但没有 CUDA 进程经它运行（引擎不在 GPU 上？）；日志 %s",
                            self.mps_state.get("reason"), self.mps.log_dir)
        self._stubs = self._by_model(self._scan_stubs())
        if self.config.supervise:
            self._stop_event = threading.Event()
            self._supervisor = threading.Thread(target=self._supervise, name="ugt-triton-supervisor", daemon=True)
            self._supervisor.start()

    def _start_mps(self, log_path: str) -> Dict[str, str]:
        """按 server.mps 决定是否起 MPS 守护进程；返回 tritonserver 要加的环境变量（存根由它起，继承这两个变量）。
        auto 时守护进程起不来只记警告、不用 MPS 照常启动（true 时照样报错）。"""
        c = self.config
        if self._mps_off_reason:  # 上一次开着 MPS 没起来（见 start）
            active, reason = False, self._mps_off_reason
        else:
            active, reason = mps_mod.decide(c.mps, self.repository)
        self.mps_state = {"setting": c.mps, "active": active, "reason": reason}
        log.info("CUDA MPS：%s（%s）", "开" if active else "不开", reason)
        if not active:
            return {}
        # 管道放在短的临时目录里（unix 套接字路径有长度上限）；日志放在服务器日志旁边，停止后还在
        daemon = MpsDaemon(os.path.join(self._tmp, "mps"), os.path.join(os.path.dirname(log_path), "mps_log"))
        try:
            daemon.start()
        except (ServerError, MissingDependencyError, OSError, subprocess.SubprocessError) as e:
            if c.mps != "auto":
                raise
            daemon.started = True  # 可能起了一半（例如 -d 超时）：照样让它退出，不留下守护进程
            daemon.stop()
            log.warning("server.mps=auto：%s；不用 MPS 启动", e)
            self.mps_state.update(active=False, reason=f"{reason}；但守护进程起不来：{str(e)[:200]}")
            return {}
        self.mps = daemon
        return daemon.env()

    # ---- 监护：重启死掉的 python backend 存根 ----
    def stub_processes(self) -> Dict[str, List[int]]:
        """{模型名: [存根进程 pid]}（python backend 的 triton_python_backend_stub，命令行里带模型目录）。"""
        return {m: [st.pid for st in stubs] for m, stubs in self._by_model(self._scan_stubs()).items()}

    def _scan_stubs(self) -> List[StubProcess]:
        """tritonserver 当前活着的存根（僵尸与已退出的读不到命令行，不在其中）；顺便记入 _known_stubs。"""
        import psutil

        out: List[StubProcess] = []
        if self.process is None:
            return out
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return out
        for p in children:
            try:
                cmd, created = p.cmdline(), p.create_time()
            except psutil.Error:
                continue
            if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
                region = cmd[2] if len(cmd) > 2 and _SHM_REGION_RE.match(cmd[2]) else ""
                instance = cmd[8] if len(cmd) > 8 else ""
                model = os.path.basename(os.path.dirname(os.path.dirname(cmd[1])))
                st = StubProcess(p.pid, model, instance, region, created)
                self._known_stubs[st.pid] = st
                if instance != model:
                    out.append(st)
        return out

    @staticmethod
    def _by_model(stubs: List[StubProcess]) -> Dict[str, List[StubProcess]]:
        out: Dict[str, List[StubProcess]] = {}
        for st in stubs:
            out.setdefault(st.model, []).append(st)
        return out

    def _stub_alive(self, st: StubProcess) -> bool:
        """pid 还在且是同一个进程（创建时间相同），且不是僵尸。"""
        import psutil

        try:
            p = psutil.Process(st.pid)
            return abs(p.create_time() - st.create_time) < 1e-3 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _supervise(self) -> None:
        # 要一直有活存根的模型：启动时有存根的，加上之后出现了存根的（上线加载的新版本）；被有意卸载的（上线后的旧版本）不再管。
        # 重新加载失败的模型也会按退避再试，而不是从此不管
        while not self._stop_event.wait(self.config.supervise_interval_s):
            live = self._by_model(self._scan_stubs())
            for model in sorted(set(self._stubs) | set(live)):
                if self._stop_event.is_set():
                    return
                known = self._stubs.get(model, [])
                fresh = [st for st in live.get(model, []) if st.pid not in {k.pid for k in known}]
                if fresh:  # 新的存根：模型刚被（别人）加载或重新加载，记下它们，不算死
                    self._stubs[model] = live[model]
                    continue
                dead = [st for st in known if not self._stub_alive(st)]
                if (known and not dead) or time.monotonic() < self._retry_at.get(model, 0.0):
                    continue
                if model not in self._failures:
                    state = self._model_state(model)
                    if state in (None, "LOADING"):
                        continue  # 读不到状态（服务器忙）或正在加载：下一轮再看
                    if state != "READY":
                        # 存根死了而模型在卸载或已卸载：是有意的（卸载时 Triton 先改状态再停存根）；存根被杀时模型照样是 READY
                        log.info("模型 %s 已卸载（%s），不再监护", model, state or "不在仓库里")
                        self._stubs.pop(model, None)
                        self._remove_shm_regions(dead)
                        continue
                log.warning("模型 %s 的 python backend 存根进程已退出（%s），重新加载该模型",
                            model, [st.pid for st in dead] or "没有存根")
                self.restarts[model] = self.restarts.get(model, 0) + 1
                ok = self._reload(model)
                self._stubs[model] = [st for st in self._scan_stubs() if st.model == model]
                self._remove_shm_regions(dead)
                if ok:
                    self._failures.pop(model, None)
                    self._retry_at.pop(model, None)
                else:  # 连续失败按 2^n 倍间隔退避（最多 30 s），不在一个加载不了的模型上空转
                    n = self._failures[model] = self._failures.get(model, 0) + 1
                    self._retry_at[model] = time.monotonic() + min(30.0, self.config.supervise_interval_s * 2 ** n)

    def _model_state(self, model: str) -> Optional[str]:
        """模型仓库索引里 model 的状态（READY / LOADING / UNLOADING / UNAVAILABLE）；读不到时 None。"""
        req = urllib.request.Request(f"http://{self.http_url}/v2/repository/index", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                index = json.loads(r.read())
        except (urllib.error.URLError, OSError, ValueError):
            return None
        return next((m.get("state", "") for m in index if m.get("name") == model), "")

    def _reload(self, model: str) -> bool:
        """先卸载再加载。只发 load 不够：explicit 模式下 Triton 只在模型目录比上次加载时有改动才真的重新加载
        （仓库目录的修改时间；新仓库里存根首次写 __pycache__ 恰好算一次改动，所以以前只在第一次被杀时有效），
        否则 load 立即返回 200 而死掉的存根还在，请求一直得到 “Stub process is not healthy”。
        卸载会连带卸载依赖它的 ensemble，load 完成后 Triton 再把 ensemble 加载回来。"""
        unload = self._post(f"/v2/repository/models/{model}/unload")
        status = self._post(f"/v2/repository/models/{model}/load")
        if status != 200:
            log.error("重新加载 %s 失败（unload HTTP %s，load HTTP %s）；日志末尾：\n%s", model, unload, status,
                      self.log_tail(10))
        return status == 200

    def _remove_shm_regions(self, stubs: List[StubProcess]) -> None:
        """删掉已死存根的共享内存区。只删：命令行里记下的、名字符合 python backend 格式的、
        属于已确认死掉的那个进程（pid + 创建时间）的区；活存根的区名各不相同（UUID），不会被碰到。
        Triton 卸载旧实例时通常自己会删；它没删（例如 tritonserver 被杀）时由这里补上。"""
        for st in stubs:
            if not st.shm_region or self._stub_alive(st):
                continue
            path = os.path.join(SHM_DIR, st.shm_region)
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("无法删除死存根 %s（模型 %s）的共享内存区 %s：%s", st.pid, st.model, path, e)
                continue  # 留在 _known_stubs 里，stop() 再试一次
            else:
                self.removed_shm_regions.append(st.shm_region)
                log.info("删除了死存根 %s（模型 %s）留下的共享内存区 %s", st.pid, st.model, path)
            self._known_stubs.pop(st.pid, None)

    def _kill_orphan_stubs(self, timeout: float = 5.0) -> None:
        """tritonserver 被杀后它的存根还会活一阵（直到自己发现父进程没了）：按记录逐个确认身份后杀掉。"""
        import psutil

        procs = []
        for st in list(self._known_stubs.values()):
            if not self._stub_alive(st):
                continue
            try:
                p = psutil.Process(st.pid)
                p.kill()
                procs.append(p)
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=timeout)

    def _post(self, path: str) -> int:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def own_pids(self) -> set:
        """本服务器的进程号：tritonserver、它的存根、本服务器起的 MPS 服务器（GPU 进程快照据此区分别人的进程）。"""
        pids = {self.process.pid} if self.process is not None else set()
        pids |= {p for stubs in self.stub_processes().values() for p in stubs}
        if self.mps is not None:
            try:
                pids |= set(self.mps.servers())
            except (OSError, subprocess.SubprocessError):  # 守护进程不回答：只少 MPS 服务器这一个
                pass
        return pids

    def crash_lines(self, limit: int = 5) -> List[str]:
        """日志里崩溃的痕迹（“行号: 内容”）：Triton 的崩溃处理打印的 Signal (6/7/11…) received，glibc 的堆错误。

        为什么要看日志：Triton 2.51 在堆损坏时，崩溃处理函数在信号里再分配内存而卡在 malloc 的锁上，进程不退出、
        请求不再回答，外面看只是“卡住”（2026-11-28 H200；原因见 bench/trace.SAFE_TRACE_VERSION）。正常退出的 SIGTERM / SIGINT 不算。"""
        out: List[str] = []
        try:
            with open(self.log_path, "rb") as f:
                for i, raw in enumerate(f, 1):
                    line = raw.decode(errors="replace").strip()
                    if _CRASH_RE.search(line):
                        out.append(f"{i}: {line[:200]}")
                        if len(out) >= limit:
                            break
        except (OSError, TypeError):
            pass
        return out

    def log_tail(self, n: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return b"".join(f.readlines()[-n:]).decode(errors="replace")
        except (OSError, TypeError):
            return ""

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

    def is_ready(self) -> bool:
        if self._get("/v2/health/ready") != 200:
            return False
        return all(self._get(f"/v2/models/{m}/ready") == 200 for m in self.ready_models)

    def _wait_ready(self) -> None:
        deadline = time.time() + self.config.startup_timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                self._exited_at_start = True
                raise ServerError(f"tritonserver 退出（返回码 {self.process.returncode}）。日志末尾：\n{self.log_tail()}")
            if self.is_ready():
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver {self.config.startup_timeout_s:.0f}s 内未就绪。日志末尾：\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        if self._stop_event is not None:
            self._stop_event.set()
            if self._supervisor is not None:
                self._supervisor.join(timeout=5)
        if self.process is not None and self.process.poll() is None:
            self._scan_stubs()  # 记下所有存根的共享内存区，以防下面要 SIGKILL
        p, self.process = self.process, None
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            except ProcessLookupError:
                pass
        # 正常退出时 Triton 自己删共享内存区；被杀（或超时被 SIGKILL）时没人删，存根也可能还活着
        self._kill_orphan_stubs()
        if self.mps is not None:  # 它的客户端（tritonserver 与存根）都已退出
            self.mps.stop()
            self.mps = None
        self._remove_shm_regions(list(self._known_stubs.values()))
        self._known_stubs.clear()
        self._stubs = {}
        if getattr(self, "_server_key", None):
            shedding.remove_states(self._server_key)
        self._unlock_repository()
        if self._log_file:
            self._log_file.close()
            self._log_file = None
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __enter__(self) -> "EmbeddedTritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
