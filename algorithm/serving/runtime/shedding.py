"""过载时的丢弃（load shedding）：只在引擎前的队列比“排得下”的更长时，在前处理就拒绝新请求。

为什么不用 Triton 的队列策略：排队超时是一个固定的数（以前 15 ms），两核 CPU 上正常的排队就超过它，健康的流量被拒；
max_queue_size 满时被拒的请求不唤醒动态批处理器（triton_config._set_batching），而且任何队列策略都关掉预取。

做法（只依赖 numpy 与标准库，前处理进程不导入 torch）：
- 前处理把交出的时刻（CLOCK_MONOTONIC，微秒；同一台机器上各进程共用）写在打包输入的最后一列（runtime/packed.py）。
- 引擎每次 execute 量出这批请求在它前面等了多久（最老的一个），以及每个请求的服务时间（execute 的毫秒 / 请求数，
  指数平均），写进共享的一小块内存（每个实例一行，/dev/shm 下的文件，mmap）。
- 引擎量到的是队头的等待，队尾（新来的请求）要等的是它乘以接受与处理的速度之比（各前处理实例发布自己接受的速度）：
  前处理按队尾的估计判断，否则过载开始时要到队头也超过上限才拒绝，那时队尾已经是上限的两倍。
- 上限 = max(export.target_latency_ms, 队列深度 x 服务时间)：队列深度是 triton.shed_queue_depth（0 = 引擎实例数 x
  最大的 preferred batch），服务时间是各实例实测的合起来（1 / 各实例每毫秒请求数之和）。闭环的 N 个客户端在引擎前
  最多排 N 个，N 不超过深度时引擎是瓶颈也不会被拒；开环的过载让队列一直变长，等待超过上限后前处理开始拒绝
  （UNAVAILABLE，不编码、几乎不花时间），队列缩回上限以下就重新接受。
- 引擎对等待超过上限的请求直接拒绝（漏过前处理的，例如刚开始过载的那一批），被接受的请求的等待因此有界。
只有 python 运行器托管引擎且打包输入时可用（原生后端没有这一列，用 triton.queue_timeout_us）。
"""
from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import tempfile
import time
import zlib
from typing import Optional, Sequence, Tuple

import numpy as np

from algorithm.errors import OverloadError

SLOTS = 64
# 每行：发布时刻（秒，monotonic）、这批最老请求的等待（毫秒）、每毫秒处理的请求数（引擎的行）、每毫秒接受的请求数
# （前处理的行）、实例名的 crc32。速度都是指数平均
FIELDS = 5
T_PUB, WAIT_MS, RATE, ARRIVAL, NAME = range(FIELDS)
RATE_ALPHA = 0.2
# 服务时间的读数多久不更新就不算（实例卸载 / 空闲很久）；等待的读数的有效期是上限本身（至少 MIN_FRESH_S）
RATE_FRESH_S = 30.0
ARRIVAL_FRESH_S = 1.0
ARRIVAL_WINDOW_S = 0.02  # 前处理每隔这么久把这段时间接受的个数折成速度
# 接受速度按时间加权平均（时间常数）：闭环里请求成批到达（一批做完、几十个客户端同时发下一个），短窗口的速度是平均的
# 好几倍；要几个 execute 周期（CPU 上一批 64 个约 150 ms）平均下来，闭环的到达才不超过处理速度
ARRIVAL_TAU_S = 1.0
MIN_FRESH_S = 0.05
ENGINE_FACTOR = 1.0
PREFIX = "ugt-shed-"
SERVER_ENV = "UGT_SERVER_KEY"
VERSION_SEP = "__"  # 与 rollout.SEP 相同（runtime 不导入 rollout；tests 检查两者一致）


def state_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def server_key() -> str:
    """这个服务器的键：内嵌服务器经环境变量传入；NVIDIA 容器里是 tritonserver 的进程号（存根是它的子进程）。"""
    return os.environ.get(SERVER_ENV) or str(os.getppid())


def state_path(model_dir: str, server: Optional[str] = None) -> str:
    """同一个服务器、同一个版本的前处理与引擎算出同一个文件：model_dir 是 <仓库>/<步骤名>[__<版本>]/<版本号>，
    键是仓库与版本后缀（上线的新版本与旧版本各用各的，rollout.served_name）。

    键含服务器的键（server_key），两个服务器用同一个仓库也不共用。"""
    folder = os.path.dirname(os.path.abspath(model_dir))
    tag = os.path.basename(folder).partition(VERSION_SEP)[2]
    root = os.path.realpath(os.path.dirname(folder))
    key = hashlib.sha1(f"{root}\0{tag}".encode()).hexdigest()[:12]
    return os.path.join(state_dir(), f"{PREFIX}{server or server_key()}-{key}")


def remove_states(server: str) -> None:
    """服务器停止后删掉它的状态文件（容器里随容器消失，内嵌服务器由 server.py 调用）。"""
    d = state_dir()
    for f in os.listdir(d):
        if f.startswith(f"{PREFIX}{server}-"):
            try:
                os.unlink(os.path.join(d, f))
            except OSError:
                pass


def queue_depth(config) -> int:
    """triton.shed_queue_depth；0 = 引擎实例数 x 最大的 preferred batch（每个实例一整批在排队）。"""
    t = config.triton
    return t.shed_queue_depth or t.instance_count * max(t.preferred_batch_sizes)


def describe(config, hosted: bool) -> dict:
    """报告与日志用：这次运行的丢弃规则与它的数（hosted：引擎由 python 运行器托管且打包输入）。"""
    t = config.triton
    if not t.load_shedding or not hosted:
        why = "triton.load_shedding=false" if not t.load_shedding else "原生后端 / 不打包输入：没有时刻列"
        rule = (f"Triton 的排队超时 {t.queue_timeout_us / 1000:g} ms" if t.queue_timeout_us else "不丢弃（队列无界）")
        return {"enabled": False, "why": why, "rule": rule}
    depth = queue_depth(config)
    return {"enabled": True, "queue_depth": depth, "target_latency_ms": config.export.target_latency_ms,
            "rule": f"引擎前的等待估计 > max({config.export.target_latency_ms:g} ms, {depth} x 实测的每请求服务时间) 时拒绝"}


class SharedLoad:
    """各引擎实例的最近读数（一个 mmap 的 [SLOTS, FIELDS] float64 数组）。每行只由一个实例写，读的一方不加锁：
    8 字节对齐的写在 x86-64 上不会读到一半，读到的最坏是上一批的数。"""

    def __init__(self, path: str, target_ms: float, depth: int):
        self.path, self.target_ms, self.depth = path, float(target_ms), int(depth)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = SLOTS * FIELDS * 8
            if os.fstat(fd).st_size < size:
                os.ftruncate(fd, size)
            self._mm = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.rows = np.frombuffer(self._mm, dtype=np.float64).reshape(SLOTS, FIELDS)

    def claim(self, instance: str) -> int:
        """给实例一行（同名的实例重启后还是同一行）：文件锁下找名字相同的行，没有就取第一个空行。"""
        h = float(zlib.crc32(instance.encode()) or 1)
        with open(self.path, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                same = np.nonzero(self.rows[:, NAME] == h)[0]
                if same.size:
                    return int(same[0])
                free = np.nonzero(self.rows[:, NAME] == 0)[0]
                slot = int(free[0]) if free.size else int(h) % SLOTS
                self.rows[slot] = 0.0
                self.rows[slot, NAME] = h
                return slot
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def limit_ms(self, now: float) -> Optional[float]:
        """上限 = max(目标延迟, 深度 x 服务时间)；还没有任何实测的服务时间时 None（没有依据，不丢弃）。"""
        rate = self._rate(now)
        return max(self.target_ms, self.depth / rate) if rate > 0 else None

    def _rate(self, now: float) -> float:
        """各引擎实例每毫秒处理的请求数之和：最近 RATE_FRESH_S 秒发布过的实例；都没有（空闲很久）时用最后记下的。"""
        r = self.rows
        known = r[:, RATE] > 0
        fresh = known & (now - r[:, T_PUB] < RATE_FRESH_S)
        return float(r[fresh if fresh.any() else known, RATE].sum())

    def overloaded(self, now: float) -> Optional[Tuple[float, float]]:
        """新请求估计要等的（队头的等待 x max(1, 到达 / 处理的速度)）超过上限时返回 (估计毫秒, 上限毫秒)，否则 None。
        读数过期（引擎空着或卸载了）不算。"""
        limit = self.limit_ms(now)
        if limit is None:
            return None
        fresh = max(limit / 1e3, MIN_FRESH_S)
        r = self.rows
        recent = (r[:, T_PUB] > 0) & (now - r[:, T_PUB] < fresh)
        if not recent.any():
            return None
        rate = self._rate(now)
        i = int(np.argmax(np.where(recent, r[:, WAIT_MS], -1.0)))
        arrival = float(r[(r[:, T_PUB] > 0) & (now - r[:, T_PUB] < ARRIVAL_FRESH_S), ARRIVAL].sum())
        ratio = arrival / rate
        wait = float(r[i, WAIT_MS]) * max(1.0, ratio)
        return (wait, limit) if wait > limit else None

    def publish_wait(self, slot: int, now: float, wait_ms: float) -> None:
        self.rows[slot, WAIT_MS] = wait_ms
        self.rows[slot, T_PUB] = now

    def publish_arrival(self, slot: int, now: float, arrival: float, dt: float) -> None:
        """dt 秒窗口里的接受速度并进时间加权平均：窗口越长权重越大（空闲的长窗口与成批到达的短窗口按时长计）。"""
        row = self.rows[slot]
        a = 1.0 - float(np.exp(-dt / ARRIVAL_TAU_S))
        row[ARRIVAL] = arrival if row[T_PUB] <= 0 else (1 - a) * row[ARRIVAL] + a * arrival
        row[T_PUB] = now

    def publish_rate(self, slot: int, requests: int, execute_ms: float) -> None:
        if requests > 0 and execute_ms > 0:
            row, rate = self.rows[slot], requests / execute_ms
            row[RATE] = rate if row[RATE] <= 0 else (1 - RATE_ALPHA) * row[RATE] + RATE_ALPHA * rate


def now_us() -> int:
    return int(time.monotonic() * 1e6)


class Admission:
    """前处理一侧：过载时整次 execute 的请求都得到 OverloadError（UNAVAILABLE）。状态文件打不开时不丢弃（只记一次）。"""

    def __init__(self, path: str, target_ms: float, depth: int):
        self.shared = SharedLoad(path, target_ms, depth)
        self.slot = self.shared.claim(f"preprocess-{os.getpid()}")
        self._window_start = time.monotonic()
        self._admitted = 0

    def check(self, n: int) -> Optional[OverloadError]:
        """n 个请求的一次 execute：过载时返回要给它们的错误；否则接受，记进接受的速度。"""
        now = time.monotonic()
        hit = self.shared.overloaded(now)
        if hit is None:
            self._admitted += n
        dt = now - self._window_start
        if dt >= ARRIVAL_WINDOW_S:
            self.shared.publish_arrival(self.slot, now, self._admitted / (dt * 1e3), dt)
            self._window_start, self._admitted = now, 0
        if hit is None:
            return None
        wait, limit = hit
        return OverloadError(f"过载：引擎前排队 {wait:.0f} ms，超过上限 {limit:.0f} ms（max(目标延迟, 队列深度 "
                             f"{self.shared.depth} x 实测服务时间)）；请稍后重试")


class EngineLoad:
    """引擎一侧：每批量出等待并发布、做完时记服务时间；等待超过 ENGINE_FACTOR x 上限的请求拒绝。"""

    def __init__(self, path: str, target_ms: float, depth: int, instance: str):
        self.shared = SharedLoad(path, target_ms, depth)
        self.slot = self.shared.claim(instance)
        self.shed = 0  # 本实例拒绝的请求数（测试与日志）

    def waits_ms(self, stamps_us: Sequence[Optional[int]]) -> np.ndarray:
        """各请求从前处理交出到现在的毫秒（没有时刻的记 0）。"""
        t = now_us()
        return np.asarray([(t - s) / 1e3 if s is not None else 0.0 for s in stamps_us], dtype=np.float64)

    def too_late(self, waits: np.ndarray) -> Tuple[np.ndarray, Optional[float]]:
        """等待超过 ENGINE_FACTOR x 上限的请求（布尔掩码）与上限（还没有实测时 None，谁也不拒）。"""
        limit = self.shared.limit_ms(time.monotonic())
        if limit is None:
            return np.zeros(waits.shape, bool), None
        return waits > ENGINE_FACTOR * limit, limit

    def record_wait(self, wait_ms: float) -> None:
        """这批最老的请求在引擎前等了多久（submit 时发布）。"""
        self.shared.publish_wait(self.slot, time.monotonic(), wait_ms)

    def record_rate(self, requests: int, execute_ms: float) -> None:
        """这批的请求数与 execute 的墙钟毫秒（做完时记，指数平均成每毫秒请求数）。"""
        self.shared.publish_rate(self.slot, requests, execute_ms)


__all__ = ["Admission", "EngineLoad", "SharedLoad", "queue_depth", "remove_states", "state_path"]
