"""CUDA MPS（多进程服务）：内嵌服务器自己起、自己停的一个 MPS 控制守护进程（server.mps=auto 时按仓库决定，true 总是开）。

为什么：引擎的每个实例是一个 python backend 存根进程。没有 MPS 时几个进程的 CUDA 上下文在 GPU 上分时，
小 batch 的内核占不满 SM 也不能同时跑；开着 MPS 时它们的内核可以同时跑。测得中位数不比不开差、有时好很多，
但重复间的范围更宽（docs/limits.md 的 MPS 一节）；要稳定时用 server.mps=false。

auto（默认）只在确实有几个进程共用一块 GPU 时开：引擎是 python 后端（每个实例一个进程；原生后端的实例是
tritonserver 进程里的线程，同一个 CUDA 上下文，MPS 没有用处）、实例在 GPU 上、每块 GPU 至少 2 个，
PATH 里有控制程序，且没有别的 MPS 守护进程（环境变量里的管道、默认管道、正在运行的 nvidia-cuda-mps-* 进程）。
决定与原因记在服务器上（EmbeddedTritonServer.mps_state），压测报告里写出来。auto 开着 MPS 而 tritonserver 启动时退出
（例如这台机器上 MPS 的客户端连不上）时，服务器不用 MPS 再启动一次（server.py）。

只起用户态的守护进程（管道与日志目录是私有的），不改卡的任何设置（计算模式、时钟都不动）；服务器停止时退出。
这块 GPU 已由别的 MPS 守护进程或独占计算模式管着时不要开（CUDA 客户端会连错或连不上）。"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Tuple

from algorithm.errors import MissingDependencyError, ServerError

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"
# 默认的 MPS 管道目录：有人（运维、别的服务）已经用默认设置起了守护进程时，这里有 control 套接字
DEFAULT_PIPE_DIR = "/tmp/nvidia-mps"


def engine_processes_per_gpu(repository: str, engine: str = "ugt_engine") -> Tuple[int, str]:
    """仓库里引擎模型在每块 GPU 上有几个进程（python 后端的 KIND_GPU 实例数；不是则 0），与一句说明。"""
    from algorithm.serving.triton_config import parse_pbtxt, pb

    path = os.path.join(repository, engine, "config.pbtxt")
    try:
        with open(path) as f:
            mc = parse_pbtxt(f.read())
    except FileNotFoundError:
        return 0, f"仓库里没有 {engine}/config.pbtxt"
    except Exception as e:  # noqa: BLE001  读不懂的配置：不开 MPS，照常让 Triton 报它的错
        return 0, f"{path} 解析失败（{type(e).__name__}: {e}）"
    if mc.backend != "python":
        return 0, f"引擎是原生后端（{mc.platform or mc.backend}），实例是同一进程里的线程"
    counts = [g.count for g in mc.instance_group if g.kind == pb().ModelInstanceGroup.KIND_GPU]
    if not counts:
        return 0, "引擎实例不在 GPU 上"
    n = max(counts)
    return n, f"引擎 {n} 个实例（各一个进程）共用一块 GPU"


def _alive(pid: int) -> bool:
    """进程还在（僵尸不算：守护进程转入后台后父进程是 init，会被收走）。"""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def running_mps_processes() -> List[int]:
    """本机（本进程看得到的）正在运行的 MPS 控制 / 服务器进程（nvidia-cuda-mps-control / -server）的进程号。
    用途：auto 时不在别人的（或以前被杀掉的运行留下的）守护进程旁边再起一个——同一块 GPU 上只能有一个 MPS 服务器
    为一个用户服务，另起的客户端会连不上或卡住。"""
    import psutil

    return [p.pid for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("nvidia-cuda-mps")]


def decide(setting: str, repository: str) -> Tuple[bool, str]:
    """server.mps 的取值 + 仓库 -> (是否起 MPS 守护进程, 原因)。true / false 照办；auto 见模块文档。"""
    if setting == "true":
        return True, "server.mps=true"
    if setting == "false":
        return False, "server.mps=false"
    n, why = engine_processes_per_gpu(repository)
    if n < 2:
        return False, f"auto：{why}"
    if not shutil.which(CONTROL):
        return False, f"auto：{why}，但 PATH 里没有 {CONTROL}"
    external = os.environ.get("CUDA_MPS_PIPE_DIRECTORY")
    if not external and os.path.exists(os.path.join(DEFAULT_PIPE_DIR, "control")):
        external = DEFAULT_PIPE_DIR
    if external:
        return False, f"auto：已有别的 MPS 守护进程（管道 {external}），不另起；要用它请自己保证客户端连得上"
    others = running_mps_processes()
    if others:
        return False, (f"auto：已有 MPS 进程在运行（pid {', '.join(map(str, others[:5]))}，可能是别人的或以前的运行留下的），"
                       "不另起；确认没人用后可以 echo quit | nvidia-cuda-mps-control 停掉它（管道目录不是默认的要设 CUDA_MPS_PIPE_DIRECTORY）")
    return True, f"auto：{why}"


class MpsDaemon:
    """一个 MPS 控制守护进程。pipe_dir 是 unix 套接字所在目录（路径不能太长，放在临时目录里），
    log_dir 是它的日志（control.log、server.log：记下每个连上的客户端进程）。"""

    def __init__(self, pipe_dir: str, log_dir: str, binary: Optional[str] = None):
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.binary = binary or shutil.which(CONTROL)
        self.started = False
        self.pids: List[int] = []  # 本守护进程起的 nvidia-cuda-mps-* 进程（启动前后进程列表之差；停止时等它们退出）

    def env(self) -> Dict[str, str]:
        """CUDA 进程（tritonserver 与它起的存根）经这两个变量找到本守护进程。"""
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def _run(self, args: List[str], stdin: Optional[str] = None, timeout: float = 30.0):
        return subprocess.run([self.binary, *args], input=stdin, env={**os.environ, **self.env()},
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> "MpsDaemon":
        if not self.binary:
            raise MissingDependencyError(
                f"server.mps=true 需要 {CONTROL}（NVIDIA 驱动自带），PATH 里没有；这台机器不能开 CUDA MPS，用 server.mps=false")
        os.makedirs(self.pipe_dir, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        before = set(running_mps_processes())
        r = self._run(["-d"])  # -d：转入后台，立即返回
        if r.returncode != 0:
            raise ServerError(f"MPS 守护进程起不来（{self.binary} -d 退出码 {r.returncode}）："
                              f"{(r.stderr or r.stdout).strip() or '没有输出'}；日志在 {self.log_dir}")
        self.started = True
        self.pids = sorted(set(running_mps_processes()) - before)
        log.info("CUDA MPS 守护进程已启动（管道 %s，日志 %s）", self.pipe_dir, self.log_dir)
        return self

    def command(self, cmd: str, timeout: float = 10.0) -> str:
        """向守护进程发一条命令（与 `echo cmd | nvidia-cuda-mps-control` 相同），返回它的回答。"""
        r = self._run([], stdin=cmd + "\n", timeout=timeout)
        return r.stdout.strip()

    def servers(self) -> List[int]:
        """正在运行的 MPS 服务器进程（第一个 CUDA 客户端连上时才起）；空 = 还没有 CUDA 进程经它运行。"""
        return [int(x) for x in self.command("get_server_list").split() if x.isdigit()]

    def stop(self, wait_s: float = 10.0) -> None:
        """让守护进程退出（先停掉它的客户端：服务器停止之后调用）并等它与它的 MPS 服务器进程真的退出（最多 wait_s 秒）：
        quit 是异步的，紧接着启动的下一个服务器（multirun 的下一组）在 auto 时会把还没退完的进程当成别人的守护进程而不开 MPS。
        失败只记日志，不抛出。"""
        if not self.started:
            return
        self.started = False
        pids = set(self.pids)
        try:
            pids |= set(self.servers())
            self.command("quit")
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("MPS 守护进程没有正常退出（%s: %s）；管道目录 %s", type(e).__name__, e, self.pipe_dir)
        deadline = time.monotonic() + wait_s
        while pids and time.monotonic() < deadline:
            pids = {p for p in pids if _alive(p)}
            if pids:
                time.sleep(0.05)
        if pids:
            log.warning("MPS 进程 %s 在 %.0f s 内没有退出", sorted(pids), wait_s)


__all__ = ["CONTROL", "MpsDaemon", "decide", "engine_processes_per_gpu", "running_mps_processes"]
