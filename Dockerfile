# UGT 推理服务：两阶段镜像。
#   阶段 1（build）：NVIDIA 的 PyTorch 容器自带 TensorRT，导出 ONNX -> 构建 TensorRT 引擎 -> 生成仓库；
#   阶段 2（serve）：NVIDIA 的 Triton 容器（25.07 及以后修复了 2025 年公布的安全问题：
#                    Python backend 共享内存、HTTP 分块解析），原生 tensorrt_plan 托管引擎。
# 用法（需要 Docker 与 NVIDIA 驱动；本项目的开发机上没有 Docker 引擎，未在此构建过）：
#   docker build -t ugt-serving --build-arg BUILD_ARGS="model=ugt_base engine=tensorrt precision=fp16" .
#   docker run --gpus all -p 8000:8000 -p 8001:8001 -p 8002:8002 -e UGT_ADMIN_KEY=<密钥> ugt-serving
ARG TRITON_RELEASE=25.10

FROM nvcr.io/nvidia/pytorch:${TRITON_RELEASE}-py3 AS build
WORKDIR /opt/ugt-serving
COPY pyproject.toml README.md ./
COPY algorithm ./algorithm
COPY conf ./conf
COPY scripts ./scripts
COPY model_repository ./model_repository
# 容器里已有 torch 与 tensorrt：只补本包需要的其余依赖，不让 pip 改动容器的 torch
RUN pip install --no-cache-dir "hydra-core>=1.3" "onnx>=1.16" "onnxscript>=0.2" "onnxruntime>=1.18" \
        "tritonclient[grpc]>=2.50" "nvidia-ml-py>=12" "tqdm>=4.60" \
 && pip install --no-cache-dir --no-deps -e .
ARG BUILD_ARGS="engine=tensorrt precision=fp16"
RUN python scripts/build.py ${BUILD_ARGS} engine.native=true build_dir=/opt/build

FROM nvcr.io/nvidia/tritonserver:${TRITON_RELEASE}-py3 AS serve
# 前/后处理的 Python 模型只需要 numpy 与本包（不需要 torch / onnx）
COPY --from=build /opt/ugt-serving/pyproject.toml /opt/ugt-serving/README.md /opt/ugt-serving/
COPY --from=build /opt/ugt-serving/algorithm /opt/ugt-serving/algorithm
RUN pip install --no-cache-dir --no-deps /opt/ugt-serving
COPY --from=build /opt/build/model_repository /models
EXPOSE 8000 8001 8002
# 以 Triton 镜像自带的非 root 用户 triton-server（uid 1000）运行；/models 对它只读即可
USER 1000:1000
# docker run 时的健康检查（Kubernetes 不用它，见 deploy/ 的探针）；加载引擎与预热可能要几分钟
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=4)"]
# 生产建议：管理类 API 需要密钥头；关闭客户端共享内存的注册（只接受请求体内的数据）
ENV UGT_ADMIN_KEY=""
CMD ["sh", "-c", "test -n \"$UGT_ADMIN_KEY\" || { echo '请设置 UGT_ADMIN_KEY（管理 API 的密钥）'; exit 1; }; exec tritonserver --model-repository=/models --model-control-mode=none --strict-readiness=true --http-restricted-api=model-repository,model-config,shared-memory,statistics,trace,logging:ugt-admin-key=$UGT_ADMIN_KEY --grpc-restricted-protocol=model-repository,model-config,shared-memory,statistics,trace,logging:ugt-admin-key=$UGT_ADMIN_KEY"]
