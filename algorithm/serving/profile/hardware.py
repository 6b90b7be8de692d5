"""MFU 与 roofline 的峰值：H100 SXM 规格书的稠密峰值（与 benchmarks/README.md 一致）。"""

PEAK_FP16_TFLOPS = 989.0
PEAK_INT8_TOPS = 1979.0
PEAK_FP32_TFLOPS = 67.0
PEAK_HBM_TBS = 3.35
