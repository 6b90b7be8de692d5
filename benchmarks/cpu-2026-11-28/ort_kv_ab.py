"""本机 CPU：同一进程里对照两个 ONNX 引擎（重算前缀 / KV 缓存）的单次运行时间，1 个线程，每个形状 3 轮、每轮 1 s。

  python scripts/benchmark.py -m benchmark=quick ... export.decoder_kv_cache=false,true   # 先按产物选项构建两个变体
  python benchmarks/cpu-2026-11-28/ort_kv_ab.py build/variants/<false 的变体> build/variants/<true 的变体>
"""
import json
import os
import sys
import time

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from algorithm.models.config import UGTConfig  # noqa: E402


def main(nokv_dir: str, kv_dir: str) -> None:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = {}
    for name, d in (("nokv", nokv_dir), ("kv", kv_dir)):
        repo = os.path.join(d, "model_repository")
        flag = json.load(open(os.path.join(repo, "build_info.json")))["config"]["export"]["decoder_kv_cache"]
        assert flag == (name == "kv"), f"{d} 的 decoder_kv_cache 是 {flag}"
        sess[name] = ort.InferenceSession(os.path.join(repo, "ugt_engine", "1", "model.onnx"), so,
                                          providers=["CPUExecutionProvider"])
    cfg = UGTConfig()  # ugt_tiny
    rng = np.random.default_rng(0)
    print("onnxruntime", ort.__version__, "1 线程；中位数 [3 轮]，ms")
    for b, L in ((1, 100), (8, 128), (64, 128)):
        feeds = cfg.contract().random_inputs(b, L, rng)
        feeds = {i.name: feeds[i.name].astype(np.float32 if i.type == "tensor(float)" else np.int64)
                 for i in sess["kv"].get_inputs()}
        times, outs = {}, {}
        for _ in range(3):
            for name, s in sess.items():
                s.run(None, feeds)
                t, n = time.perf_counter(), 0
                while time.perf_counter() - t < 1.0:
                    outs[name] = s.run(None, feeds)
                    n += 1
                times.setdefault(name, []).append((time.perf_counter() - t) / n * 1e3)
        same = np.array_equal(outs["kv"][0], outs["nokv"][0])
        print(f"b{b}xL{L}: 重算 {np.median(times['nokv']):.2f} {[round(x, 2) for x in times['nokv']]}，"
              f"KV 缓存 {np.median(times['kv']):.2f} {[round(x, 2) for x in times['kv']]}，"
              f"倍数 {np.median(times['nokv']) / np.median(times['kv']):.2f}，推荐逐位一致 {same}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
