"""在构建好的仓库上运行内嵌 Triton（Ctrl-C 停止）。

  python scripts/serve.py                       # 127.0.0.1，端口自动选择
  python scripts/serve.py server.http_port=8000 server.grpc_port=8001

服务中换模型不用重启：scripts/rollout.py（上线与回滚）。
"""
import signal
import sys
import threading

import hydra
from omegaconf import DictConfig

from algorithm.serving.cli import setup_logging
from algorithm.serving.config import register_configs, to_serving_config
from algorithm.serving.errors import UGTServingError

register_configs()


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    setup_logging()
    from algorithm.serving.build import paths
    from algorithm.serving.server import EmbeddedTritonServer

    config = to_serving_config(cfg)
    repo = paths(config)["repository"]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        with EmbeddedTritonServer(repo, config.server, ready_models=[config.export.model_name]) as server:
            print(f"Triton 已就绪，仓库 {repo}\n  HTTP  {server.http_url}\n  gRPC  {server.grpc_url}\n"
                  f"  指标  {server.metrics_url}\nensemble：{config.export.model_name}（Ctrl-C 停止）\n"
                  f"上线新版本：python scripts/rollout.py url={server.http_url} repository={repo} source=<新构建的仓库>",
                  flush=True)
            try:
                while not stop.wait(1.0):
                    if server.process is None or server.process.poll() is not None:
                        print("tritonserver 意外退出：\n" + server.log_tail(), file=sys.stderr)
                        sys.exit(1)
            except KeyboardInterrupt:
                pass
    except UGTServingError as e:
        print(f"启动失败：{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    print("已停止")


if __name__ == "__main__":
    main()
