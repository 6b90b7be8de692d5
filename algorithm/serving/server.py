"""内嵌 Triton：直接运行 nvidia-pytriton 自带的 tritonserver 二进制（不经 PyTriton 的 Python API）。

做法（CPU 机器与 H100 机器上都验证过）：
- 把 python backend 与当前 Python 版本的 stub 复制到一个临时 backend 目录；
- LD_LIBRARY_PATH = libpython 所在目录 + nvidia_pytriton.libs；
- stub 的嵌入式解释器不读 PYTHONPATH，而是按 PATH 上的 python3 确定 sys.prefix：
  所以把当前解释器（venv）的 bin 目录放在 PATH 最前，stub 才会用 venv 里的 numpy（<2）；
  本包的路径经 UGT_PYTHONPATH 传给 model.py；
- 默认所有端点只绑定 127.0.0.1，端口自动选空闲的，model control mode = none；
- 等到 ensemble 就绪才返回；stop() 先 SIGTERM 再 SIGKILL。可作上下文管理器。
"""
from __future__ import annotations

import logging
import os
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
from typing import Dict, List, Optional

from algorithm.serving.config import ServerConfig
from algorithm.serving.errors import MissingDependencyError, ServerError

log = logging.getLogger(__name__)
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        self.extra_args = list(extra_args or [])
        self.process: Optional[subprocess.Popen] = None
        self._tmp: Optional[str] = None
        self._log_file = None
        self.http_port = self.grpc_port = self.metrics_port = 0
        self._stop_event: Optional[threading.Event] = None
        self._supervisor: Optional[threading.Thread] = None
        self._stubs: Dict[str, List[int]] = {}
        self.restarts: Dict[str, int] = {}  # 监护线程重新加载各模型的次数

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
        return [binary, f"--model-repository={self.repository}", f"--backend-directory={backend_dir}",
                *(["--model-control-mode=explicit", "--load-model=*"] if c.supervise else ["--model-control-mode=none"]),
                "--strict-readiness=true", "--exit-on-error=true",
                f"--http-address={c.host}", f"--http-port={self.http_port}",
                f"--grpc-address={c.host}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={c.host}", f"--metrics-port={self.metrics_port}",
                "--allow-gpu-metrics=false", f"--log-verbose={c.log_verbose}", *self.extra_args]

    def start(self) -> "EmbeddedTritonServer":
        if self.process is not None:
            raise ServerError("服务器已在运行")
        if not os.path.isdir(self.repository):
            raise ServerError(f"模型仓库不存在：{self.repository}（先运行 python scripts/build.py）")
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
        log_path = self.log_path or os.path.join(self._tmp, "tritonserver.log")
        self.log_path = log_path
        self._log_file = open(log_path, "ab")
        self.process = subprocess.Popen(self._command(binary, backend_dir), stdout=self._log_file,
                                        stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Triton 就绪：HTTP %s  gRPC %s  metrics %s", self.http_url, self.grpc_url, self.metrics_url)
        if self.config.supervise:
            self._stop_event = threading.Event()
            self._stubs = self.stub_processes()
            self._supervisor = threading.Thread(target=self._supervise, name="ugt-triton-supervisor", daemon=True)
            self._supervisor.start()
        return self

    # ---- 监护：重启死掉的 python backend 存根 ----
    def stub_processes(self) -> Dict[str, List[int]]:
        """{模型名: [存根进程 pid]}（python backend 的 triton_python_backend_stub，命令行里带模型目录）。"""
        import psutil

        out: Dict[str, List[int]] = {}
        if self.process is None:
            return out
        for p in psutil.Process(self.process.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if cmd and cmd[0].endswith("triton_python_backend_stub") and len(cmd) > 1:
                model = os.path.basename(os.path.dirname(os.path.dirname(cmd[1])))
                out.setdefault(model, []).append(p.pid)
        return out

    def _alive(self, pid: int) -> bool:
        import psutil

        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    def _supervise(self) -> None:
        while not self._stop_event.wait(self.config.supervise_interval_s):
            for model, pids in list(self._stubs.items()):
                if all(self._alive(p) for p in pids):
                    continue
                log.warning("模型 %s 的 python backend 存根进程已退出（%s），重新加载该模型", model, pids)
                self.restarts[model] = self.restarts.get(model, 0) + 1
                status = self._post(f"/v2/repository/models/{model}/load")
                if status != 200:
                    log.error("重新加载 %s 失败（HTTP %s）；日志末尾：\n%s", model, status, self.log_tail(10))
                self._stubs = self.stub_processes()

    def _post(self, path: str) -> int:
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=b"{}", method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except (urllib.error.URLError, OSError):
            return 0

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
