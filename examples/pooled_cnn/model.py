"""示例：一个不是参考架构的模型——卷积 + 池化的用户编码器，三级逐级 beam search。

它是“团队自己的模型”的样子：本包不认识它的结构，只认契约——forward 按顺序接受六个输入
（encoder_l1/l2/l3_ids、encoder_positions、encoder_token_types、encoder_mask，[B, L]），
返回 recommendations [B, K, 3] int64 与 scores [B, K] float32（降序的对数概率之和）。
码本大小 32 / 32 / 64（不是默认的 1024 / 4096 / 16384），与 conf/model/pooled_cnn.yaml 一致。

它还提供 attach_catalog(semantic_ids)：构建时按目录约束生成（只生成目录里有的物品）；
没有 decoder_kv_cache 与 forward_packed，构建日志会写明这两项关掉。
构建用的工厂：examples/pooled_cnn/model.py:build（无参）。
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CODEBOOK_SIZES = (32, 32, 64)
NUM_TOKEN_TYPES = 8
MAX_SEQ_LENGTH = 1024
TOP_K = 50
MASKED = -1.0e4  # 目录外的码：足够小，fp16 里也不溢出


class PooledCNN(nn.Module):
    def __init__(self, codebook_sizes=CODEBOOK_SIZES, num_token_types=NUM_TOKEN_TYPES,
                 max_seq_length=MAX_SEQ_LENGTH, dim=64, top_k=TOP_K):
        super().__init__()
        v1, v2, v3 = codebook_sizes
        self.sizes, self.top_k = (v1, v2, v3), top_k
        self.emb = nn.ModuleList([nn.Embedding(v, dim) for v in (v1, v2, v3)])
        self.type_emb = nn.Embedding(num_token_types, dim)
        self.pos_emb = nn.Embedding(max_seq_length, dim)
        self.conv1 = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv2 = nn.Conv1d(dim, dim, 5, padding=2)
        u = 2 * dim  # 用户向量 = [masked mean, masked max]
        self.head1, self.head2, self.head3 = nn.Linear(u, v1), nn.Linear(u, v2), nn.Linear(u, v3)
        self.code1, self.code2 = nn.Embedding(v1, u), nn.Embedding(v2, u)
        # 目录约束的加性掩码（0 = 可生成，MASKED = 目录里没有）；不进 state_dict，由 attach_catalog 设置
        self.register_buffer("mask1", torch.zeros(v1), persistent=False)
        self.register_buffer("mask2", torch.zeros(v1, v2), persistent=False)
        self.register_buffer("mask3", torch.zeros(v1, v2, v3), persistent=False)

    def attach_catalog(self, semantic_ids) -> "PooledCNN":
        """只生成目录里存在的 (l1, l2, l3)：三级前缀各一张掩码。"""
        sem = torch.as_tensor(semantic_ids, dtype=torch.long)
        v1, v2, v3 = self.sizes
        m3 = torch.full((v1, v2, v3), MASKED)
        m3[sem[:, 0], sem[:, 1], sem[:, 2]] = 0.0
        self.mask3 = m3
        self.mask2 = torch.where((m3 == 0).any(-1), 0.0, MASKED)
        self.mask1 = torch.where((m3 == 0).flatten(1).any(-1), 0.0, MASKED)
        return self

    def user_vector(self, l1, l2, l3, positions, token_types, mask):
        m = mask.unsqueeze(-1).to(self.pos_emb.weight.dtype)  # 跟随参数的精度：fp16 / bf16 构建时不混入 fp32
        x = (self.emb[0](l1) + self.emb[1](l2) + self.emb[2](l3) + self.type_emb(token_types)
             + self.pos_emb(positions)) * m
        h = F.gelu(self.conv1(x.transpose(1, 2)))
        h = (F.gelu(self.conv2(h)) + h).transpose(1, 2) * m
        mean = h.sum(1) / m.sum(1).clamp(min=1.0)
        peak = (h + (m - 1.0) * 1.0e4).amax(1)
        return torch.cat([mean, peak], -1)

    def forward(self, encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, encoder_positions, encoder_token_types,
                encoder_mask):
        v1, v2, v3 = self.sizes
        k = self.top_k
        u = self.user_vector(encoder_l1_ids, encoder_l2_ids, encoder_l3_ids, encoder_positions, encoder_token_types,
                             encoder_mask)
        # 第 1 级：保留 min(k, V1) 个
        s1, c1 = F.log_softmax(self.head1(u) + self.mask1, -1).topk(min(k, v1), -1)
        # 第 2 级：每个 l1 展开 V2 个，保留 k 个
        h2 = u.unsqueeze(1) + self.code1(c1)
        lp2 = F.log_softmax(self.head2(h2) + self.mask2[c1], -1)
        s2, i2 = (s1.unsqueeze(-1) + lp2).flatten(1).topk(min(k, c1.shape[1] * v2), -1)
        p2 = torch.div(i2, v2, rounding_mode="floor")
        c1 = c1.gather(1, p2)
        c2 = i2 % v2
        h3 = h2.gather(1, p2.unsqueeze(-1).expand(-1, -1, h2.shape[-1])) + self.code2(c2)
        # 第 3 级
        lp3 = F.log_softmax(self.head3(h3) + self.mask3[c1, c2], -1)
        scores, i3 = (s2.unsqueeze(-1) + lp3).flatten(1).topk(k, -1)
        p3 = torch.div(i3, v3, rounding_mode="floor")
        rec = torch.stack([c1.gather(1, p3), c2.gather(1, p3), i3 % v3], -1)
        return rec, scores.float()

    def loss(self, inputs, targets):
        """教师强制的下一个物品损失：三级码的负对数似然之和（训练用，服务不用）。"""
        u = self.user_vector(*inputs)
        t1, t2, t3 = targets.unbind(-1)
        h2 = u + self.code1(t1)
        h3 = h2 + self.code2(t2)
        return (F.cross_entropy(self.head1(u), t1) + F.cross_entropy(self.head2(h2), t2)
                + F.cross_entropy(self.head3(h3), t3))


def build() -> PooledCNN:
    """model.factory 指向的无参工厂：只建结构，权重由 checkpoint= 给出。"""
    torch.manual_seed(0)
    return PooledCNN()
