"""参考 UGT 模型：TIGER 风格的 encoder-decoder，forward 内做 3 步 beam search。

输入输出遵守 algorithm.interfaces.EngineContract：
  六个输入 [B, L] -> recommendations [B, top_k, 3] int64, scores [B, top_k] fp32。

设计要点：
- 每个历史物品是一个 token，嵌入 = e1(l1) + e2(l2) + e3(l3) + pos + type；
- 注意力用 scaled_dot_product_attention + 加性偏置（有限的大负数，而不是 -inf），
  这样全填充的行也不会产生 NaN；形状全用运行时的 shape，导出时不会被固化；
- 右侧填充：有效位置的编码器输出与不填充时一致，交叉注意力屏蔽填充位置，
  所以填充前后 top-k 相同（测试覆盖）；
- 解码 3 步：步 1 对 l1 取 top-beam；步 2、3 把 beam 分数与新一级的 log_softmax 相加，
  在 beam*V 个候选中取 top-beam。交叉注意力的 K/V 只算一次，各 beam 的查询拼在一起，
  不把编码器输出复制 beam 份；
- 解码器自注意力的 KV 缓存（decoder_kv_cache，默认开）：每步只算新的一个位置，前面位置的 K/V 按父 beam 取用。
  因果的 Pre-LN 解码器里位置 t 的输出只依赖 <= t 的位置，所以与每步重算整个前缀（decoder_kv_cache=False，
  作对照保留）数学上相同；解码器的行数从每个请求 1 + 2K + 3K 降到 1 + K + K（K 为 beam 数）。
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from algorithm.models.config import UGTConfig


def _mask_value(dtype: torch.dtype) -> float:
    # 半精度下 -1e9 会溢出成 -inf；取该类型最小值的一半，softmax 后为 0 且不产生 NaN
    return float(torch.finfo(dtype).min) / 2


class Attention(nn.Module):
    """多头注意力；kv 可以预先算好（交叉注意力在各解码步间复用）。

    explicit=True：不用 SDPA，显式算 softmax(q k^T / sqrt(dh) + bias) v。给解码器的自注意力用：那里每条序列只有
    1-3 个 token，却有 B*beam*头 = 3.8 万个（b64）小问题；SDPA 的融合内核按 64x128 的块处理每个小问题，H100 上
    b64xL128 的一次运行里这一项占约 19 ms 中的 12 ms（benchmarks/h100-2026-11-25/profile）。显式实现只读写一遍 q/k/v；
    改后同一运行器 b64xL128 19.3 -> 9.2 ms（benchmarks/h100-2026-11-25-run2/machine1/profile*）。
    数学上与 SDPA 相同（在 fp32 里算）。"""

    def __init__(self, d_model: int, num_heads: int, explicit: bool = False):
        super().__init__()
        self.h = num_heads
        self.dh = d_model // num_heads
        self.explicit = explicit
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.o = nn.Linear(d_model, d_model)

    def project_kv(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.split_kv(self.kv(x))

    def split_kv(self, kv: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """kv 投影 [B, T, 2d] -> (k, v) 各为 [B, h, T, dh]。"""
        b = kv.shape[0]
        k, v = kv.view(b, -1, 2, self.h, self.dh).permute(2, 0, 3, 1, 4).unbind(0)
        return k, v

    def forward_cached(self, x: torch.Tensor, cache: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """自注意力，每条序列只有一个新位置：x [N, d]，cache [N, t-1, 2d]（前面位置的 kv 投影，None 表示没有）
        -> (输出 [N, d], 含新位置的 kv [N, t, 2d])。新位置看得见前面所有位置，不需要因果掩码。
        缓存存投影后的原始 [.., 2d]：换父 beam 时只需沿 beam 维 gather 一个张量。"""
        n = x.shape[0]
        kv = self.kv(x).unsqueeze(1)
        if cache is not None:
            kv = torch.cat([cache, kv], dim=1)
        k, v = self.split_kv(kv)  # 各 [N, h, t, dh]
        q = self.q(x).view(n, self.h, 1, self.dh)
        if self.explicit:
            out = _explicit_attention(q, k, v, None)  # [N, h, 1, dh]
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.o(out.reshape(n, self.h * self.dh)), kv

    def forward(self, x: torch.Tensor, kv: Tuple[torch.Tensor, torch.Tensor],
                bias: Optional[torch.Tensor]) -> torch.Tensor:
        b = x.shape[0]
        q = self.q(x).view(b, -1, self.h, self.dh).transpose(1, 2)
        if self.explicit:
            out = _explicit_attention(q, kv[0], kv[1], bias)
        else:
            out = F.scaled_dot_product_attention(q, kv[0], kv[1], attn_mask=bias)
        return self.o(out.transpose(1, 2).reshape(b, -1, self.h * self.dh))


def _explicit_attention(q, k, v, bias: Optional[torch.Tensor]) -> torch.Tensor:
    # 两个“矩阵乘”写成广播乘 + 求和（T <= 3，中间张量只有 q 的 T 倍）：Inductor 把它们编成 Triton 的逐元素 / 归约内核
    # （与周围的转置、类型转换融合；softmax 是另一个内核），而 matmul 在 H100 上落到 cuBLAS 的 FFMA / WMMA 小块内核。
    # b64xL128 一次运行里这部分 1.61 -> 1.34 ms；同一运行器离线 b8/b16/b64 快 1.10-1.15 倍（benchmarks/h100-2026-11-27）。
    # 乘加都在 fp32 里做。
    s = (q.float().unsqueeze(-2) * k.float().unsqueeze(-3)).sum(-1) * (q.shape[-1] ** -0.5)  # [.., T, T]
    if bias is not None:
        s = s + bias.float()
    p = torch.softmax(s, dim=-1)
    return (p.unsqueeze(-1) * v.float().unsqueeze(-3)).sum(-2).to(v.dtype)  # [.., T, dh]


class FeedForward(nn.Sequential):
    def __init__(self, d_model: int, dim_ff: int):
        super().__init__(nn.Linear(d_model, dim_ff), nn.GELU(), nn.Linear(dim_ff, d_model))


class EncoderLayer(nn.Module):
    """Pre-LN 编码器层。"""

    def __init__(self, cfg: UGTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg.d_model, cfg.num_heads)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.dim_feedforward)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, self.attn.project_kv(h), bias)
        return x + self.ff(self.ln2(x))


class DecoderLayer(nn.Module):
    """Pre-LN 解码器层：因果自注意力（beam 内）+ 交叉注意力（同一用户的所有 beam 共享记忆）。"""

    def __init__(self, cfg: UGTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.self_attn = Attention(cfg.d_model, cfg.num_heads, explicit=True)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.cross_attn = Attention(cfg.d_model, cfg.num_heads)
        self.ln3 = nn.LayerNorm(cfg.d_model)
        self.ff = FeedForward(cfg.d_model, cfg.dim_feedforward)
        self.register_buffer("causal", torch.ones(3, 3, dtype=torch.bool).tril(), persistent=False)

    def forward(self, x: torch.Tensor, memory_kv: Tuple[torch.Tensor, torch.Tensor],
                memory_bias: torch.Tensor) -> torch.Tensor:
        # x: [B, K, T, d]，K 为 beam 数，T 为已生成前缀长度（1..3）
        b, k, t, d = x.shape
        flat = x.reshape(b * k, t, d)
        h = self.ln1(flat)
        # 因果掩码取自缓冲区（随模型移动设备；torch.export 时不会把创建时的设备固化进图）
        causal_bias = torch.where(self.causal[:t, :t], 0.0, _mask_value(x.dtype)).to(x.dtype)
        flat = flat + self.self_attn(h, self.self_attn.project_kv(h), causal_bias)
        per_user = flat.reshape(b, k * t, d)
        per_user = per_user + self.cross_attn(self.ln2(per_user), memory_kv, memory_bias)
        per_user = per_user + self.ff(self.ln3(per_user))
        return per_user.reshape(b, k, t, d)

    def step(self, x: torch.Tensor, cache: Optional[torch.Tensor], memory_kv: Tuple[torch.Tensor, torch.Tensor],
             memory_bias: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """只算新的一个位置：x [B, K, d]，cache [B, K, t-1, 2d] 或 None -> (输出 [B, K, d], 新缓存 [B, K, t, 2d])。
        与 forward 对整个前缀的结果在最后一个位置上相同（测试对照）。"""
        b, k, d = x.shape
        a, kv = self.self_attn.forward_cached(self.ln1(x).reshape(b * k, d),
                                              None if cache is None else cache.reshape(b * k, -1, cache.shape[-1]))
        x = x + a.view(b, k, d)
        x = x + self.cross_attn(self.ln2(x), memory_kv, memory_bias)  # 同一用户的 K 个 beam 作 K 个查询
        x = x + self.ff(self.ln3(x))
        return x, kv.view(b, k, -1, kv.shape[-1])


class UGTModel(nn.Module):
    """参考 UGT 模型；forward(六个输入) -> (recommendations, scores)。"""

    def __init__(self, cfg: UGTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        v1, v2, v3 = cfg.codebook_sizes
        self.enc_l1 = nn.Embedding(v1, d)
        self.enc_l2 = nn.Embedding(v2, d)
        self.enc_l3 = nn.Embedding(v3, d)
        self.enc_pos = nn.Embedding(cfg.max_seq_length, d)
        self.enc_type = nn.Embedding(cfg.num_token_types, d)
        self.encoder = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers))
        self.enc_ln = nn.LayerNorm(d)
        self.bos = nn.Parameter(torch.zeros(d))
        self.dec_l1 = nn.Embedding(v1, d)
        self.dec_l2 = nn.Embedding(v2, d)
        self.dec_pos = nn.Embedding(3, d)
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers))
        self.dec_ln = nn.LayerNorm(d)
        self.heads = nn.ModuleList([nn.Linear(d, v1), nn.Linear(d, v2), nn.Linear(d, v3)])
        self.reset_parameters()
        self.constrained = False
        # 导出时是常量（Python 的 bool）：构建按 export.decoder_kv_cache 设置，False 是每步重算前缀的对照
        self.decoder_kv_cache = True

    def attach_catalog(self, semantic_ids) -> "UGTModel":
        """受目录约束的解码（前缀树）：只生成目录里存在的三元组。

        缓冲区（非持久，不进检查点；导出时成为常量）：
          valid_l1 [V1] bool；valid_l2 [V1, V2] bool；prefix_index [V1, V2] int32（无前缀为 -1）；
          l3_children [P, C] int64 与 l3_children_ok [P, C] bool：每个 (l1, l2) 前缀下的合法 l3（C 为最大子数）。
        目录变化后需重新导出引擎。
        """
        import numpy as np

        sem = np.asarray(semantic_ids, dtype=np.int64)
        v1, v2, v3 = self.cfg.codebook_sizes
        valid_l1 = np.zeros(v1, dtype=bool)
        valid_l1[sem[:, 0]] = True
        valid_l2 = np.zeros((v1, v2), dtype=bool)
        valid_l2[sem[:, 0], sem[:, 1]] = True
        prefix_keys, inverse = np.unique(sem[:, 0] * v2 + sem[:, 1], return_inverse=True)
        counts = np.bincount(inverse)
        width = max(int(counts.max()), -(-self.cfg.top_k // self.cfg.beam_width))
        children = np.zeros((len(prefix_keys), width), dtype=np.int64)
        children_ok = np.zeros((len(prefix_keys), width), dtype=bool)
        order = np.argsort(inverse, kind="stable")
        slot = np.arange(len(sem)) - np.repeat(np.cumsum(counts) - counts, counts)
        children[inverse[order], slot] = sem[order, 2]
        children_ok[inverse[order], slot] = True
        prefix_index = np.full(v1 * v2, -1, dtype=np.int32)
        prefix_index[prefix_keys] = np.arange(len(prefix_keys), dtype=np.int32)
        device = self.bos.device
        for name, arr in (("valid_l1", valid_l1), ("valid_l2", valid_l2), ("prefix_index", prefix_index.reshape(v1, v2)),
                          ("l3_children", children), ("l3_children_ok", children_ok)):
            self.register_buffer(name, torch.from_numpy(arr).to(device), persistent=False)
        self.constrained = True
        return self

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.normal_(self.bos, std=0.02)

    # ---- 编码器 ----
    def embed_tokens(self, l1, l2, l3, positions, token_types) -> torch.Tensor:
        return (self.enc_l1(l1) + self.enc_l2(l2) + self.enc_l3(l3)
                + self.enc_pos(positions) + self.enc_type(token_types))

    def embed(self, l1, l2, l3, positions, token_types, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """编码器的输入嵌入 [B, L, d] 与填充位置的加性偏置 [B, 1, 1, L]。"""
        x = self.embed_tokens(l1, l2, l3, positions, token_types)
        dtype = x.dtype
        return x, ((1.0 - mask.to(dtype)) * _mask_value(dtype))[:, None, None, :]

    def encode(self, l1, l2, l3, positions, token_types, mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """返回 (memory [B, L, d], 记忆的加性偏置 [B, 1, 1, L])。"""
        x, bias = self.embed(l1, l2, l3, positions, token_types, mask)
        for layer in self.encoder:
            x = layer(x, bias)
        return self.enc_ln(x), bias

    # ---- 解码器 ----
    def decode_hidden(self, step: int, c1: Optional[torch.Tensor], c2: Optional[torch.Tensor],
                      caches: Optional[List[torch.Tensor]], memory_kv, memory_bias
                      ) -> Tuple[torch.Tensor, Optional[List[torch.Tensor]]]:
        """第 step 步（1..3）最后一个位置的解码器输出 [B, K, d] 与新的自注意力缓存（每层一个 [B, K, t, 2d]）。
        c1 / c2：各 beam 已选的一、二级码 [B, K]（已按父 beam 排好）；caches：上一步的缓存（同样排好）。
        decoder_kv_cache=False 时每步重算整个前缀 [B, K, t, d]（对照用），不返回缓存。"""
        b = memory_bias.shape[0]
        dtype = memory_bias.dtype
        d = self.cfg.d_model

        def bos():
            return self.bos.to(dtype).view(1, 1, d).expand(b, 1 if c1 is None else c1.shape[1], d)

        if not self.decoder_kv_cache:
            tokens = [bos()] + ([self.dec_l1(c1)] if step >= 2 else []) + ([self.dec_l2(c2)] if step >= 3 else [])
            x = torch.stack(tokens, dim=2) + self.dec_pos.weight[:step].to(dtype)
            for layer, kv in zip(self.decoder, memory_kv):
                x = layer(x, kv, memory_bias)
            return x[:, :, -1, :], None
        newest = bos() if step == 1 else (self.dec_l1(c1) if step == 2 else self.dec_l2(c2))  # 只嵌入新的位置
        x = newest + self.dec_pos.weight[step - 1].to(dtype)
        new = []
        for i, (layer, kv) in enumerate(zip(self.decoder, memory_kv)):
            x, c = layer.step(x, None if caches is None else caches[i], kv, memory_bias)
            new.append(c)
        return x, new

    def head_logp(self, h: torch.Tensor, level: int) -> torch.Tensor:
        """解码器输出 [B, K, d] -> 第 level 级的 log_softmax [B, K, V]（fp32）。"""
        return torch.log_softmax(self.heads[level](self.dec_ln(h)).float(), dim=-1)

    def select_l1(self, logp: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """logp [B, V1] -> (beam 分数 [B, K], 一级码 [B, K])。"""
        if self.constrained:
            logp = logp.masked_fill(~self.valid_l1, _mask_value(torch.float32))
        return torch.topk(logp, self.cfg.beam_width, dim=-1)

    def select_l2(self, scores, c1, logp) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (分数 [B, K], 父 beam [B, K], 二级码 [B, K])。"""
        if self.constrained:
            logp = logp.masked_fill(~self.valid_l2[c1], _mask_value(torch.float32))
        return _beam_topk(scores.unsqueeze(-1) + logp, self.cfg.beam_width)

    def select_l3(self, scores, c1, c2, logp) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (recommendations [B, top_k, 3] int64, scores [B, top_k] fp32)。"""
        if self.constrained:
            # 只看每个前缀下的合法 l3：[B, K, C]
            pidx = self.prefix_index[c1, c2].long()
            has_prefix = pidx >= 0
            pidx = pidx.clamp(min=0)
            kids = self.l3_children[pidx]  # [B, K, C]
            ok = self.l3_children_ok[pidx] & has_prefix.unsqueeze(-1)
            logp = torch.gather(logp, 2, kids).masked_fill(~ok, _mask_value(torch.float32))
        else:
            kids = None
        scores, parent, c3 = _beam_topk(scores.unsqueeze(-1) + logp, self.cfg.top_k)
        if kids is not None:  # c3 是 kids 里的槽位 -> 真正的三级码
            c3 = torch.gather(torch.gather(kids, 1, parent.unsqueeze(-1).expand(-1, -1, kids.shape[-1])),
                              2, c3.unsqueeze(-1)).squeeze(-1)
        c1 = torch.gather(c1, 1, parent)
        c2 = torch.gather(c2, 1, parent)
        return torch.stack([c1, c2, c3], dim=-1).to(torch.int64), scores.float()

    def forward(self, encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, encoder_positions,
                encoder_token_types, encoder_mask):
        # algorithm/serving/profile/eager.py 的 staged_forward 按同样的顺序调用这些方法分阶段计时：改这里要一起改
        memory, bias = self.encode(encoder_l1_ids, encoder_l2_ids, encoder_l3_ids,
                                   encoder_positions, encoder_token_types, encoder_mask)
        return self.search([layer.cross_attn.project_kv(memory) for layer in self.decoder], bias)

    def forward_packed(self, l1, l2, l3, positions, token_types, segments, request_index):
        """拼行的编码器（engine.pack_rows，只有 torch 引擎用）：几条短历史首尾相接放进同一行，一次 execute 一次启动。

        l1..token_types、segments [R, W]：R 行、每行宽 W；segments 为该位置所属历史的编号（> 0），0 = 填充。
        编码器自注意力只在同一编号内（行内块对角的加性偏置），所以每条历史的编码器输出与单独编码时相同。
        request_index [N, W]：第 i 条历史的第 j 个位置在 R*W 个位置里的下标，-1 = 填充（交叉注意力屏蔽）。
        交叉注意力的 K/V 在拼好的行上投影（只算有用的 token），再按 request_index 取成每条历史 [N, W, 2d]。
        返回与 forward 相同：recommendations [N, top_k, 3]、scores [N, top_k]。"""
        x = self.embed_tokens(l1, l2, l3, positions, token_types)
        dtype = x.dtype
        same = (segments[:, :, None] == segments[:, None, :]) & (segments[:, None, :] > 0)  # [R, W, W]
        bias = torch.where(same, 0.0, _mask_value(dtype)).to(dtype)[:, None]  # [R, 1, W, W]
        for layer in self.encoder:
            x = layer(x, bias)
        flat = self.enc_ln(x).reshape(-1, x.shape[-1])  # [R*W, d]
        valid = request_index >= 0
        idx = request_index.clamp(min=0)
        memory_bias = ((~valid).to(dtype) * _mask_value(dtype))[:, None, None, :]  # [N, 1, 1, W]
        memory_kv = [layer.cross_attn.split_kv(layer.cross_attn.kv(flat)[idx]) for layer in self.decoder]
        return self.search(memory_kv, memory_bias)

    def search(self, memory_kv, bias):
        """3 步 beam search：每层交叉注意力的 (k, v) 与记忆的加性偏置 [B, 1, 1, L] -> (recommendations, scores)。"""
        h, caches = self.decode_hidden(1, None, None, None, memory_kv, bias)  # 步 1：一级码
        scores, c1 = self.select_l1(self.head_logp(h, 0)[:, 0, :])
        caches = expand_beams(caches, c1.shape[1])
        h, caches = self.decode_hidden(2, c1, None, caches, memory_kv, bias)  # 步 2：二级码
        scores, parent, c2 = self.select_l2(scores, c1, self.head_logp(h, 1))
        c1 = torch.gather(c1, 1, parent)
        caches = gather_beams(caches, parent)
        h, _ = self.decode_hidden(3, c1, c2, caches, memory_kv, bias)  # 步 3：三级码
        return self.select_l3(scores, c1, c2, self.head_logp(h, 2))


class PackedUGT(nn.Module):
    """导出用：forward 即 UGTModel.forward_packed（torch.export 导出的是 forward）。"""

    def __init__(self, model: UGTModel):
        super().__init__()
        self.model = model

    def forward(self, l1, l2, l3, positions, token_types, segments, request_index):
        return self.model.forward_packed(l1, l2, l3, positions, token_types, segments, request_index)


def expand_beams(caches: Optional[List[torch.Tensor]], width: int) -> Optional[List[torch.Tensor]]:
    """步 1 的缓存（每个用户一个 beam）给 width 个 beam 共用（expand，不复制）。"""
    return None if caches is None else [c.expand(-1, width, -1, -1) for c in caches]


def gather_beams(caches: Optional[List[torch.Tensor]], parent: torch.Tensor) -> Optional[List[torch.Tensor]]:
    """按父 beam [B, K] 重排每层的缓存 [B, K, t, 2d]。"""
    if caches is None:
        return None
    return [torch.gather(c, 1, parent[:, :, None, None].expand(-1, -1, c.shape[2], c.shape[3])) for c in caches]


def _beam_topk(total: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """total [B, K, V]（每个 beam 的累计分数）-> 全局 top-k 的 (分数 [B, k], 父 beam [B, k], 子码 [B, k])。

    先每个 beam 取 top-min(k, V)，再在 K x min(k, V) 个候选里取 top-k：全局前 k 个里每个 beam 至多贡献 k 个，结果相同。
    父 beam 用常量表 gather 得到，不做除法：导出的图里没有“整数 -> 浮点 -> 除法 -> 取整”，fp16 引擎里
    大于 65504 的扁平下标不会溢出（曾在 ONNX Runtime fp16 里把下标变成越界的 Gather）。
    """
    b, beams, v = total.shape
    kk = min(k, v)
    s, child = torch.topk(total, kk, dim=-1)  # [B, K, kk]
    scores, idx = torch.topk(s.reshape(b, beams * kk), k, dim=-1)
    # 每个候选的父 beam 编号 [K * kk]：由 ones_like 的累加得到（不写设备，导出的程序与设备无关）
    parent_of = (torch.ones_like(child[0]).cumsum(0) - 1).reshape(-1)
    return scores, parent_of[idx], torch.gather(child.reshape(b, beams * kk), 1, idx)


def teacher_forcing_loss(model: "UGTModel", inputs, targets: torch.Tensor) -> torch.Tensor:
    """训练用：给定下一物品的语义 ID targets [B, 3]，三级交叉熵之和（teacher forcing）。"""
    memory, bias = model.encode(*inputs)
    memory_kv = [layer.cross_attn.project_kv(memory) for layer in model.decoder]
    b, d = memory.shape[0], memory.shape[2]
    prefix = torch.stack([model.bos.expand(b, d), model.dec_l1(targets[:, 0]), model.dec_l2(targets[:, 1])], dim=1)
    x = (prefix + model.dec_pos.weight[:3]).unsqueeze(1)  # [B, 1, 3, d]
    for layer, kv in zip(model.decoder, memory_kv):
        x = layer(x, kv, bias)
    x = model.dec_ln(x[:, 0])
    return sum(F.cross_entropy(model.heads[i](x[:, i]), targets[:, i]) for i in range(3))


def flops_per_request(cfg: UGTConfig, seq_len: int, kv_cache: bool = True) -> float:
    """一个请求（历史长度 seq_len）的前向浮点运算数（乘加记 2）；只计矩阵乘法。
    kv_cache：解码器每步只算新位置（默认，与 UGTModel.decoder_kv_cache 相同）；False 按每步重算整个前缀计
    （2026-11-28 之前的引擎与 benchmarks/ 里那时的 MFU 用的是这一种）。"""
    d, f, k = cfg.d_model, cfg.dim_feedforward, cfg.beam_width
    v1, v2, v3 = cfg.codebook_sizes
    enc_layer = seq_len * (2 * 4 * d * d + 2 * 2 * d * f) + 2 * 2 * seq_len * seq_len * d
    enc = cfg.num_encoder_layers * enc_layer
    cross_kv = cfg.num_decoder_layers * seq_len * 2 * 2 * d * d
    dec = 0.0
    for t, rows in ((1, 1), (2, k), (3, k)):
        tokens = rows if kv_cache else rows * t  # 这一步算的位置数
        per_layer = tokens * (2 * 4 * d * d + 2 * 2 * d * d + 2 * 2 * d * f)  # 自注意力 QKVO + 交叉 QO + FFN
        per_layer += 2 * 2 * tokens * (t + seq_len) * d  # 注意力分数与加权
        dec += cfg.num_decoder_layers * per_layer
    heads = 2 * d * (v1 + k * v2 + k * v3)
    return float(enc + cross_kv + dec + heads)


def build_model(cfg: UGTConfig, seed: int = 0) -> UGTModel:
    """按配置与种子构建（未训练的）参考模型，eval 模式。"""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = UGTModel(cfg)
    finally:
        torch.random.set_rng_state(gen_state)
    return model.eval()


__all__ = ["PackedUGT", "UGTModel", "build_model", "expand_beams", "flops_per_request", "gather_beams", "teacher_forcing_loss"]
