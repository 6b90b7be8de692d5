"""CUDA MPS（多进程服务）：内嵌服务器自己起、自己停的一个 MPS 控制守护进程（server.mps=true）。

为什么：引擎的每个实例是一个 python backend 存根进程。没有 MPS 时几个进程的 CUDA 上下文在 GPU 上分时，
小 batch 的内核占不满 SM 也不能同时跑；开着 MPS 时它们的内核可以同时跑。H100 上（ugt_base fp16，引擎 2 实例）
SLA 速率 1000 -> 1237.5 req/s、c=64 1855 -> 1958 req/s（各 3 次，benchmarks/h100-2026-11-27/machine6）。

只起用户态的守护进程（管道与日志目录是私有的），不改卡的任何设置（计算模式、时钟都不动）；服务器停止时退出。
这块 GPU 已由别的 MPS 守护进程或独占计算模式管着时不要开（CUDA 客户端会连错或连不上）。"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from typing import Dict, List, Optional

from algorithm.errors import MissingDependencyError, ServerError

log = logging.getLogger(__name__)

CONTROL = "nvidia-cuda-mps-control"


class MpsDaemon:
    """一个 MPS 控制守护进程。pipe_dir 是 unix 套接字所在目录（路径不能太长，放在临时目录里），
    log_dir 是它的日志（control.log、server.log：记下每个连上的客户端进程）。"""

    def __init__(self, pipe_dir: str, log_dir: str, binary: Optional[str] = None):
        self.pipe_dir = pipe_dir
        self.log_dir = log_dir
        self.binary = binary or shutil.which(CONTROL)
        self.started = False

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
        r = self._run(["-d"])  # -d：转入后台，立即返回
        if r.returncode != 0:
            raise ServerError(f"MPS 守护进程起不来（{self.binary} -d 退出码 {r.returncode}）："
                              f"{(r.stderr or r.stdout).strip() or '没有输出'}；日志在 {self.log_dir}")
        self.started = True
        log.info("CUDA MPS 守护进程已启动（管道 %s，日志 %s）", self.pipe_dir, self.log_dir)
        return self

    def command(self, cmd: str, timeout: float = 10.0) -> str:
        """向守护进程发一条命令（与 `echo cmd | nvidia-cuda-mps-control` 相同），返回它的回答。"""
        r = self._run([], stdin=cmd + "\n", timeout=timeout)
        return r.stdout.strip()

    def servers(self) -> List[int]:
        """正在运行的 MPS 服务器进程（第一个 CUDA 客户端连上时才起）；空 = 还没有 CUDA 进程经它运行。"""
        return [int(x) for x in self.command("get_server_list").split() if x.isdigit()]

    def stop(self) -> None:
        """让守护进程退出（先停掉它的客户端：服务器停止之后调用）；失败只记日志，不抛出。"""
        if not self.started:
            return
        self.started = False
        try:
            self.command("quit")
        except (OSError, subprocess.SubprocessError) as e:
            log.warning("MPS 守护进程没有正常退出（%s: %s）；管道目录 %s", type(e).__name__, e, self.pipe_dir)


__all__ = ["CONTROL", "MpsDaemon"]
