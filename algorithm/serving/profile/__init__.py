"""torch 引擎的剖析（python -m algorithm.serving.profile --repo 仓库 --out 目录）：读一个 engine=torch 的已构建仓库，
写 <out>/profile.json 与 profile.md。GPU 上一次运行，不含 int8 约 1 分钟；CPU 上 --quick 检查同一段代码。

各节（每节一个函数，run.run_profile 按顺序调用；一节失败只记进报告，预算不够时跳过并写明原因）：
  checks      environment、load（由 .pt2 的权重重建 eager 模型）、stage_check（分阶段版本与 model(...) 逐位比较）
  stages      eager 模型按 forward 的顺序分阶段计时，每阶段的 FLOPs、字节与 roofline（roofline.py）
  attention   sdpa（加性掩码下各 SDPA 后端）、self_attention（显式 softmax 对 SDPA）、kv_cache（KV 缓存对每步重算）
  padding     默认长度分布下仓库的 seq 桶与规划的 4 / 8 个桶的填充，一次 execute 的填充与拼行估算
  throughput  仓库的 TorchRunner 按长度组成批的离线吞吐、MFU 与门禁；规划的桶下的同一测量
  kernels     运行器一次运行的内核表；几张 CUDA Graph 在不同流上同时重放的吞吐（只在 GPU 上）
  int8        torchao int8（服务时量化再编译，失败时逐级退到 eager）的吞吐与门禁
报告（report.py、markdown.py）每节开始与结束都重写：被外部超时杀掉时，报告里写着停在哪一节。
"""
