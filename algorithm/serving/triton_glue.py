"""Triton Python backend 与 triton_models 之间的薄适配层（只在服务器进程里导入）。

把 pb_utils 的请求变成 {输入名: numpy}，把结果（字典或异常）变成 InferenceResponse。
用户错误以 INVALID_ARG 返回（HTTP 400），引擎故障以 INTERNAL 返回。
"""
from __future__ import annotations

from typing import Iterable, List

from algorithm.interfaces import ContractError


def read_requests(pb_utils, requests, names: Iterable[str]) -> List[dict]:
    names = list(names)
    out = []
    for r in requests:
        d = {}
        for n in names:
            t = pb_utils.get_input_tensor_by_name(r, n)
            d[n] = None if t is None else t.as_numpy()
        out.append(d)
    return out


def _error(pb_utils, exc: Exception):
    code = None
    err_cls = pb_utils.TritonError
    if isinstance(exc, (ContractError, ValueError)):
        code = getattr(err_cls, "INVALID_ARG", None)
    else:
        code = getattr(err_cls, "INTERNAL", None)
    msg = str(exc)
    try:
        return err_cls(msg, code) if code is not None else err_cls(msg)
    except TypeError:  # 旧版 python backend 的 TritonError 只接受消息
        return err_cls(msg)


def write_responses(pb_utils, results) -> list:
    responses = []
    for res in results:
        if isinstance(res, Exception):
            responses.append(pb_utils.InferenceResponse(output_tensors=[], error=_error(pb_utils, res)))
        else:
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(k, v) for k, v in res.items()]))
    return responses


