"""上线与回滚：把新构建的仓库版本滚动进运行中的 Triton（explicit 模型控制模式），不停服务、不丢请求。

服务中的仓库（<repo>/，服务器的 --model-repository）里：
  <public>/                         公开的 ensemble（默认 ugt_recommend）：config.pbtxt 的三个步骤指向当前版本
  <step>__<tag>/                    某个版本的一个步骤（ugt_preprocess__v2、ugt_engine__v2、ugt_postprocess__v2），
                                    从新构建的仓库复制、改名；目录文件跟着前/后处理走，所以“新引擎配旧目录”不会出现
  <public>__<tag>/                  这个版本自己的 ensemble：冒烟请求按名字打它（上线后也可按名字直接访问这个版本）
  build_info__<tag>.json            这个版本构建时的报告（含精度门禁）
  rollout.json                      当前版本、上一个版本、各版本的模型目录
scripts/build.py 生成的初始仓库是版本 base（步骤名不带后缀）。

一次上线（rollout）：
  1. 门禁：新构建的 build_info.json 写明精度门禁通过；各步骤带的目录文件是同一份。
  2. 复制成带版本后缀的模型目录，逐个加载（旧版本照常服务）。
  3. 冒烟：经这个版本自己的 ensemble 发几条请求（历史取自它的目录），top-k 须都是目录里的物品、分数降序。
  4. 切换：重写公开 ensemble 的 config.pbtxt，用 load API 加载：Triton 加载好新的才替换旧的；ensemble 的请求在进入时
     就持有各步骤模型的引用（Triton core 的 EnsembleContext），在途的请求在旧版本的三步上做完，所以每个回答都来自同一个版本。
  5. 卸载旧版本（Triton 等它的在途请求做完才真正释放），仓库里只留当前与上一个版本（回滚用）。
2、3 任何一步失败：卸载并删除新版本，公开 ensemble 不动，旧版本继续服务（RolloutError）。
回滚（rollback）：对上一个版本做 1-5（目录已在仓库里，门禁读它存下的 build_info），当前与上一个互换。
"""
from __future__ import annotations

import compileall
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np

from algorithm.errors import ConfigError, RolloutError
from algorithm.models.catalog import Catalog, load_catalog
from algorithm.serving.config import ServingConfig
from algorithm.serving.triton_config import PREPROCESS, parse_pbtxt, to_pbtxt, validate_model_name

BASE_TAG = "base"  # scripts/build.py 生成的初始版本：步骤名不带后缀
SEP = "__"
STATE_FILE = "rollout.json"
LOCK_FILE = ".rollout.lock"
BUILD_INFO = "build_info.json"
CATALOG_FILE = "catalog.npz"
SMOKE_LENGTHS = (1, 8, 40)  # 冒烟请求的历史长度（取目录的前 n 个物品）
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,31}$")
Log = Callable[[str], None]


# ---------------------------------------------------------------- 名字

def validate_tag(tag: str) -> str:
    """版本标签：字母、数字、'-'，最长 32；不能含 '__'（名字按它拆分），base 留给初始版本。"""
    if not isinstance(tag, str) or not _TAG_RE.match(tag) or tag == BASE_TAG:
        raise ConfigError(f"tag={tag!r} 不合法：只能含字母、数字、'-'，以字母或数字开头，最长 32，不能是 {BASE_TAG!r}")
    return tag


def served_name(step: str, tag: str) -> str:
    """版本 tag 的步骤在服务仓库里的名字（base 不带后缀）。"""
    return step if tag == BASE_TAG else validate_model_name(f"{step}{SEP}{tag}")


def ensemble_name(public: str, tag: str) -> str:
    """版本 tag 自己的 ensemble（base 也有：ugt_recommend__base）。"""
    return validate_model_name(f"{public}{SEP}{tag}")


def tag_of(steps: Sequence[str]) -> str:
    """一组步骤名属于哪个版本；不是同一个版本（不应出现）时报错。"""
    tags = {n.partition(SEP)[2] or BASE_TAG for n in steps}
    if len(tags) != 1:
        raise RolloutError(f"公开 ensemble 的步骤 {list(steps)} 不属于同一个版本（标签 {sorted(tags)}）")
    return tags.pop()


def info_file(tag: str) -> str:
    return f"build_info{SEP}{tag}.json"


# ---------------------------------------------------------------- 配置与构建

def read_config(model_dir: str):
    path = os.path.join(model_dir, "config.pbtxt")
    if not os.path.isfile(path):
        raise RolloutError(f"模型目录 {model_dir} 没有 config.pbtxt")
    with open(path) as f:
        return parse_pbtxt(f.read())


def write_config(model_dir: str, mc) -> None:
    """原子写入 config.pbtxt（临时文件后 rename）：重启或监护线程重新加载时 Triton 读到的总是完整的一份。"""
    path = os.path.join(model_dir, "config.pbtxt")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(to_pbtxt(mc))
    os.replace(tmp, path)


def ensemble_steps(mc) -> List[str]:
    """ensemble 的步骤名（按顺序）；mc 是 ModelConfig 或 Triton 返回的 JSON 配置。"""
    if isinstance(mc, dict):
        return [s["model_name"] for s in (mc.get("ensemble_scheduling") or {}).get("step", [])]
    return [s.model_name for s in mc.ensemble_scheduling.step]


def retarget(mc, name: str, steps: Dict[str, str]):
    """ensemble 配置的一份拷贝：改名为 name，步骤按 steps（旧名 -> 新名）改指向。"""
    out = type(mc)()
    out.CopyFrom(mc)
    out.name = name
    for s in out.ensemble_scheduling.step:
        s.model_name = steps[s.model_name]
    return out


@dataclass
class Build:
    """一个构建好的仓库（scripts/build.py 的 model_repository）：公开 ensemble 的配置与构建报告。"""

    path: str
    ensemble: object  # ModelConfig
    info: dict

    @property
    def public(self) -> str:
        return self.ensemble.name

    @property
    def steps(self) -> List[str]:
        return ensemble_steps(self.ensemble)


def read_build(path: str) -> Build:
    """读新构建的仓库：恰有一个 ensemble，它的步骤都有模型目录，有 build_info.json。"""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise RolloutError(f"source={path} 不是目录（应为新构建的 model_repository，例如 build/v2/model_repository）")
    ensembles = []
    for d in sorted(os.listdir(path)):
        if os.path.isfile(os.path.join(path, d, "config.pbtxt")):
            mc = read_config(os.path.join(path, d))
            if mc.platform == "ensemble":
                ensembles.append(mc)
    if len(ensembles) != 1:
        raise RolloutError(f"{path} 应恰有一个 ensemble，找到 {[m.name for m in ensembles]}")
    (ens,) = ensembles
    for step in ensemble_steps(ens):
        if SEP in step:
            raise RolloutError(f"{path} 的步骤 {step} 带版本后缀 {SEP!r}：source 应是 build.py 生成的仓库，不是服务中的仓库")
        if not os.path.isfile(os.path.join(path, step, "config.pbtxt")):
            raise RolloutError(f"{path} 的 ensemble 步骤 {step} 没有模型目录")
    info_path = os.path.join(path, BUILD_INFO)
    if not os.path.isfile(info_path):
        raise RolloutError(f"{info_path} 不存在：只上线 scripts/build.py 生成、带构建报告的仓库")
    with open(info_path) as f:
        info = json.load(f)
    return Build(path, ens, info)


def check_gate(info: dict, where: str) -> str:
    """构建报告里的精度门禁须通过（build.py 在门禁不通过时停止构建；这里再确认一次，防止手工拼出的仓库）。"""
    g = info.get("gates") if isinstance(info, dict) else None
    if not isinstance(g, dict) or "passed" not in g:
        raise RolloutError(f"{where} 没有精度门禁的报告（gates.passed）：只上线门禁通过的构建")
    if g["passed"] is not True:
        raise RolloutError(f"{where}：精度门禁未通过（gates.passed={g['passed']!r}，{g.get('summary', '')}）")
    return str(g.get("summary", ""))


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def check_catalogs(repo_dir: str, steps: Sequence[str]) -> str:
    """各步骤带的目录文件（前处理 item -> 语义 ID、后处理语义 ID -> item）须是同一份；返回它的 sha256。"""
    files = sorted(f for s in steps for f in glob.glob(os.path.join(repo_dir, s, "*", CATALOG_FILE)))
    if not files:
        raise RolloutError(f"{repo_dir} 的步骤 {list(steps)} 里没有目录文件 {CATALOG_FILE}")
    hashes = {f: _sha256(f) for f in files}
    if len(set(hashes.values())) != 1:
        raise RolloutError("各步骤的目录文件不是同一份（前/后处理必须用同一个目录）：" +
                           "；".join(f"{os.path.relpath(f, repo_dir)} sha256 {h[:12]}" for f, h in hashes.items()))
    return next(iter(hashes.values()))


def version_catalog(repository: str, steps: Sequence[str]) -> Catalog:
    """版本的目录（前处理步骤带的那份；check_catalogs 已确认各步骤相同）。"""
    (pre,) = [s for s in steps if s.partition(SEP)[0] == PREPROCESS] or [None]
    if pre is None:
        raise RolloutError(f"步骤 {list(steps)} 里没有前处理 {PREPROCESS}")
    (path,) = glob.glob(os.path.join(repository, pre, "*", CATALOG_FILE))[:1] or [None]
    if path is None:
        raise RolloutError(f"{pre} 没有目录文件 {CATALOG_FILE}")
    return load_catalog(path)


# ---------------------------------------------------------------- Triton 的模型仓库 API（HTTP）

class TritonRepository:
    """运行中的 Triton 的模型仓库 API 与就绪查询（标准库 urllib：不依赖 gevent，任何线程里都能用）。"""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url = url if url.startswith("http") else f"http://{url}"
        self.host_port = self.url.split("://", 1)[1].rstrip("/")
        self.timeout_s = timeout_s  # 一次加载的上限：大引擎在 GPU 上加载、预热要几分钟

    def _call(self, method: str, path: str, body: Optional[dict] = None, timeout_s: Optional[float] = None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout_s or self.timeout_s) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"error": raw.decode(errors="replace")}
        except (urllib.error.URLError, OSError) as e:
            raise RolloutError(f"连不上 Triton {self.url}（{e}）：url 应是运行中服务器的 HTTP 地址"
                               "（scripts/serve.py 启动时打印的 HTTP 一行）") from e

    def ready(self, model: str) -> bool:
        return self._call("GET", f"/v2/models/{model}/ready", timeout_s=10)[0] == 200

    def config(self, model: str) -> dict:
        status, body = self._call("GET", f"/v2/models/{model}/config", timeout_s=30)
        if status != 200:
            raise RolloutError(f"读不到 {model} 的配置（HTTP {status}：{(body or {}).get('error')}）")
        return body

    def states(self) -> Dict[str, str]:
        """{模型名: 状态}（READY / LOADING / UNLOADING / UNAVAILABLE；仓库里有、从未加载过的模型没有状态，为空串）。"""
        status, body = self._call("POST", "/v2/repository/index", {}, timeout_s=30)
        if status != 200:
            raise RolloutError(f"读不到模型仓库索引（HTTP {status}：{(body or {}).get('error')}）")
        return {m["name"]: m.get("state", "") for m in body or []}

    def load(self, model: str, config=None) -> None:
        """加载（已加载的模型：加载好新的再替换）。config：ModelConfig，覆盖磁盘上的 config.pbtxt。"""
        body = {}
        if config is not None:
            from google.protobuf import json_format

            body = {"parameters": {"config": json_format.MessageToJson(config, preserving_proto_field_name=True)}}
        status, resp = self._call("POST", f"/v2/repository/models/{model}/load", body)
        if status != 200:
            raise RolloutError(f"加载 {model} 失败（HTTP {status}）：{(resp or {}).get('error')}。上线需要服务器以 explicit "
                               "模型控制模式运行（内嵌服务器的 server.supervise=true，默认）")

    def unload(self, model: str) -> None:
        """卸载（不连带依赖它的 ensemble）；Triton 在它的在途请求做完后才真正释放。"""
        status, resp = self._call("POST", f"/v2/repository/models/{model}/unload",
                                  {"parameters": {"unload_dependents": False}})
        if status != 200:
            raise RolloutError(f"卸载 {model} 失败（HTTP {status}）：{(resp or {}).get('error')}")

    def wait_unloaded(self, models: Sequence[str], timeout_s: float) -> List[str]:
        """等 models 都不再是 READY / UNLOADING；返回超时时还没卸完的。"""
        deadline = time.monotonic() + timeout_s
        while True:
            states = self.states()
            left = [m for m in models if states.get(m) in ("READY", "UNLOADING")]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


# ---------------------------------------------------------------- 冒烟请求

def check_answer(item_ids: np.ndarray, scores: np.ndarray, num_unknown: int, catalog: Catalog, top_k: int,
                 require_full: bool) -> List[str]:
    """一条冒烟回答的问题（空 = 没问题）：形状、未知物品、物品都在目录里、分数有限且降序；
    require_full（目录约束的 beam search）时 top-k 须全是真实物品。"""
    problems = []
    if item_ids.shape != (top_k,) or scores.shape != (top_k,):
        return [f"item_ids / scores 的形状应为 [{top_k}]，得到 {list(item_ids.shape)} / {list(scores.shape)}"]
    if num_unknown:
        problems.append(f"历史取自这个版本的目录，却有 {num_unknown} 个未知物品（前处理的目录不是这一份？）")
    valid = item_ids >= 0
    if not valid.any():
        problems.append("没有一个有效物品（引擎的语义 ID 在目录里都找不到：目录与引擎不配套？）")
    elif require_full and not valid.all():
        problems.append(f"目录约束的 beam search 只给出 {int(valid.sum())}/{top_k} 个有效物品")
    _, found = catalog.lookup_items(item_ids[valid])
    if not found.all():
        problems.append(f"回答里有不在目录中的物品 {item_ids[valid][~found][:5].tolist()}")
    s = scores[valid]
    if not np.isfinite(s).all() or (np.diff(s) > 1e-6).any():
        problems.append(f"分数不是有限的降序：{s[:5].tolist()}…")
    return problems


def smoke(url: str, model: str, catalog: Catalog, config: ServingConfig,
          lengths: Sequence[int] = SMOKE_LENGTHS) -> Dict[int, np.ndarray]:
    """经 model（版本自己的 ensemble）发几条请求；不通过抛 RolloutError。返回 {历史长度: item_ids}。"""
    from algorithm.serving.client import RecommendClient

    client = RecommendClient(url, model, "http")
    out = {}
    try:
        for n in sorted({min(int(n), len(catalog)) for n in lengths}):
            try:
                rec = client.recommend(catalog.item_ids[:n], timeout_s=60)
            except Exception as e:  # noqa: BLE001  tritonclient 的各种错误：都是冒烟失败
                raise RolloutError(f"冒烟请求（{n} 个物品的历史）经 {model} 失败：{type(e).__name__}: {e}") from e
            problems = check_answer(rec.item_ids, rec.scores, rec.num_unknown_items, catalog, config.model.top_k,
                                    config.catalog.constrained_decoding)
            if problems:
                raise RolloutError(f"冒烟请求（{n} 个物品的历史）经 {model} 的回答不对：" + "；".join(problems))
            out[n] = rec.item_ids
    finally:
        client.close()
    return out


# ---------------------------------------------------------------- 仓库里的版本

def _copy_model(src: str, dst: str, name: str) -> None:
    """复制一个模型目录（不跟随、不复制符号链接），config.pbtxt 的 name 改为 name。"""
    for root, dirs, files in os.walk(src):
        for n in dirs + files:
            if os.path.islink(os.path.join(root, n)):
                raise RolloutError(f"拒绝复制符号链接 {os.path.join(root, n)}")
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.tmp"))
    # 先把 model.py 编译好：否则存根加载时才写 __pycache__，模型目录在加载之后“被改过”，之后加载依赖它的 ensemble 时
    # Triton（explicit 模式按目录的修改时间判断）会把这一步再加载一遍
    compileall.compile_dir(dst, quiet=1)
    mc = read_config(dst)
    mc.name = name
    write_config(dst, mc)


def install(build: Build, repository: str, tag: str) -> List[str]:
    """把 build 复制成版本 tag：各步骤 <step>__<tag>、ensemble <public>__<tag>、build_info__<tag>.json。
    先在仓库旁的临时目录写好，再逐个 rename 进仓库（同一文件系统）。返回写进仓库的模型目录名。"""
    names = {s: served_name(s, tag) for s in build.steps}
    internal = ensemble_name(build.public, tag)
    targets = list(names.values()) + [internal]
    clash = [n for n in targets + [info_file(tag)] if os.path.exists(os.path.join(repository, n))]
    if clash:
        raise RolloutError(f"版本 {tag} 的 {clash} 已在仓库 {repository} 里：换一个 tag")
    tmp = tempfile.mkdtemp(prefix=".rollout-", dir=os.path.dirname(repository))
    moved: List[str] = []
    try:
        for src, dst in names.items():
            _copy_model(os.path.join(build.path, src), os.path.join(tmp, dst), dst)
        os.makedirs(os.path.join(tmp, internal, "1"))  # ensemble 也要有一个（空的）版本目录
        write_config(os.path.join(tmp, internal), retarget(build.ensemble, internal, names))
        shutil.copyfile(os.path.join(build.path, BUILD_INFO), os.path.join(tmp, info_file(tag)))
        for n in targets + [info_file(tag)]:
            os.rename(os.path.join(tmp, n), os.path.join(repository, n))
            moved.append(n)
    except BaseException:
        _remove(repository, moved)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets


def _remove(repository: str, names: Sequence[str]) -> None:
    for n in names:
        p = os.path.join(repository, n)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)


@contextlib.contextmanager
def _locked(repository: str) -> Iterator[None]:
    """同一仓库同时只做一次上线 / 回滚（仓库里的锁文件加 flock；进程死了自动释放）。"""
    path = os.path.join(repository, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RolloutError(f"仓库 {repository} 上另有一次上线 / 回滚在进行（锁文件 {path}）") from None
            raise
        yield
    finally:
        os.close(fd)


def _save_state(repository: str, state: dict) -> None:
    path = os.path.join(repository, STATE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump(state, f, indent=2, ensure_ascii=False)
    os.replace(path + ".tmp", path)


def _load_state(api: TritonRepository, repository: str, public: str) -> dict:
    """rollout.json；还没有时按服务器上公开 ensemble 的现状记下当前版本（初始的 base）。
    也核对它与服务器一致：公开 ensemble 的步骤就是记下的当前版本。"""
    if not os.path.isdir(repository):
        raise RolloutError(f"repository={repository} 不是目录（应为服务器的 --model-repository）")
    if not api.ready(public):
        raise RolloutError(f"服务器 {api.url} 上没有就绪的 {public}")
    served = ensemble_steps(api.config(public))
    tag = tag_of(served)
    path = os.path.join(repository, STATE_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)
        if state.get("public") != public or state.get("current") != tag:
            raise RolloutError(f"{path} 记的是 {state.get('public')} 的版本 {state.get('current')}，服务器上 {public} 的步骤 "
                               f"{served} 是版本 {tag}：仓库或服务器被别的方式改过，先用 status 核对")
        return state
    internal = ensemble_name(public, tag)
    if not os.path.isdir(os.path.join(repository, internal)):  # 初始版本没有自己的 ensemble：照公开的那份写一个
        os.makedirs(os.path.join(repository, internal, "1"))
        write_config(os.path.join(repository, internal),
                     retarget(read_config(os.path.join(repository, public)), internal, {s: s for s in served}))
    root_info = os.path.join(repository, BUILD_INFO)
    if not os.path.exists(os.path.join(repository, info_file(tag))) and os.path.isfile(root_info):
        shutil.copyfile(root_info, os.path.join(repository, info_file(tag)))
    return {"public": public, "current": tag, "previous": None, "serial": 1,
            "versions": {tag: {"models": served + [internal], "source": repository, "installed_at": time.time()}}}


def startup_models(repository: str) -> Optional[List[str]]:
    """服务器（explicit 模式）启动时要加载的模型：上线过的仓库只加载公开 ensemble 与当前版本（上一个版本留在磁盘上
    供回滚，不占内存 / 显存）；没有 rollout.json 时 None（全部加载）。"""
    path = os.path.join(repository, STATE_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        state = json.load(f)
    return [state["public"]] + list(state["versions"][state["current"]]["models"])


# ---------------------------------------------------------------- 上线、回滚、状态

def _activate(api: TritonRepository, repository: str, public: str, tag: str, current: str, log: Log,
              unload_timeout_s: float) -> dict:
    """把公开 ensemble 切到版本 tag（其目录已在仓库里）：门禁、加载、冒烟、切换、卸载 current。"""
    internal = ensemble_name(public, tag)
    ens = read_config(os.path.join(repository, internal))
    steps = ensemble_steps(ens)
    where = os.path.join(repository, info_file(tag))
    if not os.path.isfile(where):
        raise RolloutError(f"版本 {tag} 没有构建报告 {where}")
    with open(where) as f:
        info = json.load(f)
    report = {"tag": tag, "previous": current, "gate": check_gate(info, where),
              "catalog_sha256": check_catalogs(repository, steps)}
    config = ServingConfig.from_dict(info["config"])
    catalog = version_catalog(repository, steps)
    old_internal = ensemble_name(public, current)
    old_steps = ensemble_steps(api.config(public))
    t0 = time.perf_counter()
    loaded: List[str] = []
    try:
        for m in steps + [internal]:
            log(f"加载 {m}")
            api.load(m)
            loaded.append(m)
        t1 = time.perf_counter()
        answers = smoke(api.host_port, internal, catalog, config)
        log(f"冒烟通过：{internal} 对 {sorted(answers)} 个物品的历史给出 {config.model.top_k} 个目录里的物品")
    except RolloutError as e:
        for m in reversed(loaded):
            with contextlib.suppress(RolloutError):
                api.unload(m)
        raise RolloutError(f"版本 {tag} 没有上线，{public} 仍由版本 {current} 服务：{e}") from e
    t2 = time.perf_counter()
    public_dir = os.path.join(repository, public)
    old_public = read_config(public_dir)
    new_public = retarget(ens, public, {s: s for s in steps})
    # 先写磁盘（监护线程重新加载某一步时 Triton 从磁盘重新加载依赖它的 ensemble；重启时也读它），再用同一份配置加载
    write_config(public_dir, new_public)
    try:
        api.load(public, new_public)
        served = ensemble_steps(api.config(public))
        if served != steps:
            raise RolloutError(f"加载后 {public} 的步骤是 {served}，应为 {steps}")
        n = min(answers)
        check = smoke(api.host_port, public, catalog, config, lengths=[n])[n]
        if not np.array_equal(check, answers[n]):
            raise RolloutError(f"切换后 {public} 的回答与 {internal} 的不同")
    except RolloutError as e:
        write_config(public_dir, old_public)
        with contextlib.suppress(RolloutError):
            api.load(public, old_public)
        for m in reversed(loaded):
            with contextlib.suppress(RolloutError):
                api.unload(m)
        raise RolloutError(f"切换到版本 {tag} 失败，{public} 已切回版本 {current}：{e}") from e
    t3 = time.perf_counter()
    log(f"{public} 已切换到版本 {tag}（{steps}）；卸载版本 {current}")
    states = api.states()
    for m in [old_internal] + old_steps:
        if states.get(m) == "READY":
            api.unload(m)
    left = api.wait_unloaded(old_steps, unload_timeout_s)
    if left:
        log(f"警告：{unload_timeout_s:.0f} s 后 {left} 还没卸完（在途请求还没做完？），继续")
    t4 = time.perf_counter()
    report.update(steps=steps, load_s=t1 - t0, smoke_s=t2 - t1, switch_s=t3 - t2, unload_s=t4 - t3,
                  not_unloaded=left)
    return report


def _prune(api: TritonRepository, repository: str, state: dict, keep: Sequence[str], timeout_s: float) -> List[str]:
    """删掉当前与上一个版本以外的版本（先确认已卸载）；返回删掉的版本。"""
    dropped = []
    states = api.states()
    for tag in [t for t in state["versions"] if t not in keep]:
        models = state["versions"][tag]["models"]
        for m in models:
            if states.get(m) == "READY":
                api.unload(m)
        if api.wait_unloaded(models, timeout_s):
            continue  # 还在卸载：下次再删
        _remove(repository, models + [info_file(tag)])
        del state["versions"][tag]
        dropped.append(tag)
    return dropped


def rollout(url: str, repository: str, source: str, tag: Optional[str] = None, log: Log = print,
            unload_timeout_s: float = 120.0) -> dict:
    """把 source（新构建的 model_repository）作为新版本上线到 url 上运行、服务 repository 的 Triton。
    返回报告（标签、门禁、各阶段秒数、删掉的旧版本）；被拒时抛 RolloutError，旧版本继续服务。"""
    repository = os.path.abspath(repository)
    build = read_build(source)
    with _locked(repository):
        api = TritonRepository(url)
        state = _load_state(api, repository, build.public)
        current = state["current"]
        check_gate(build.info, os.path.join(build.path, BUILD_INFO))  # 门禁没过的不复制
        check_catalogs(build.path, build.steps)
        serial = int(state.get("serial", 1)) + 1
        tag = validate_tag(tag or f"v{serial}")
        if tag in state["versions"]:
            raise RolloutError(f"版本 {tag} 已在仓库里（当前 {current}，上一个 {state.get('previous')}）：换一个 tag")
        log(f"上线 {build.path} 为版本 {tag}（当前 {current}）")
        models = install(build, repository, tag)
        try:
            report = _activate(api, repository, build.public, tag, current, log, unload_timeout_s)
        except BaseException:
            _remove(repository, models + [info_file(tag)])
            raise
        state["versions"][tag] = {"models": models, "source": build.path, "installed_at": time.time()}
        state.update(previous=current, current=tag, serial=serial)
        report["pruned"] = _prune(api, repository, state, [tag, current], unload_timeout_s)
        _save_state(repository, state)
        return report


def rollback(url: str, repository: str, log: Log = print, unload_timeout_s: float = 120.0) -> dict:
    """回到上一个版本（同样门禁、冒烟、切换、卸载）；当前与上一个互换（再回滚一次就又回来）。"""
    repository = os.path.abspath(repository)
    with _locked(repository):
        api = TritonRepository(url)
        path = os.path.join(repository, STATE_FILE)
        if not os.path.isfile(path):
            raise RolloutError(f"{path} 不存在：这个仓库还没有上线过新版本，没有可回滚的")
        with open(path) as f:
            public = json.load(f)["public"]
        state = _load_state(api, repository, public)
        current, previous = state["current"], state.get("previous")
        if not previous:
            raise RolloutError(f"没有上一个版本可回滚（当前 {current}）")
        log(f"回滚：版本 {current} -> {previous}")
        report = _activate(api, repository, public, previous, current, log, unload_timeout_s)
        state.update(current=previous, previous=current)
        _save_state(repository, state)
        return report


def status(url: str, repository: str) -> dict:
    """服务器上公开 ensemble 指向的版本、rollout.json 记的版本与各版本模型的状态。"""
    repository = os.path.abspath(repository)
    api = TritonRepository(url)
    path = os.path.join(repository, STATE_FILE)
    state = None
    if os.path.isfile(path):
        with open(path) as f:
            state = json.load(f)
    states = api.states()
    if state:
        publics = [state["public"]]
    else:  # 还没上线过：仓库里不带版本后缀的 ensemble
        publics = [n for n in sorted(states) if SEP not in n and os.path.isfile(os.path.join(repository, n, "config.pbtxt"))
                   and read_config(os.path.join(repository, n)).platform == "ensemble"]
    served = {p: ensemble_steps(api.config(p)) for p in publics if api.ready(p)}
    return {"served": {p: {"version": tag_of(s), "steps": s} for p, s in served.items()}, "state": state,
            "models": {m: states.get(m, "") for v in (state or {}).get("versions", {}).values() for m in v["models"]}}
