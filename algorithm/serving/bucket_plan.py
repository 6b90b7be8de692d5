"""按请求长度分布规划长度桶（seq bucket）：使期望的填充后计算量最小。只依赖 numpy。

为什么要规划：torch 引擎按长度桶捕获 CUDA Graph，同一桶内的请求都填充到桶的上界；TensorRT / 原生后端
也按桶填充。固定的 [128, 256, 512, 1024] 对中位数 100 的对数正态分布不合身：填充后的 token 里 36 % 是填充
（引擎剖析 algorithm/serving/profile 的 padding 一节，benchmarks/h100-2026-11-25-run2/machine1/profile）。规划只改桶的边界，
不改桶数（桶数决定 CUDA Graph 的数量与捕获时间）。

代价模型（一个长度为 n 的请求被填充到桶 b >= n 时的计算量 cost(b)）：
- 浮点数 c（默认 DEFAULT_ATTENTION_CROSSOVER）：cost(b) = b + b*b/c。线性项是投影与 FFN，二次项是自注意力；
  c 是两者相等的长度。编码器一层的线性部分 b*(8d^2 + 4df)、注意力 4*b^2*d，所以 c = 2*d_model + dim_feedforward
  （ugt_base：2*768 + 3072 = 4608）。
- None：只算线性（cost(b) = b，即填充的 token 数）。
- 可调用对象：cost(b: np.ndarray) -> np.ndarray，例如 model_cost(cfg)（与 flops_per_request 相同的完整 FLOPs）。
代价只计 FLOPs：GPU 上小桶的效率更低（启动开销、块利用率），这个模型不反映；规划结果以实测为准
（引擎剖析报告两种桶的填充比例与吞吐）。
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Sequence, Union

import numpy as np

Cost = Union[Callable[[np.ndarray], np.ndarray], float, None]
# ugt_base 编码器的线性/二次交叉长度：2 * d_model + dim_feedforward = 2 * 768 + 3072
DEFAULT_ATTENTION_CROSSOVER = 4608.0


def default_lengths(median: float = 100.0, sigma: float = 1.0, max_len: int = 1024, n: int = 100_000,
                    seed: int = 0) -> np.ndarray:
    """压测的长度分布（workload.lognormal_lengths，同一种子得到同一组长度），这里给规划用的默认参数。"""
    from algorithm.serving.workload import lognormal_lengths

    return lognormal_lengths(median, sigma, n, max_len, seed)


def quadratic_cost(crossover: float) -> Callable[[np.ndarray], np.ndarray]:
    """cost(b) = b + b^2 / crossover。"""
    if not crossover > 0:
        raise ValueError(f"crossover 应为正数，得到 {crossover!r}")
    return lambda b: np.asarray(b, np.float64) + np.asarray(b, np.float64) ** 2 / crossover


def model_cost(cfg, kv_cache: bool = True) -> Callable[[np.ndarray], np.ndarray]:
    """与 algorithm.models.ugt.flops_per_request(cfg, n, kv_cache) 相同的每请求 FLOPs（含与长度无关的解码器与打分头），
    对长度向量化；cfg 只需有 UGTConfig 的字段（这里不导入 torch）。测试保证两者一致。"""
    d, f, k = cfg.d_model, cfg.dim_feedforward, cfg.beam_width
    v1, v2, v3 = cfg.codebook_sizes
    ne, nd = cfg.num_encoder_layers, cfg.num_decoder_layers
    tokens = [rows if kv_cache else rows * t for t, rows in ((1, 1), (2, k), (3, k))]
    quad = ne * 4 * d
    lin = ne * (8 * d * d + 4 * d * f) + nd * 4 * d * d + nd * 4 * d * sum(tokens)
    const = nd * sum(tok * (12 * d * d + 4 * d * f) + 4 * tok * t * d for tok, t in zip(tokens, (1, 2, 3)))
    const += 2 * d * (v1 + k * v2 + k * v3)

    def cost(b):
        b = np.asarray(b, np.float64)
        return const + lin * b + quad * b * b
    return cost


def _cost_fn(cost: Cost) -> Callable[[np.ndarray], np.ndarray]:
    if cost is None:
        return lambda b: np.asarray(b, np.float64)
    if callable(cost):
        return lambda b: np.asarray(cost(np.asarray(b, np.float64)), np.float64)
    return quadratic_cost(float(cost))


def _check_lengths(lengths, max_len: int) -> np.ndarray:
    x = np.asarray(lengths).astype(np.int64).ravel()
    if x.size == 0:
        raise ValueError("lengths 为空")
    if x.min() < 1 or x.max() > max_len:
        raise ValueError(f"长度应在 [1, {max_len}] 内，得到 [{x.min()}, {x.max()}]")
    return x


def bucket_of(lengths, buckets: Sequence[int]) -> np.ndarray:
    """每个长度所属的桶上界（第一个 >= n 的桶）。"""
    b = np.asarray(sorted(buckets), np.int64)
    idx = np.searchsorted(b, np.asarray(lengths, np.int64), side="left")
    if (idx >= len(b)).any():
        raise ValueError(f"有长度超过最大桶 {b[-1]}")
    return b[idx]


def expected_cost(lengths, buckets: Sequence[int], cost: Cost = DEFAULT_ATTENTION_CROSSOVER) -> float:
    """每请求的期望代价（按桶填充后）。"""
    return float(_cost_fn(cost)(bucket_of(lengths, buckets)).mean())


def plan_seq_buckets(lengths: np.ndarray, num_buckets: int, max_len: int, align: int = 16,
                     cost: Cost = DEFAULT_ATTENTION_CROSSOVER) -> List[int]:
    """选至多 num_buckets 个桶上界（align 的倍数，最后一个恒为 max_len），使经验分布下的期望代价最小。

    精确动态规划：候选边界 {align, 2*align, ..., max_len}（M 个），f[k][j] = 用 k 个桶覆盖 <= cand[j] 的
    全部请求、最后一个桶为 cand[j] 的最小总代价；O(K * M^2)。同样最优时取桶数最少的解（不会返回没有请求的桶，
    max_len 除外）：每个桶要为每个 batch 桶捕获一张 CUDA Graph，空桶只有成本。
    """
    if not (isinstance(num_buckets, (int, np.integer)) and num_buckets >= 1):
        raise ValueError(f"num_buckets 应为正整数，得到 {num_buckets!r}")
    if not (isinstance(align, (int, np.integer)) and align >= 1):
        raise ValueError(f"align 应为正整数，得到 {align!r}")
    if max_len < 1:
        raise ValueError(f"max_len 应为正整数，得到 {max_len!r}")
    x = _check_lengths(lengths, max_len)
    cand = np.arange(align, max_len, align, dtype=np.int64)
    cand = np.append(cand[cand < max_len], max_len)
    m = len(cand)
    # cnt[j] = 长度 <= cand[j] 的请求数；c[j] = cand[j] 的单请求代价
    cnt = np.searchsorted(np.sort(x), cand, side="right").astype(np.float64)
    c = _cost_fn(cost)(cand)
    # f[j]：k 个桶、最后一个为 cand[j]；k = 1 时一个桶覆盖全部 <= cand[j]
    f = cnt * c
    back: List[np.ndarray] = [np.full(m, -1)]
    best = [f[-1]]
    fs = [f]
    # 候选 i < j 的转移矩阵：f_prev[i] + (cnt[j] - cnt[i]) * c[j]
    upper = np.triu(np.ones((m, m), dtype=bool), k=1)  # upper[i, j] = i < j
    for _ in range(1, min(num_buckets, m)):
        trans = fs[-1][:, None] + (cnt[None, :] - cnt[:, None]) * c[None, :]
        trans = np.where(upper, trans, np.inf)
        arg = np.argmin(trans, axis=0)
        f = trans[arg, np.arange(m)]
        fs.append(f)
        back.append(arg)
        best.append(f[-1])
    # 最优值相同（相对 1e-12 内）时取最少的桶数
    opt = min(best)
    k = next(i for i, v in enumerate(best) if v <= opt * (1 + 1e-12) + 1e-12)
    j, out = m - 1, []
    for level in range(k, -1, -1):
        out.append(int(cand[j]))
        j = int(back[level][j])
    return sorted(out)


def padding_report(lengths, buckets: Sequence[int], cost: Cost = DEFAULT_ATTENTION_CROSSOVER) -> Dict[str, object]:
    """一组桶在长度分布下的填充情况：
    padded_token_share（填充 token 占全部 token 的比例）、cost_ratio（期望代价 / 不填充时的期望代价，>= 1）、
    request_share（每个桶的请求比例）、mean_length、mean_padded_length。"""
    buckets = sorted(int(b) for b in buckets)
    x = _check_lengths(lengths, buckets[-1])
    padded = bucket_of(x, buckets)
    fn = _cost_fn(cost)
    shares = {str(b): float(np.mean(padded == b)) for b in buckets}
    return {"buckets": buckets, "requests": int(x.size),
            "padded_token_share": float(1.0 - x.sum() / padded.sum()),
            "cost_ratio": float(fn(padded).mean() / fn(x).mean()),
            "expected_cost": float(fn(padded).mean()),
            "request_share": shares,
            "mean_length": float(x.mean()), "mean_padded_length": float(padded.mean())}


def execute_padding(lengths, batch: int, seq_buckets: Sequence[int], batch_buckets: Sequence[int],
                    pack_width: int = 0, trials: int = 2000, seed: int = 0) -> Dict[str, float]:
    """一次 execute 有 batch 个请求（长度从 lengths 里有放回地抽）时，编码器要算的 token 数 ÷ 真正需要的 token 数
    （token_ratio，>= 1）与长度组数（launches，每组一次 CUDA Graph 重放），trials 次的平均。

    padding_report 只看每个请求补到自己的桶；服务时一次 execute 的请求还要按长度分组、每组行数补到 batch 桶，
    填充更多（H100 上 execute 里填充占 token 的 0.55–0.65，benchmarks/h100-2026-11-28）。
    pack_width=0：按长度桶分组（engine.pack_rows=false 的运行器，不含它按实测代价合并相邻组）；
    pack_width=W：把不超过 W 的历史按首次适应递减（runtime/rowpack.first_fit_decreasing）拼进宽 W 的行（行数补到
    batch 桶），更长的照旧按长度桶分组；
    pack_width=-1：engine.pack_rows 实现的拼法（runtime/rowpack.plan）：W = 这次最长者所在的长度桶、全部拼行、一次启动。
    都是估算，不是测量（只算编码器的 token；拼行时解码器的记忆也补到 W，不在这里）。"""
    from algorithm.serving.runtime.buckets import round_up
    from algorithm.serving.runtime.rowpack import first_fit_decreasing

    seq_buckets = sorted(int(b) for b in seq_buckets)
    x = _check_lengths(lengths, seq_buckets[-1])
    rng = np.random.default_rng(seed)

    def grouped(ls: np.ndarray):
        cls = bucket_of(ls, seq_buckets)
        groups = np.unique(cls)
        return sum(round_up(int((cls == c).sum()), batch_buckets) * int(c) for c in groups), len(groups)

    tokens = launches = need = 0.0
    for _ in range(trials):
        ls = rng.choice(x, batch)
        need += ls.sum()
        if not pack_width:
            t, g = grouped(ls)
        elif pack_width < 0:
            width = int(bucket_of(np.array([ls.max()]), seq_buckets)[0])
            _, _, rows = first_fit_decreasing(ls, width)
            t, g = round_up(rows, batch_buckets) * width, 1
        else:
            _, _, rows = first_fit_decreasing(ls[ls <= pack_width], pack_width)
            t = round_up(rows, batch_buckets) * pack_width if rows else 0
            g = 1 if rows else 0
            long = ls[ls > pack_width]
            if long.size:
                t2, g2 = grouped(long)
                t, g = t + t2, g + g2
        tokens += t
        launches += g
    return {"batch": int(batch), "pack_width": int(pack_width), "token_ratio": float(tokens / need),
            "launches": float(launches / trials), "trials": int(trials)}


__all__ = ["DEFAULT_ATTENTION_CROSSOVER", "bucket_of", "default_lengths", "execute_padding", "expected_cost",
           "model_cost", "padding_report", "plan_seq_buckets", "quadratic_cost"]
