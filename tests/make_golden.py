"""重新生成 tests/golden/*.pbtxt（改了配置生成后运行，并逐个审阅 diff）：python tests/make_golden.py"""
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from conftest import tiny_config  # noqa: E402

from algorithm.serving.config import EngineConfig  # noqa: E402
from algorithm.serving.triton_config import build_model_configs, to_pbtxt  # noqa: E402

# (文件名后缀, 配置覆盖, gpus)
CASES = {
    "": ({}, []),
    ".torch_gpu": ({"engine": EngineConfig(kind="torch", device="cuda")}, [0, 1]),
    ".tensorrt": ({"engine": EngineConfig(kind="tensorrt", device="cuda")}, [0]),
    ".ort_native": ({"engine": EngineConfig(kind="onnxruntime", native=True)}, []),
}


def golden_configs():
    for suffix, (overrides, gpus) in CASES.items():
        for name, mc in build_model_configs(tiny_config("/opt/ugt-build", **overrides), gpus=gpus).items():
            if suffix and name != "ugt_engine" and name != "ugt_preprocess":
                continue
            yield f"{name}{suffix}.pbtxt", mc


if __name__ == "__main__":
    os.makedirs(os.path.join(HERE, "golden"), exist_ok=True)
    for fname, mc in golden_configs():
        with open(os.path.join(HERE, "golden", fname), "w") as f:
            f.write(to_pbtxt(mc))
        print("写出", fname)
