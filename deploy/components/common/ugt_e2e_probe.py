"""端到端探针：向本机 Triton 发一条真实推荐请求，确认整条 ensemble（前处理 -> 引擎 -> 后处理）能给出 50 个物品。

为什么需要它：`/v2/health/ready` 只看模型状态。Python backend 的存根进程被杀后（OOM、段错误），
Triton 2.51 里模型仍显示就绪，请求却一直得到 “Stub process is not healthy”（见 README 可靠性一节），
所以就绪 / 存活探针必须真的走一遍推理。

只用标准库（容器里的 python3 即可运行，不依赖 numpy、tritonclient、本包），以 ConfigMap 挂进 Pod：
  python3 /opt/ugt-probe/ugt_e2e_probe.py [--allow-overload]

请求里的物品 id 必须在目录中（否则被当作未知物品跳过，历史为空时请求被拒）。来源，按顺序：
  1. UGT_PROBE_ITEM_IDS：逗号分隔的物品 id（例如目录里的前几个）；
  2. UGT_PROBE_CATALOG 指向的目录文件（默认镜像里的 /models/ugt_preprocess/1/catalog.npz）的前
     UGT_PROBE_NUM_ITEMS 个（默认 8）物品；.npz 是 zip 里的 .npy，这里用标准库解析。
其余环境变量：UGT_PROBE_URL（默认 http://127.0.0.1:8000）、UGT_PROBE_MODEL（ugt_recommend）、
UGT_PROBE_TIMEOUT_S（每个 HTTP 请求的超时，默认 5，须小于探针的 timeoutSeconds）。

退出码 0 = 健康，1 = 不健康；一行说明写到标准输出（kubelet 把它记进 Pod 的事件）。
--allow-overload：HTTP 503（队列满或排队超时，Triton 的 UNAVAILABLE）算健康。存活 / 就绪探针都带上它：
过载的副本进程是好的，重启它或把它摘出 Service 只会把负载压到其余副本上，引起连锁失败；扩容交给 HPA。
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zipfile
from typing import List, Optional, Sequence

HISTORY_INPUT = "history_item_ids"
ITEMS_OUTPUT = "item_ids"
TOP_K = 50
DEFAULT_CATALOG = "/models/ugt_preprocess/1/catalog.npz"


class ProbeFailure(Exception):
    """探针失败：消息写明哪一步、看到了什么。"""


def read_npz_int64_prefix(path: str, key: str, count: int) -> List[int]:
    """从 np.savez / np.savez_compressed 写的 .npz 里读一维 int64 数组 key 的前 count 个值。

    .npy 格式：6 字节魔数、2 字节版本、头长度（v1 为 2 字节，v2/v3 为 4 字节，小端）、
    一个 Python 字面量字典（descr、fortran_order、shape），随后是原始数据。
    """
    try:
        with zipfile.ZipFile(path) as z, z.open(key + ".npy") as f:
            if f.read(6) != b"\x93NUMPY":
                raise ProbeFailure(f"{path}:{key}.npy 不是 .npy 格式")
            major = f.read(2)[0]
            header_len = struct.unpack("<H" if major == 1 else "<I", f.read(2 if major == 1 else 4))[0]
            header = ast.literal_eval(f.read(header_len).decode("latin1"))
            if header.get("descr") not in ("<i8", "|i8") or len(header.get("shape", ())) != 1:
                raise ProbeFailure(f"{path}:{key} 应为一维 int64，头为 {header}")
            n = min(count, header["shape"][0])
            return list(struct.unpack(f"<{n}q", f.read(8 * n)))
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise ProbeFailure(f"读不了目录文件 {path}（{type(e).__name__}: {e}）；"
                           f"可用 UGT_PROBE_ITEM_IDS 直接给出物品 id") from e


def probe_item_ids(env=os.environ) -> List[int]:
    """探针请求用的历史：UGT_PROBE_ITEM_IDS，否则目录的前几个物品。"""
    given = env.get("UGT_PROBE_ITEM_IDS", "").strip()
    if given:
        try:
            ids = [int(x) for x in given.split(",") if x.strip()]
        except ValueError as e:
            raise ProbeFailure(f"UGT_PROBE_ITEM_IDS 应为逗号分隔的整数，得到 {given!r}") from e
    else:
        ids = read_npz_int64_prefix(env.get("UGT_PROBE_CATALOG", DEFAULT_CATALOG), "item_ids",
                                    int(env.get("UGT_PROBE_NUM_ITEMS", "8")))
    if not ids:
        raise ProbeFailure("没有可用的物品 id")
    return ids


def _request(url: str, body: Optional[bytes], timeout_s: float):
    """返回 (HTTP 状态码, 响应体)；连接失败、超时抛 ProbeFailure。"""
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError) as e:  # 拒绝连接、超时
        raise ProbeFailure(f"{url} 无响应（{type(e).__name__}: {getattr(e, 'reason', e)}）") from e


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body).get("error", body[:200]))
    except (ValueError, AttributeError):
        return body[:200].decode("utf-8", "replace")


def check(base_url: str, model: str, item_ids: Sequence[int], timeout_s: float, allow_overload: bool) -> str:
    """就绪检查 + 一条推理；健康时返回一行说明，不健康时抛 ProbeFailure。"""
    base_url = base_url.rstrip("/")
    status, body = _request(f"{base_url}/v2/health/ready", None, timeout_s)
    if status != 200:
        raise ProbeFailure(f"/v2/health/ready 返回 {status}")
    payload = {"inputs": [{"name": HISTORY_INPUT, "datatype": "INT64", "shape": [1, len(item_ids)],
                           "data": [int(i) for i in item_ids]}],
               "outputs": [{"name": ITEMS_OUTPUT}]}
    url = f"{base_url}/v2/models/{model}/infer"
    status, body = _request(url, json.dumps(payload).encode(), timeout_s)
    if status == 503 and allow_overload:
        return f"过载（HTTP 503：{_error_text(body)}），进程存活"
    if status != 200:
        raise ProbeFailure(f"推理返回 HTTP {status}：{_error_text(body)}")
    try:
        outputs = {o["name"]: o for o in json.loads(body)["outputs"]}
        data = outputs[ITEMS_OUTPUT]["data"]
    except (ValueError, KeyError, TypeError) as e:
        raise ProbeFailure(f"推理响应里没有输出 {ITEMS_OUTPUT}：{body[:200]!r}") from e
    if len(data) != TOP_K or not all(isinstance(x, int) for x in data):
        raise ProbeFailure(f"{ITEMS_OUTPUT} 应为 {TOP_K} 个整数，得到 {len(data)} 个：{data[:5]}...")
    valid = sum(1 for x in data if x >= 0)
    if valid == 0:  # 全是 -1 填充：流水线在跑，但没有给出任何真实物品
        raise ProbeFailure(f"{ITEMS_OUTPUT} 全为填充值 -1")
    return f"正常：{len(item_ids)} 个物品的历史得到 {valid} 个推荐"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description="UGT ensemble 的端到端探针（退出码 0 = 健康）")
    p.add_argument("--url", default=os.environ.get("UGT_PROBE_URL", "http://127.0.0.1:8000"))
    p.add_argument("--model", default=os.environ.get("UGT_PROBE_MODEL", "ugt_recommend"))
    p.add_argument("--timeout", type=float, default=float(os.environ.get("UGT_PROBE_TIMEOUT_S", "5")))
    p.add_argument("--allow-overload", action="store_true", help="HTTP 503（过载）算健康")
    a = p.parse_args(argv)
    try:
        print(check(a.url, a.model, probe_item_ids(), a.timeout, a.allow_overload))
        return 0
    except ProbeFailure as e:
        print(f"不健康：{e}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
