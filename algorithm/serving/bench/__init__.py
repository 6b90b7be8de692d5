"""压测：请求生成与发压（loadgen）、服务器统计与 GPU 采样（stats）、尾部统计（tail）、Triton 追踪（trace）、
负载点与 SLA 搜索与重复（suite）、报告（report）、引擎离线吞吐（offline）、perf_analyzer 交叉检查、
配置驱动的入口与构建变体（app）。用户的 run_benchmark 在 algorithm/serving/benchmark.py。"""
