"""在 GPU 上比较 AOTInductor 与 torch.compile + CUDA Graph（torch 引擎的两种编译路线），写 JSON。

用法：python scripts/aoti_probe.py <模型仓库> <输出.json> [--shapes 1x128,16x256,64x128]
AOTInductor 的编译与加载各在子进程里做：加载时段错误（本项目在 H100 上见过）只让子进程死，结果里记下返回码。
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def contract_and_params(repo: str):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from algorithm.serving.triton_models import contract_from_params

    mc = model_config_pb2.ModelConfig()
    text_format.Parse(open(os.path.join(repo, "ugt_engine", "config.pbtxt")).read(), mc)
    params = {k: v.string_value for k, v in mc.parameters.items()}
    return contract_from_params(params), params


def timed(fn, feeds, reps: int = 20) -> float:
    import torch

    for _ in range(3):
        fn(feeds)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(feeds)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps * 1000


def feeds_for(contract, b: int, n: int):
    import numpy as np

    return contract.random_inputs(b, n, np.random.default_rng(b + n))


def stage_compile(repo: str, package: str) -> None:
    import torch

    contract, params = contract_and_params(repo)
    m = torch.export.load(os.path.join(repo, "ugt_engine", "1", params.get("engine_file", "model.pt2"))).module()
    m.to("cuda")
    f = feeds_for(contract, 2, 16)
    args = tuple(torch.from_numpy(f[n]).cuda() for n in contract.input_names)
    batch = torch.export.Dim("batch", min=1, max=contract_max_batch(params))
    seq = torch.export.Dim("seq_len", min=1, max=contract.max_seq_length)
    with torch.no_grad():
        ep = torch.export.export(m, args, dynamic_shapes=tuple({0: batch, 1: seq} for _ in args))
    t0 = time.time()
    torch._inductor.aoti_compile_and_package(ep, package_path=package)
    print(json.dumps({"compile_seconds": time.time() - t0}))


def contract_max_batch(params) -> int:
    return max(int(x) for x in params.get("batch_buckets", "64").split(",") if x.strip())


def stage_run(repo: str, package: str, shapes) -> None:
    import torch

    contract, _ = contract_and_params(repo)
    t0 = time.time()
    runner = torch._inductor.aoti_load_package(package)
    out = {"load_seconds": time.time() - t0, "ms": {}}
    for b, n in shapes:
        f = feeds_for(contract, b, n)
        args = [torch.from_numpy(f[k]).cuda() for k in contract.input_names]
        with torch.no_grad():
            out["ms"][f"{b}x{n}"] = timed(lambda _: runner(*args), None)
    print(json.dumps(out))


def stage_torch_compile(repo: str, shapes):
    """对照：服务用的 TorchRunner（torch.compile dynamic + 每形状一张 CUDA Graph），同样的形状。"""
    from algorithm.serving.torch_engine import TorchRunner

    contract, params = contract_and_params(repo)
    path = os.path.join(repo, "ugt_engine", "1", params.get("engine_file", "model.pt2"))
    res = {}
    for mode, graphs in (("none", False), ("default", False), ("default", True)):
        t0 = time.time()
        r = TorchRunner(path, contract, "cuda", 0, compile_mode=mode, cuda_graphs=graphs,
                        batch_buckets=sorted({b for b, _ in shapes}), seq_buckets=sorted({n for _, n in shapes}),
                        cache_dir=params.get("compile_cache_dir", ""))
        setup = time.time() - t0
        res[f"{mode}{'+cudagraph' if graphs else ''}"] = {
            "setup_seconds": setup,
            "ms": {f"{b}x{n}": timed(r.run, feeds_for(contract, b, n)) for b, n in shapes}}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("repo")
    ap.add_argument("out")
    ap.add_argument("--shapes", default="1x128,16x256,64x128")
    ap.add_argument("--stage", default="all", choices=["all", "compile", "run"])
    ap.add_argument("--package", default="")
    a = ap.parse_args()
    shapes = [tuple(int(x) for x in s.split("x")) for s in a.shapes.split(",")]
    package = a.package or os.path.join(os.path.dirname(os.path.abspath(a.out)), "ugt_aoti.pt2")
    if a.stage == "compile":
        return stage_compile(a.repo, package)
    if a.stage == "run":
        return stage_run(a.repo, package, shapes)
    import torch

    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "shapes": a.shapes}
    for stage, timeout in (("compile", 360), ("run", 120)):
        cmd = [sys.executable, __file__, a.repo, a.out, "--stage", stage, "--shapes", a.shapes, "--package", package]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            result[f"aoti_{stage}"] = {"returncode": p.returncode, **(json.loads(lines[-1]) if lines else {}),
                                       "stderr_tail": p.stderr[-1500:] if p.returncode else ""}
        except subprocess.TimeoutExpired:
            result[f"aoti_{stage}"] = {"returncode": None, "error": f"超过 {timeout}s"}
        print(json.dumps({stage: result[f"aoti_{stage}"]}, ensure_ascii=False)[:3000], flush=True)
        if result[f"aoti_{stage}"].get("returncode") != 0:
            break
    result["torch_compile"] = stage_torch_compile(a.repo, shapes)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
    print(json.dumps(result, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
