"""上线与回滚（algorithm/serving/rollout.py）：真实的内嵌 Triton 上，稳定负载下把另一次构建（另一个目录种子、另一个模型）
切进来，不丢请求、每个回答都来自同一个版本；门禁、目录或冒烟不通过的版本被拒、旧版本继续服务；回滚同样。

两个版本的目录物品 id 几乎不重叠：探针历史里放 6 个只在 v1 目录里的物品与 9 个只在 v2 目录里的物品，
v1 的前处理跳过 9 个未知物品、v2 的跳过 6 个（num_unknown_items 说出前处理是哪个版本），回答的物品属于哪个目录说出
后处理是哪个版本，回答与该版本单独给出的回答完全相同说明引擎也是它。混搭的 ensemble 对不上任何一个版本（有测试证明）。
"""
import dataclasses
import json
import os
import shutil
import signal
import threading
import time

import numpy as np
import pytest

from algorithm.errors import ConfigError, RolloutError
from algorithm.models.catalog import load_catalog
from algorithm.serving import rollout as ro
from algorithm.serving.client import RecommendClient
from algorithm.serving.config import CatalogConfig, TrainConfig
from algorithm.serving.server import EmbeddedTritonServer
from algorithm.serving.triton_config import parse_pbtxt

# 稳定负载：THREADS 个线程各按固定间隔发请求（合计 RATE req/s），远低于 2 核 CPU 上 tiny 模型的容量
RATE, THREADS = 20.0, 4
STEADY_S = 8.0  # 上线前的稳定负载
AFTER_S = 3.0  # 上线返回后这么久还算“切换”（新实例是冷的）
STEADY_AFTER_S = 5.0  # 之后的稳定负载：稳定状态取上线前后两段（2 核的共用机器上别人的负载时有时无，两段一起更公平）


# ---------------------------------------------------------------- 不需要服务器的部分

def test_names_and_tags():
    assert ro.served_name("ugt_engine", ro.BASE_TAG) == "ugt_engine"
    assert ro.served_name("ugt_engine", "v2") == "ugt_engine__v2"
    assert ro.ensemble_name("ugt_recommend", ro.BASE_TAG) == "ugt_recommend__base"
    assert ro.tag_of(["ugt_preprocess__v3", "ugt_engine__v3"]) == "v3"
    assert ro.tag_of(["ugt_preprocess", "ugt_engine"]) == ro.BASE_TAG
    with pytest.raises(RolloutError, match="不属于同一个版本"):
        ro.tag_of(["ugt_preprocess__v2", "ugt_engine"])
    for bad in ("base", "a__b", "-x", "x/y", "", "v" * 33):
        with pytest.raises(ConfigError, match="tag="):
            ro.validate_tag(bad)


def test_gate_report_must_say_passed():
    assert ro.check_gate({"gates": {"passed": True, "summary": "ok"}}, "w") == "ok"
    with pytest.raises(RolloutError, match="精度门禁未通过"):
        ro.check_gate({"gates": {"passed": False, "summary": "top-50 重合 0.3"}}, "w")
    with pytest.raises(RolloutError, match="没有精度门禁的报告"):
        ro.check_gate({"config": {}}, "w")


def test_smoke_answer_checks(catalog):
    k = 50
    items = catalog.item_ids[:k].copy()
    scores = -np.arange(k, dtype=np.float32)
    assert ro.check_answer(items, scores, 0, catalog, k, True) == []
    assert "未知物品" in ro.check_answer(items, scores, 2, catalog, k, True)[0]
    none = np.full(k, -1, np.int64)
    assert "没有一个有效物品" in ro.check_answer(none, scores, 0, catalog, k, False)[0]
    part = items.copy()
    part[10:] = -1
    assert ro.check_answer(part, scores, 0, catalog, k, False) == []
    assert "只给出 10/50" in ro.check_answer(part, scores, 0, catalog, k, True)[0]
    foreign = items.copy()
    foreign[3] = 10 ** 12
    assert "不在目录中" in ro.check_answer(foreign, scores, 0, catalog, k, True)[0]
    assert "降序" in ro.check_answer(items, scores[::-1].copy(), 0, catalog, k, True)[0]


def test_install_copies_renames_and_retargets(built, tmp_path):
    """版本目录：步骤改名（config.pbtxt 的 name 跟着改）、model.py 预先编译、这个版本的 ensemble 指向它自己的步骤。"""
    _, result = built
    repo = tmp_path / "repo"
    repo.mkdir()
    build = ro.read_build(result.repository)
    assert build.public == "ugt_recommend" and build.steps == ["ugt_preprocess", "ugt_engine", "ugt_postprocess"]
    models = ro.install(build, str(repo), "v7")
    assert models == ["ugt_preprocess__v7", "ugt_engine__v7", "ugt_postprocess__v7", "ugt_recommend__v7"]
    for m in models:
        assert parse_pbtxt((repo / m / "config.pbtxt").read_text()).name == m
    ens = parse_pbtxt((repo / "ugt_recommend__v7" / "config.pbtxt").read_text())
    assert ro.ensemble_steps(ens) == models[:3]
    assert list((repo / "ugt_engine__v7" / "1" / "__pycache__").glob("model.*.pyc"))
    assert json.loads((repo / "build_info__v7.json").read_text())["gates"]["passed"] is True
    with pytest.raises(RolloutError, match="已在仓库"):
        ro.install(build, str(repo), "v7")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".rollout-")]  # 临时目录已删
    # 前/后处理的目录不是同一份：拒绝
    bad = tmp_path / "bad"
    shutil.copytree(result.repository, bad)
    with np.load(bad / "ugt_postprocess" / "1" / "catalog.npz") as d:
        np.savez(bad / "ugt_postprocess" / "1" / "catalog.npz", **{k: d[k] for k in d.files},
                 extra=np.zeros(1))
    with pytest.raises(RolloutError, match="不是同一份"):
        ro.check_catalogs(str(bad), build.steps)


# ---------------------------------------------------------------- 真实服务器

@pytest.fixture(scope="module")
def v2_build(tmp_path_factory):
    """第二个版本：另一个目录种子（物品 id 与语义 ID 都不同）、短训练（只要与 v1 可区分、门禁照常运行）。"""
    from conftest import tiny_config

    from algorithm.serving.build import build

    cfg = tiny_config(str(tmp_path_factory.mktemp("v2")), catalog=CatalogConfig(num_items=3000, seed=7),
                      train=TrainConfig(steps=20, batch_size=32, seq_length=24))
    return build(cfg, log=lambda s: None, gpus=[])


@pytest.fixture(scope="module")
def serving(built, tmp_path_factory):
    """v1（会话共用的构建）仓库的私有副本上的服务器：上线会改写仓库。"""
    cfg, result = built
    d = tmp_path_factory.mktemp("rollout")
    repo = str(d / "repo")
    shutil.copytree(result.repository, repo, ignore=shutil.ignore_patterns("__pycache__"))
    server_cfg = dataclasses.replace(cfg.server, exit_timeout_s=5.0)
    with EmbeddedTritonServer(repo, server_cfg, ready_models=[cfg.export.model_name],
                              log_path=str(d / "triton.log")) as s:
        yield s, repo


@pytest.fixture(scope="module")
def probes(catalog, v2_build):
    """每条探针：6 个只在 v1 目录里的物品 + 9 个只在 v2 目录里的物品（交错）。"""
    c2 = load_catalog(v2_build.catalog)
    only1 = np.setdiff1d(catalog.item_ids, c2.item_ids)
    only2 = np.setdiff1d(c2.item_ids, catalog.item_ids)
    rng = np.random.default_rng(1)
    out = []
    for _ in range(8):
        h = np.concatenate([rng.choice(only1, 6, replace=False), rng.choice(only2, 9, replace=False)])
        out.append(rng.permutation(h))
    return out


def answers(url, model, probes):
    c = RecommendClient(url, model)
    try:
        return [c.recommend(h) for h in probes]
    finally:
        c.close()


def same(a, b) -> bool:
    return (np.array_equal(a.item_ids, b.item_ids) and a.num_unknown_items == b.num_unknown_items
            and np.allclose(a.scores, b.scores, atol=1e-4))


def classify(rec, probe: int, expected: dict):
    """回答来自哪个版本：恰与一个版本单独给出的回答相同时是它，否则 None（混搭或错误）。"""
    hits = [v for v, exp in expected.items() if same(rec, exp[probe])]
    return hits[0] if len(hits) == 1 else None


class SteadyLoad:
    """THREADS 个线程各按固定间隔（不因前一个慢而少发）向公开 ensemble 发探针，记下
    (计划发出时刻, 完成时刻, 探针号, 回答或错误)。"""

    def __init__(self, url, model, probes, rate=RATE, threads=THREADS):
        self.url, self.model, self.probes = url, model, probes
        self.period = threads / rate
        self.threads = threads
        self.records = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers = []

    def _run(self, k):
        c = RecommendClient(self.url, self.model)
        t_next = time.perf_counter() + k * self.period / self.threads
        i = k
        try:
            while not self._stop.is_set():
                delay = t_next - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                p = i % len(self.probes)
                try:
                    res = c.recommend(self.probes[p], timeout_s=30)
                except Exception as e:  # noqa: BLE001  失败照样记下（断言里数）
                    res = f"{type(e).__name__}: {e}"
                with self._lock:
                    self.records.append((t_next, time.perf_counter(), p, res))
                t_next += self.period
                i += self.threads
        finally:
            c.close()

    def __enter__(self):
        for k in range(self.threads):
            t = threading.Thread(target=self._run, args=(k,), daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc):
        self._stop.set()
        for t in self._workers:
            t.join(60)

    def window(self, t0, t1):
        """计划在 [t0, t1) 内发出的请求。"""
        return [r for r in self.records if t0 <= r[0] < t1]


def p99_ms(records) -> float:
    return float(np.percentile([(done - sent) * 1e3 for sent, done, _, _ in records], 99))


def failures(records):
    return [r[3] for r in records if isinstance(r[3], str)]


@pytest.mark.server
def test_bad_versions_are_refused_and_the_old_keeps_serving(serving, built, v2_build, probes, tmp_path):
    """门禁不通过、前/后处理目录不同、引擎加载失败、冒烟不通过（目录与引擎不配套）：都被拒，仓库与服务不变，
    拒绝期间稳定负载下没有失败的请求。"""
    server, repo = serving
    public = built[0].export.model_name
    before = answers(server.grpc_url, public, probes)
    listing = sorted(os.listdir(repo))

    def variant(name, edit):
        src = tmp_path / name
        shutil.copytree(v2_build.repository, src, ignore=shutil.ignore_patterns("__pycache__"))
        edit(src)
        return str(src)

    def failed_gate(src):
        info = json.loads((src / "build_info.json").read_text())
        info["gates"]["passed"] = False
        (src / "build_info.json").write_text(json.dumps(info))

    def other_catalog_in_post(src):
        shutil.copyfile(built[1].catalog, src / "ugt_postprocess" / "1" / "catalog.npz")

    def broken_engine(src):
        (src / "ugt_engine" / "1" / "model.onnx").write_bytes(b"not an onnx file")

    def catalog_not_for_this_engine(src):  # 两份目录相同（通过目录检查），但不是这个引擎的目录
        for step in ("ugt_preprocess", "ugt_postprocess"):
            shutil.copyfile(built[1].catalog, src / step / "1" / "catalog.npz")

    cases = [("gate", failed_gate, "精度门禁未通过"), ("post_catalog", other_catalog_in_post, "不是同一份"),
             ("engine", broken_engine, "加载 ugt_engine__"), ("smoke", catalog_not_for_this_engine, "冒烟请求")]
    with SteadyLoad(server.grpc_url, public, probes) as load:
        for name, edit, words in cases:
            src = variant(name, edit)
            with pytest.raises(RolloutError, match=words) as e:
                ro.rollout(server.http_url, repo, src, log=lambda s: None)
            print(f"{name}: {str(e.value)[:300]}")
            # 新版本的目录都删了；多出的只有第一次上线时为初始版本记下的 ensemble、构建报告与锁文件
            extra = set(os.listdir(repo)) - set(listing)
            assert extra <= {"ugt_recommend__base", "build_info__base.json", ro.LOCK_FILE}, (name, extra)
            states = ro.TritonRepository(server.http_url).states()
            assert not [m for m, s in states.items() if "__v" in m and s == "READY"], (name, states)
        time.sleep(0.5)
    assert not failures(load.records), failures(load.records)[:3]
    assert all(same(a, b) for a, b in zip(answers(server.grpc_url, public, probes), before))
    assert not os.path.exists(os.path.join(repo, ro.STATE_FILE))  # 没有上线过：不写状态
    print(f"被拒的 4 次上线期间 {len(load.records)} 个请求，0 失败")


@pytest.mark.server
def test_rollout_under_steady_load_drops_nothing_and_each_answer_is_one_version(serving, built, v2_build, probes):
    server, repo = serving
    public = built[0].export.model_name
    v1 = answers(server.grpc_url, public, probes)
    assert {a.num_unknown_items for a in v1} == {9}  # v1 的前处理跳过 9 个只在 v2 目录里的物品
    with SteadyLoad(server.grpc_url, public, probes) as load:
        time.sleep(STEADY_S)
        t0 = time.perf_counter()
        report = ro.rollout(server.http_url, repo, v2_build.repository, log=print)
        t1 = time.perf_counter()
        time.sleep(AFTER_S + STEADY_AFTER_S)
    assert report["tag"] == "v2" and report["previous"] == ro.BASE_TAG
    v2 = answers(server.grpc_url, ro.ensemble_name(public, "v2"), probes)  # 这个版本单独给出的回答
    assert {a.num_unknown_items for a in v2} == {6}
    assert all(same(a, b) for a, b in zip(answers(server.grpc_url, public, probes), v2))
    expected = {"v1": v1, "v2": v2}
    recs = load.records
    bad = failures(recs)
    assert not bad, (len(bad), bad[:3])
    versions = [classify(r[3], r[2], expected) for r in recs]
    mixed = [(r[2], r[3].num_unknown_items, r[3].item_ids[:3]) for r, v in zip(recs, versions) if v is None]
    assert not mixed, mixed[:3]
    # 上线开始前发出的都是 v1，上线返回后发出的都是 v2；中间的每个都恰是其中一个
    assert all(v == "v1" for r, v in zip(recs, versions) if r[1] < t0)
    assert all(v == "v2" for r, v in zip(recs, versions) if r[0] >= t1)
    # 延迟：稳定（上线前与切换之后的两段）、加载新版本（新存根启动、导入、建会话，与服务抢 CPU）、切换（公开 ensemble 改指向、
    # 卸载旧版本，加上新版本的头 AFTER_S 秒：冷的新实例）。上线期间的要求（不超过稳定 P99 的 2 倍）按切换这一段判定；加载这一段只报告
    steady = load.window(t0 - STEADY_S + 1.0, t0) + load.window(t1 + AFTER_S, t1 + AFTER_S + STEADY_AFTER_S)
    switch_at = t0 + report["load_s"] + report["smoke_s"]
    loading, switch = load.window(t0, switch_at), load.window(switch_at, t1 + AFTER_S)
    n_v1 = sum(1 for r, v in zip(recs, versions) if t0 <= r[0] < t1 and v == "v1")
    print(f"上线 {t1 - t0:.1f} s（加载 {report['load_s']:.1f}、冒烟 {report['smoke_s']:.2f}、切换 {report['switch_s']:.2f}、"
          f"卸载 {report['unload_s']:.2f} s）；期间 {len(load.window(t0, t1))} 个请求（v1 {n_v1}、"
          f"v2 {len(load.window(t0, t1)) - n_v1}）、0 失败；P99：稳定 {p99_ms(steady):.1f} ms（{len(steady)} 个）、"
          f"加载新版本 {p99_ms(loading):.1f} ms（{len(loading)} 个）、切换与之后 {AFTER_S:.0f} s {p99_ms(switch):.1f} ms"
          f"（{len(switch)} 个）")
    assert len(load.window(t0, t1)) >= RATE * (t1 - t0) * 0.8
    assert p99_ms(switch) <= 2 * p99_ms(steady), (p99_ms(switch), p99_ms(steady))

    # 检查有牙齿：新目录配旧引擎的混搭 ensemble，回答对不上任何一个版本
    api = ro.TritonRepository(server.http_url)
    mix = os.path.join(repo, "mix_check")
    os.makedirs(os.path.join(mix, "1"))
    ens = ro.read_config(os.path.join(repo, ro.ensemble_name(public, "v2")))
    ro.write_config(mix, ro.retarget(ens, "mix_check", {"ugt_preprocess__v2": "ugt_preprocess__v2",
                                                         "ugt_engine__v2": "ugt_engine",
                                                         "ugt_postprocess__v2": "ugt_postprocess__v2"}))
    try:
        api.load("ugt_engine")
        api.load("mix_check")
        got = answers(server.grpc_url, "mix_check", probes)
        assert all(classify(g, i, expected) is None for i, g in enumerate(got))
    finally:
        for m in ("mix_check", "ugt_engine"):
            api.unload(m)
        api.wait_unloaded(["mix_check", "ugt_engine"], 30)
        shutil.rmtree(mix)


@pytest.mark.server
def test_supervisor_restarts_renamed_models_and_rollback_returns_under_load(serving, built, v2_build, probes):
    """上线后：被杀的 v2 存根由监护线程重新加载（改名的模型照样监护）；重启服务器仍服务 v2（公开 ensemble 的配置在磁盘上），
    且只加载当前版本；
    回滚在稳定负载下回到 v1，不丢请求；卸掉的 v2 不会被监护线程拉起来。"""
    server, repo = serving
    public = built[0].export.model_name
    api = ro.TritonRepository(server.http_url)
    if ro.tag_of(ro.ensemble_steps(api.config(public))) != "v2":  # 单独运行这个测试时
        ro.rollout(server.http_url, repo, v2_build.repository, log=lambda s: None)
    v2 = answers(server.grpc_url, ro.ensemble_name(public, "v2"), probes)
    # 监护：杀掉 v2 引擎的存根
    victim = "ugt_engine__v2"
    old = set(server.stub_processes()[victim])
    restarts = server.restarts.get(victim, 0)
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    deadline = time.time() + 40
    while time.time() < deadline:
        new = set(server.stub_processes().get(victim, []))
        if new and not new & old and api.ready(public):
            break
        time.sleep(0.3)
    assert server.restarts.get(victim, 0) == restarts + 1, server.restarts
    assert all(same(a, b) for a, b in zip(answers(server.grpc_url, public, probes), v2))
    assert not [m for m in server.restarts if not m.endswith("__v2")], server.restarts  # 卸掉的 base 没被拉起来
    # 重启：按磁盘上的配置，公开 ensemble 仍指向 v2
    server.stop()
    server.start()
    api = ro.TritonRepository(server.http_url)
    assert ro.ensemble_steps(api.config(public)) == ["ugt_preprocess__v2", "ugt_engine__v2", "ugt_postprocess__v2"]
    states = api.states()  # 只加载了当前版本：上一个版本留在磁盘上
    assert states["ugt_engine__v2"] == "READY" and states.get("ugt_engine") != "READY", states
    assert all(same(a, b) for a, b in zip(answers(server.grpc_url, public, probes), v2))
    # 回滚
    with SteadyLoad(server.grpc_url, public, probes) as load:
        time.sleep(3.0)
        t0 = time.perf_counter()
        report = ro.rollback(server.http_url, repo, log=print)
        t1 = time.perf_counter()
        time.sleep(2.0)
    assert report["tag"] == ro.BASE_TAG and report["previous"] == "v2"
    v1 = answers(server.grpc_url, ro.ensemble_name(public, ro.BASE_TAG), probes)
    assert {a.num_unknown_items for a in v1} == {9}
    expected = {"v1": v1, "v2": v2}
    recs = load.records
    assert not failures(recs), failures(recs)[:3]
    versions = [classify(r[3], r[2], expected) for r in recs]
    assert None not in versions
    assert all(v == "v2" for r, v in zip(recs, versions) if r[1] < t0)
    assert all(v == "v1" for r, v in zip(recs, versions) if r[0] >= t1)
    print(f"回滚 {t1 - t0:.1f} s，期间 {len(load.window(t0, t1))} 个请求，0 失败")
    state = json.loads(open(os.path.join(repo, ro.STATE_FILE)).read())
    assert state["current"] == ro.BASE_TAG and state["previous"] == "v2"
    time.sleep(2 * server.config.supervise_interval_s + 0.5)
    states = api.states()
    assert [m for m in ("ugt_preprocess__v2", "ugt_engine__v2", "ugt_postprocess__v2") if states.get(m) == "READY"] == []
    assert ro.status(server.http_url, repo)["served"][public]["version"] == ro.BASE_TAG
    # 再回滚一次又回到 v2
    ro.rollback(server.http_url, repo, log=lambda s: None)
    assert all(same(a, b) for a, b in zip(answers(server.grpc_url, public, probes), v2))


@pytest.mark.server
def test_cli_reports_status_and_refuses_with_exit_code_2(serving, built, v2_build, tmp_path):
    """scripts/rollout.py：status 打印服务的版本；门禁不通过的版本退出码 2、写明原因。"""
    import subprocess
    import sys

    server, repo = serving
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                          "scripts", "rollout.py")
    # 脚本不改 sys.path：本包由 pip install -e 安装；这里指明本检出，测的就是这份代码
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(script))}
    run = lambda *a: subprocess.run([sys.executable, script, f"url={server.http_url}", f"repository={repo}", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120, env=env)
    r = run("status")
    assert r.returncode == 0, r.stderr
    public = built[0].export.model_name
    assert json.loads(r.stdout)["served"][public]["version"] in (ro.BASE_TAG, "v2")
    src = tmp_path / "failed_gate"
    shutil.copytree(v2_build.repository, src)
    info = json.loads((src / "build_info.json").read_text())
    info["gates"]["passed"] = False
    (src / "build_info.json").write_text(json.dumps(info))
    r = run(f"source={src}")
    assert r.returncode == 2 and "精度门禁未通过" in r.stderr, (r.returncode, r.stderr[-500:])
    r = run("rollout")
    assert r.returncode != 0 and "source" in r.stderr
