"""torch 引擎的运行器：加载 torch.export 的 .pt2，（可选）torch.compile，GPU 上按 (batch 桶, 长度桶) 重放 CUDA Graph。

为什么 dynamic=True 只编译一次：按静态形状编译每个形状要 50-95 s，桶有 batch x 长度 个组合；动态形状编译一次，
再为每个桶捕获一张 CUDA Graph（捕获只是运行一次）。编译缓存目录（TORCHINDUCTOR_CACHE_DIR）在构建目录里，
同一 GPU 上的多个实例与重启都复用它。

一次 execute 的几组（按长度分组）：每组一次 H2D（页锁定暂存区，非阻塞）、一次重放、一次 D2H 到页锁定输出区；
组与组之间不同步，最后只等一次。group_streams 时每个长度桶有自己的 CUDA 流与图内存池，几组在 GPU 上同时跑
（小 batch 的图只占一部分 SM：H100 上 b8xL128 一次重放 2.2 ms 里是 332 个平均 5 µs 的内核）；否则都在当前流上背靠背。
CUDA 事件给出 GPU 时间与回拷时间（见 finish）。
输入在到达这里之前已由 runtime/batching.collect 按契约校验（越界 id 会触发 device-side assert 并毁掉 CUDA 上下文）。

两种程序两个类，共用图的缓存、暂存区与启动（TorchRunner）：GroupedTorchRunner 按 (batch 桶, 长度桶) 捕获；
PackedTorchRunner 是拼行的程序（engine.pack_rows，UGTModel.forward_packed；TorchRunner.load 按输入个数认出），
一次 execute 的全部历史拼成一组（runtime/rowpack.py，stage_packed 写暂存区），按 (行数桶, 历史数桶, 宽) 捕获。
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from algorithm.errors import InternalError, MissingDependencyError
from algorithm.interfaces import EngineContract
from algorithm.serving.runtime import rowpack
from algorithm.serving.runtime.batching import RequestBatch, collect
from algorithm.serving.runtime.buckets import round_up
from algorithm.serving.runtime.engines.base import EngineRunner, Outputs, Staged, Timing

log = logging.getLogger(__name__)


def _torch():
    try:
        import torch
    except ImportError as e:
        raise MissingDependencyError("torch 引擎需要 PyTorch") from e
    return torch


def resolve_device(name: str) -> str:
    """auto -> 有 GPU 用 cuda，否则 cpu；其它原样返回。"""
    if name != "auto":
        return name
    return "cuda" if _torch().cuda.is_available() else "cpu"


def int8_transform(mode: str):
    """int8：.pt2 按 bf16（GPU）/ fp32（CPU）导出，加载并移到设备后再用 torchao 量化（见 torch_int8.py 的说明）。"""
    def apply(module):
        from algorithm.serving.runtime.engines.torch_int8 import quantize_int8

        return quantize_int8(module, mode=mode)

    return apply


def _spec_transform(path: str, spec):
    """服务进程里按构建时的精度选 transform：int8 在加载后量化；fp8 按 .pt2 里构建时定好的计划改图（不再计时）。"""
    if spec.precision == "int8":
        return int8_transform(spec.int8_mode)
    if spec.precision == "fp8":
        from algorithm.serving.runtime.engines.torch_fp8 import fp8_transform, read_plan

        return fp8_transform(read_plan(path))
    return None


class _Lane:
    """一套页锁定的暂存区与输出区。lanes > 1（流水线，triton.engine_pipeline_depth）时每个桶有几套：同一张图的上一批
    还在 GPU 上或还没回拷完时，下一批写另一套（设备上的静态输入 / 输出按流的顺序复用，不冲突）。"""

    def __init__(self, host_tensors: Dict[str, object], host_out):
        self.host_tensors = host_tensors  # {名字: 页锁定张量}，给非阻塞 H2D
        self.host_in = {n: t.numpy() for n, t in host_tensors.items()}  # 共享内存的 numpy 视图 [B, L]，给 fill 写
        self.host_out = host_out  # (rec, scores) 页锁定张量
        self.computed = None  # group_streams 时这一套的重放结束 / 回拷结束事件（主流据此等待）
        self.copied = None


class _Slot:
    """一个桶的 CUDA Graph 与它的几套页锁定暂存区（_Lane）。"""

    def __init__(self, graph, static_in, out, lanes: List[_Lane]):
        self.graph, self.static_in, self.out = graph, static_in, out
        self.key: Tuple[int, ...] = ()
        self.lanes = lanes
        self.next_lane = 0
        self.stream = None  # group_streams 时该长度桶的流（None = 当前流）
        self.seconds: Optional[float] = None  # 一次重放的实测时间（捕获后测），用于合并长度组的代价

    @property
    def host_in(self) -> Dict[str, np.ndarray]:
        return self.lanes[0].host_in

    def take_lane(self) -> _Lane:
        """轮流用几套暂存区：流水线最多 len(lanes) 批在途，每批每个桶至多一组，所以轮到的那套的上一批已经取走了结果。"""
        lane = self.lanes[self.next_lane]
        self.next_lane = (self.next_lane + 1) % len(self.lanes)
        return lane


class _Pending:
    """launch 启动了、还没等的一次 execute：各组（图的 (桶, 那一套) 或 eager 的设备张量）与三个 CUDA 事件。"""

    def __init__(self, items: list, events=None, outs=None, timing=None, prev_end=None):
        self.items, self.events = items, events
        self.outs, self.timing = outs, timing  # CPU 上 launch 就算完了
        self.prev_end = prev_end  # 同一运行器上一批的结束事件（算两批之间 GPU 空着的时间）


class TorchRunner(EngineRunner):
    """torch 运行器的共用部分：加载后的模块、（可选）编译、CUDA Graph 的缓存（slots）与页锁定暂存区、启动与取回。
    桶的键、捕获用的示例输入和怎样暂存一批由子类给出：GroupedTorchRunner（按长度分组）、PackedTorchRunner（拼行）。
    用 TorchRunner.load(path, ...) 打开 .pt2：按程序的输入认出是哪一种。"""

    def __init__(self, program, contract: EngineContract, device: str = "cpu", device_id: int = 0,
                 compile_mode: str = "default", cuda_graphs: bool = True, batch_buckets: Sequence[int] = (),
                 seq_buckets: Sequence[int] = (), cache_dir: str = "", warmup: bool = True,
                 transform=None, group_streams: bool = False, lanes: int = 1, load_seconds: float = 0.0):
        torch = _torch()
        if device == "cuda" and not torch.cuda.is_available():
            raise MissingDependencyError("engine.device=cuda，但 PyTorch 看不到 GPU（torch.cuda.is_available() 为 False）")
        if cache_dir:
            os.makedirs(cache_dir, exist_ok=True)
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", cache_dir)
        self.torch = torch
        self.contract = contract
        self.device = torch.device(f"cuda:{device_id}" if device == "cuda" else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        t0 = time.time()
        module = program.module()
        module.to(self.device)
        if transform is not None:  # 例如 int8 量化（在加载后的模块上做，见 engines/torch.py 的构建）
            module = transform(module)
        self.module = module
        self.fn = module
        self.compile_mode = compile_mode
        if compile_mode != "none":
            self.fn = torch.compile(module, mode=compile_mode, dynamic=True)
        self.use_graphs = bool(cuda_graphs and self.device.type == "cuda" and batch_buckets and seq_buckets)
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.seq_buckets = tuple(sorted(seq_buckets))
        self.slots: Dict[Tuple[int, ...], _Slot] = {}  # 键由子类定（graph_keys）
        self.lanes = max(1, int(lanes))
        self._last_end = None  # 上一次 launch 的结束事件
        # 同时重放的图不能共用任何工作区。group_streams 时每个长度桶（一次 execute 里每个长度桶至多一组）有自己的
        # 图内存池与流（在它上面捕获，之后也在它上面重放）：cuBLAS 的工作区按 (句柄, 流) 缓存，在同一个流上捕获的图
        # 共用同一块工作区，即使内存池不同（pytorch/pytorch#193402）；sm90 的协作式矩阵乘内核在工作区里做块间同步，
        # 两个同时重放的内核共用它就可能互等（H100 上只分内存池时服务器卡死过）。代价：显存约为各长度桶最大图之和
        self.group_streams = bool(group_streams and self.use_graphs)
        self._pools: Dict[int, object] = {}
        self._capture_streams: Dict[int, object] = {}
        self.load_seconds = load_seconds + time.time() - t0
        self.capture_seconds = 0.0
        if warmup and self.use_graphs:
            self.capture_all()

    @classmethod
    def load(cls, path: str, contract: EngineContract, device: str = "cpu", device_id: int = 0, **kw) -> "TorchRunner":
        """打开 torch.export 的 .pt2：拼行导出的程序（engine.pack_rows，按输入个数认出）给 PackedTorchRunner，
        否则 GroupedTorchRunner。其余参数见 TorchRunner。"""
        torch = _torch()
        t0 = time.time()
        program = torch.export.load(path)
        kind = PackedTorchRunner if rowpack.is_packed_program(program, contract) else GroupedTorchRunner
        return kind(program, contract, device, device_id, load_seconds=time.time() - t0, **kw)

    @classmethod
    def from_spec(cls, path: str, contract: EngineContract, spec, device_id: int = 0, lanes: int = 1) -> "TorchRunner":
        """服务进程里：spec 为 runtime.params.RuntimeSpec（构建时算好的桶、设备、编译设置）；lanes 见 _Lane。"""
        return cls.load(path, contract, spec.device, device_id, compile_mode=spec.compile_mode,
                        cuda_graphs=spec.cuda_graphs, batch_buckets=spec.batch_buckets, seq_buckets=spec.seq_buckets,
                        cache_dir=spec.compile_cache_dir, transform=_spec_transform(path, spec),
                        group_streams=spec.group_streams, lanes=lanes)

    # ---- 子类给出的：桶的键与捕获用的示例输入 ----
    input_names: Tuple[str, ...] = ()

    def graph_keys(self) -> List[Tuple[int, ...]]:
        """加载时捕获的全部桶，按捕获的顺序。"""
        raise NotImplementedError

    def example_inputs(self, key: Tuple[int, ...]) -> Tuple[Dict[str, np.ndarray], int]:
        """桶 key 的捕获输入与它的宽（group_streams 时决定用哪个池与流）。"""
        raise NotImplementedError

    def bucket_name(self, key: Tuple[int, ...]) -> str:
        raise NotImplementedError

    # ---- CUDA Graph ----
    def _capture(self, key: Tuple[int, ...]) -> _Slot:
        """在 key 的示例输入上预热、捕获一张图，配好页锁定的暂存区。"""
        torch = self.torch
        feeds, length = self.example_inputs(key)
        static = [torch.from_numpy(feeds[n]).to(self.device) for n in self.input_names]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(2):  # 预热：编译、分配工作区
                self.fn(*static)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        pool = length if self.group_streams else 0
        if pool not in self._pools:
            self._pools[pool] = torch.cuda.graph_pool_handle()
            # 不分长度桶时用 torch 默认的捕获流（None）
            self._capture_streams[pool] = torch.cuda.Stream(self.device) if self.group_streams else None
        with torch.cuda.graph(graph, pool=self._pools[pool], stream=self._capture_streams[pool]), torch.no_grad():
            out = self.fn(*static)
        # 页锁定的暂存区：numpy 视图给 batching.fill / rowpack.fill 写，张量给非阻塞 H2D；零初始化（填充处的 id 必须合法）
        lanes = []
        for _ in range(self.lanes):
            lane = _Lane({name: torch.zeros(t.shape, dtype=t.dtype, pin_memory=True)
                          for name, t in zip(self.input_names, static)},
                         (torch.empty(out[0].shape, dtype=out[0].dtype, pin_memory=True),
                          torch.empty(out[1].shape, dtype=torch.float32, pin_memory=True)))
            if self.group_streams:
                lane.computed, lane.copied = torch.cuda.Event(), torch.cuda.Event()
            lanes.append(lane)
        slot = _Slot(graph, static, out, lanes)
        slot.key = key
        if self.group_streams:  # 同一长度桶的图共用池与流：一次 execute 里每个长度桶至多一组，它们从不同时跑
            slot.stream = self._capture_streams[pool]
        self.slots[key] = slot
        return slot

    def capture_all(self) -> None:
        """为所有桶捕获 CUDA Graph 并测一次重放时间（加载时做，首个请求不承担）。"""
        t0 = time.time()
        for key in self.graph_keys():
            self._capture(key)
        self.capture_seconds = time.time() - t0
        self._time_slots()
        log.info("CUDA Graph：%d 个桶，%.1fs", len(self.slots), self.capture_seconds)

    def _time_slots(self, repeats: int = 3) -> None:
        torch = self.torch
        for slot in self.slots.values():
            times = []
            for _ in range(repeats):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                slot.graph.replay()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            slot.seconds = float(np.median(times))

    def bucket_seconds(self) -> Dict[str, float]:
        """各桶一次重放的实测时间（秒），键见 bucket_name。"""
        return {self.bucket_name(k): s.seconds for k, s in sorted(self.slots.items()) if s.seconds is not None}

    def _graph_slot(self, key: Tuple[int, ...]) -> Optional[_Slot]:
        """桶 key 的图；缺桶时（warmup=False）才捕获。流水线（lanes > 1）时不捕获、这一组 eager 运行：另一个线程正在
        finish 里等 CUDA 事件，全局模式的流捕获期间别的线程做同步会让捕获失败。"""
        slot = self.slots.get(key)
        if slot is None and self.lanes == 1:
            slot = self._capture(key)
        return slot

    @staticmethod
    def _stage_in(slot: Optional[_Slot], fresh) -> Staged:
        """有图时轮到的那一套页锁定暂存区（句柄记下图与那一套），否则 fresh() 新建的数组（eager 运行）。"""
        if slot is None:
            return Staged(fresh())
        lane = slot.take_lane()
        return Staged(lane.host_in, (slot, lane))

    # ---- 运行 ----
    def launch(self, staged: List[Staged]) -> _Pending:
        """启动各组（组间不同步；group_streams 时各在自己的流上同时跑），不等：流水线（triton.engine_pipeline_depth）
        在这批还在 GPU 上时去准备下一批，之后由 finish 等它。CPU 上直接算完。"""
        torch = self.torch
        if self.device.type != "cuda":
            t0 = time.perf_counter()
            outs = [self._eager(s.feeds) for s in staged]
            return _Pending([], outs=outs, timing={"device_ms": (time.perf_counter() - t0) * 1e3, "copy_back_ms": 0.0})
        ev_start, ev_compute, ev_end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        pending = []
        main = torch.cuda.current_stream(self.device)
        ev_start.record(main)
        # 上一批的结束事件：两者之间的 GPU 时间 = 这个实例的 GPU 在两批之间空着的时间（同一流上，不会为负；
        # 流水线把下一批排在上一批还在跑时，它接近 0）
        prev_end, self._last_end = self._last_end, ev_end
        launched = set()
        for st in staged:
            if st.slot is None:
                pending.append(("eager", self._eager_async(st.feeds)))
                continue
            slot, lane = st.slot
            if id(slot) in launched:
                # 同一张图的两组会共用设备上的静态输入 / 输出（后一组的结果覆盖前一组）：EngineModel 不会这样分组
                raise InternalError(f"一次 execute 里两组落到同一张图 {slot.key}")
            launched.add(id(slot))
            if slot.stream is None:
                self._launch(slot, lane)
            else:
                slot.stream.wait_event(ev_start)  # 不早于主流上此前的工作（上一批的同一桶按流的顺序排在前面）
                with torch.cuda.stream(slot.stream):
                    self._launch(slot, lane)
            pending.append(("graph", (slot, lane)))
        side = [item[1] for kind, item in pending if kind == "graph" and item[0].stream is not None]
        for lane in side:
            main.wait_event(lane.computed)
        ev_compute.record(main)
        for kind, item in pending:
            if kind == "graph" and item[0].stream is None:
                self._copy_back(item[0], item[1])
        for lane in side:
            main.wait_event(lane.copied)
        ev_end.record(main)
        return _Pending(pending, events=(ev_start, ev_compute, ev_end), prev_end=prev_end)

    def finish(self, p: _Pending) -> Tuple[List[Outputs], Timing]:
        """等 launch 启动的一批做完（只等这一次），取回各组输出（拷出页锁定区：那一套随后给别的批用）。
        计时（毫秒）：开始到全部重放结束、到全部回拷结束，及与上一批之间 GPU 空着的时间。"""
        if p.events is None:
            return p.outs, p.timing
        ev_start, ev_compute, ev_end = p.events
        ev_end.synchronize()
        outs: List[Outputs] = []
        for kind, item in p.items:
            if kind == "graph":
                host_out = item[1].host_out
                outs.append((host_out[0].numpy().copy(), host_out[1].numpy().copy()))
            else:
                outs.append((item[0].cpu().numpy(), item[1].float().cpu().numpy()))
        gap = p.prev_end.elapsed_time(ev_start) if p.prev_end is not None else 0.0
        return outs, {"device_ms": ev_start.elapsed_time(ev_compute), "copy_back_ms": ev_compute.elapsed_time(ev_end),
                      "gap_ms": gap}

    def compute(self, staged: List[Staged]) -> Tuple[List[Outputs], Timing]:
        return self.finish(self.launch(staged))

    def _launch(self, slot: _Slot, lane: _Lane) -> None:
        """在当前流上：从这一套暂存区 H2D、重放；在自己的流上时接着回拷，并记下这一套的两个事件。"""
        for name, dev in zip(self.input_names, slot.static_in):
            dev.copy_(lane.host_tensors[name], non_blocking=True)
        slot.graph.replay()
        if slot.stream is not None:
            lane.computed.record()
            self._copy_back(slot, lane)
            lane.copied.record()

    @staticmethod
    def _copy_back(slot: _Slot, lane: _Lane) -> None:
        lane.host_out[0].copy_(slot.out[0], non_blocking=True)
        lane.host_out[1].copy_(slot.out[1], non_blocking=True)

    def _eager_async(self, feeds: Mapping[str, np.ndarray]):
        torch = self.torch
        with torch.no_grad():
            return self.fn(*[torch.from_numpy(np.ascontiguousarray(feeds[n])).to(self.device)
                             for n in self.input_names])

    def _eager(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        rec, scores = self._eager_async(feeds)
        return rec.cpu().numpy(), scores.float().cpu().numpy()


class GroupedTorchRunner(TorchRunner):
    """按长度分组的程序：每组 [B, L] 一次重放，图按 (batch 桶, 长度桶) 捕获。"""

    @property
    def input_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        return tuple(self.contract.input_names)

    def graph_keys(self) -> List[Tuple[int, ...]]:
        return [(b, length) for length in self.seq_buckets for b in self.batch_buckets]

    def example_inputs(self, key: Tuple[int, ...]) -> Tuple[Dict[str, np.ndarray], int]:
        b, length = key
        return self.contract.random_inputs(b, length, np.random.default_rng(b * 7919 + length)), length

    def bucket_name(self, key: Tuple[int, ...]) -> str:
        return f"b{key[0]}xL{key[1]}"

    def cost(self, rows: int, length: int) -> Optional[float]:
        """合并长度组用的代价：该组落到的桶的重放时间；没有对应的桶（或未计时）为 None。"""
        if not self.use_graphs:
            return None
        slot = self.slots.get((round_up(rows, self.batch_buckets), round_up(length, self.seq_buckets)))
        return slot.seconds if slot is not None else None

    def staging(self, rows: int, length: int) -> Staged:
        """一组请求的暂存区：有对应的桶时为该桶轮到的那一套页锁定区（mask 清零），否则为新的 [rows, length] 数组。"""
        slot = None
        if self.use_graphs and rows <= self.batch_buckets[-1] and length <= self.seq_buckets[-1]:
            slot = self._graph_slot((round_up(rows, self.batch_buckets), round_up(length, self.seq_buckets)))
        st = self._stage_in(slot, lambda: EngineRunner.staging(self, rows, length).feeds)
        if slot is not None:
            st.feeds["encoder_mask"].fill(0)  # 填充处 mask 必须为 0；其它输入的旧值都是校验过的合法值
        return st


class PackedTorchRunner(TorchRunner):
    """拼行的程序（engine.pack_rows，UGTModel.forward_packed）：一次 execute 的全部历史拼成一组（runtime/rowpack.py），
    图按 (行数桶, 历史数桶, 宽) 捕获。每次只有一组，所以不分长度桶的流（group_streams 不用）。"""

    packs_rows = True

    def __init__(self, program, contract: EngineContract, *args, **kw):
        kw["group_streams"] = False
        super().__init__(program, contract, *args, **kw)

    @property
    def input_names(self) -> Tuple[str, ...]:  # type: ignore[override]
        return rowpack.input_names(self.contract)

    def graph_keys(self) -> List[Tuple[int, ...]]:
        """(行数桶, 历史数桶, 宽)，行数 <= 历史数。第一张的行数、历史数、宽互不相同：torch.compile(dynamic=True)
        第一次编译时相等的维度共用一个符号（duck shaping），之后遇到不相等的要重新编译一次。"""
        keys = [(r, n, w) for w in self.seq_buckets for n in self.batch_buckets for r in self.batch_buckets if r <= n]
        keys.sort(key=lambda k: k[0] == k[1])  # 稳定排序：行数 < 历史数的排在前面
        return keys

    def example_inputs(self, key: Tuple[int, ...]) -> Tuple[Dict[str, np.ndarray], int]:
        rows, histories, width = key
        rng = np.random.default_rng(rows * 7919 + histories * 31 + width)
        lengths = rng.integers(1, width + 1, size=min(rows, histories))  # 每条一行：行数与历史数都用到
        return rowpack.example_inputs(self.contract, lengths, width, rng, rows=rows, histories=histories), width

    def bucket_name(self, key: Tuple[int, ...]) -> str:
        return f"r{key[0]}n{key[1]}xW{key[2]}"

    def staging(self, rows: int, length: int) -> Staged:
        raise InternalError("拼行的程序的暂存区由 stage_packed 给出（EngineModel 按 runner.packs_rows 选择）")

    def stage_packed(self, batch: RequestBatch) -> Tuple[rowpack.RowPlan, Staged]:
        """一次 execute 的全部历史拼成一组，写进 (行数桶, 历史数桶, 宽) 那张图的页锁定暂存区；历史数超出 batch 桶
        或没有图时写进按实际形状新建的数组（eager 运行）。返回 (拼行计划, 暂存区)。"""
        p = rowpack.plan(batch, self.seq_buckets, self.contract.max_seq_length)
        slot = None
        if self.use_graphs and p.histories <= self.batch_buckets[-1] and p.width in self.seq_buckets:
            slot = self._graph_slot((round_up(p.rows, self.batch_buckets), round_up(p.histories, self.batch_buckets),
                                     p.width))
        st = self._stage_in(slot, lambda: rowpack.alloc(self.contract, p.rows, p.width, p.histories))
        rowpack.fill(batch, p, st.feeds)
        return p, st

    def run(self, feeds: Mapping[str, np.ndarray]) -> Outputs:
        """一批 [B, L]（门禁、离线吞吐）：先拼行，再经同一条暂存 / 重放路径。"""
        b = feeds["encoder_mask"].shape[0]
        batch, errors = collect([feeds], self.contract)
        if errors:
            raise errors[0]
        _, st = self.stage_packed(batch)
        outs, _ = self.run_many([st])
        rec, scores = outs[0]
        return rec[:b], scores[:b]


__all__ = ["GroupedTorchRunner", "PackedTorchRunner", "TorchRunner", "resolve_device"]
