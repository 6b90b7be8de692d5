"""server.mps：服务器自己起停的 CUDA MPS 守护进程。本机没有 GPU，用一个假的 nvidia-cuda-mps-control
（记下每次调用的参数、标准输入与 MPS 环境变量）检查：起停的命令、tritonserver 与存根进程拿到的环境、出错时的说明。"""

import os
import stat

import pytest

from algorithm.errors import ConfigError, MissingDependencyError, ServerError
from algorithm.serving.config import ServerConfig
from algorithm.serving.mps import CONTROL, MpsDaemon, decide
from algorithm.serving.server import EmbeddedTritonServer

FAKE = """#!/bin/sh
# 假的 nvidia-cuda-mps-control：一行一次调用：参数|标准输入|管道目录
input=""
[ "$#" -eq 0 ] && input=$(cat)
echo "$*|$input|$CUDA_MPS_PIPE_DIRECTORY" >> "{record}"
[ "$1" = "-d" ] && [ -n "{fail}" ] && {{ echo "{fail}" >&2; exit 3; }}
[ "$input" = "get_server_list" ] && echo 4242
exit 0
"""


def fake_control(tmp_path, fail: str = "") -> str:
    """PATH 里放一个假的控制程序，返回它的调用记录文件。"""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "calls.txt"
    exe = bindir / CONTROL
    exe.write_text(FAKE.format(record=record, fail=fail))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(bindir), str(record)


def calls(record: str):
    with open(record) as f:
        return [line.rstrip("\n").split("|") for line in f]


def test_daemon_starts_queries_and_quits_with_its_own_pipe(tmp_path, monkeypatch):
    bindir, record = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    d = MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log"))
    assert d.env() == {"CUDA_MPS_PIPE_DIRECTORY": d.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": d.log_dir}
    d.start()
    assert os.path.isdir(d.pipe_dir) and os.path.isdir(d.log_dir)
    assert d.servers() == [4242]
    d.stop()
    d.stop()  # 第二次什么也不做
    # 停止时先问一次服务器进程（之后等它们退出），再 quit
    assert calls(record) == [["-d", "", d.pipe_dir], ["", "get_server_list", d.pipe_dir],
                             ["", "get_server_list", d.pipe_dir], ["", "quit", d.pipe_dir]]


def test_daemon_failure_and_missing_binary_say_what_to_do(tmp_path, monkeypatch):
    bindir, _ = fake_control(tmp_path, fail="An instance of this daemon is already running")
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    with pytest.raises(ServerError, match="already running") as e:
        MpsDaemon(str(tmp_path / "p"), str(tmp_path / "l")).start()
    assert "退出码 3" in str(e.value)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(MissingDependencyError, match="server.mps=false"):
        MpsDaemon(str(tmp_path / "p"), str(tmp_path / "l")).start()


def test_server_without_mps_control_refuses_before_starting_triton(sleep_repo, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty") + os.pathsep + "/usr/bin:/bin")
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    s = EmbeddedTritonServer(sleep_repo, ServerConfig(mps=True), ready_models=["sleepy"])
    with pytest.raises(MissingDependencyError, match=CONTROL):
        s.start()
    assert s.process is None and s.mps is None


def _environ(pid: int) -> dict:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [x.decode(errors="replace") for x in f.read().split(b"\0") if b"=" in x]
    return dict(x.split("=", 1) for x in items)


def test_server_with_mps_passes_the_pipe_to_tritonserver_and_stubs(sleep_repo, tmp_path, monkeypatch):
    """tritonserver 与它起的存根进程（引擎实例，真正的 CUDA 客户端）都拿到守护进程的管道目录；停止时守护进程退出。"""
    bindir, record = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    log_path = str(tmp_path / "out" / "tritonserver.log")
    os.makedirs(os.path.dirname(log_path))
    with EmbeddedTritonServer(sleep_repo, ServerConfig(mps=True), ready_models=["sleepy"], log_path=log_path) as s:
        pipe = s.mps.pipe_dir
        assert s.mps.log_dir == str(tmp_path / "out" / "mps_log")
        assert _environ(s.process.pid)["CUDA_MPS_PIPE_DIRECTORY"] == pipe
        stubs = [p for pids in s.stub_processes().values() for p in pids]
        assert stubs and all(_environ(p).get("CUDA_MPS_PIPE_DIRECTORY") == pipe for p in stubs)
        # 压测的 GPU 进程快照据此认出自己的进程：tritonserver、存根与 MPS 服务器（假的控制程序回答 4242）
        assert s.own_pids() == {s.process.pid, *stubs, 4242}
    assert s.mps is None
    assert [c[:2] for c in calls(record)] == [["-d", ""], ["", "get_server_list"], ["", "get_server_list"],
                                              ["", "get_server_list"], ["", "quit"]]


# ---- server.mps=auto：按仓库决定 ----

ENGINE_PBTXT = """name: "ugt_engine"
{backend}
max_batch_size: 64
instance_group {{ count: {count} kind: {kind} {gpus} }}
"""


def engine_repo(tmp_path, count=2, kind="KIND_GPU", backend='backend: "python"', name="repo"):
    """只有 ugt_engine/config.pbtxt 的仓库（decide 只读它）。"""
    d = tmp_path / name / "ugt_engine"
    d.mkdir(parents=True)
    gpus = "gpus: [0]" if kind == "KIND_GPU" else ""
    (d / "config.pbtxt").write_text(ENGINE_PBTXT.format(backend=backend, count=count, kind=kind, gpus=gpus))
    return str(tmp_path / name)


@pytest.mark.parametrize("given,expected", [(True, "true"), (False, "false"), ("True", "true"), ("off", "false"),
                                            ("auto", "auto"), (" AUTO ", "auto")])
def test_mps_setting_accepts_hydra_booleans_and_auto(given, expected):
    assert ServerConfig(mps=given).mps == expected


def test_mps_setting_rejects_other_values():
    with pytest.raises(ConfigError, match="server.mps"):
        ServerConfig(mps="sometimes")


def test_auto_turns_mps_on_only_for_several_python_engine_processes_on_one_gpu(tmp_path, monkeypatch):
    bindir, _ = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr("algorithm.serving.mps.DEFAULT_PIPE_DIR", str(tmp_path / "no-default-daemon"))
    on, why = decide("auto", engine_repo(tmp_path, count=2))
    assert on and "2 个实例" in why
    cases = {"one": dict(count=1), "cpu": dict(kind="KIND_CPU"),
             "native": dict(backend='platform: "tensorrt_plan"')}
    for name, kw in cases.items():
        on, why = decide("auto", engine_repo(tmp_path, name=name, **kw))
        assert not on and why.startswith("auto："), (name, why)
    assert "原生后端" in decide("auto", str(tmp_path / "native"))[1]
    assert decide("auto", str(tmp_path / "empty")) == (False, "auto：仓库里没有 ugt_engine/config.pbtxt")
    # 显式的设置不看仓库
    assert decide("true", str(tmp_path / "empty"))[0] and not decide("false", str(tmp_path / "repo"))[0]


def test_auto_leaves_mps_off_without_the_control_program_or_beside_another_daemon(tmp_path, monkeypatch):
    repo = engine_repo(tmp_path, count=3)
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr("algorithm.serving.mps.DEFAULT_PIPE_DIR", str(tmp_path / "default-pipe"))
    monkeypatch.setattr("shutil.which", lambda name, *a, **k: None)
    on, why = decide("auto", repo)
    assert not on and CONTROL in why
    monkeypatch.undo()
    bindir, _ = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr("algorithm.serving.mps.DEFAULT_PIPE_DIR", str(tmp_path / "default-pipe"))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", "/run/ops-mps")
    on, why = decide("auto", repo)
    assert not on and "/run/ops-mps" in why
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY")
    (tmp_path / "default-pipe").mkdir()
    (tmp_path / "default-pipe" / "control").write_text("")  # 默认管道目录里有控制套接字：有人已经起了守护进程
    on, why = decide("auto", repo)
    assert not on and "default-pipe" in why


def test_auto_falls_back_without_mps_when_the_daemon_fails_but_true_raises(tmp_path, monkeypatch):
    bindir, record = fake_control(tmp_path, fail="cannot start")
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr("algorithm.serving.mps.DEFAULT_PIPE_DIR", str(tmp_path / "no-default-daemon"))
    repo = engine_repo(tmp_path, count=2)
    log_path = str(tmp_path / "out" / "tritonserver.log")
    s = EmbeddedTritonServer(repo, ServerConfig())
    s._tmp = str(tmp_path / "tmp")
    assert s._start_mps(log_path) == {} and s.mps is None
    assert s.mps_state["setting"] == "auto" and s.mps_state["active"] is False
    assert "cannot start" in s.mps_state["reason"]
    s = EmbeddedTritonServer(repo, ServerConfig(mps=True))
    s._tmp = str(tmp_path / "tmp")
    with pytest.raises(ServerError, match="cannot start"):
        s._start_mps(log_path)
    # 守护进程起得来时：auto 开 MPS，返回给 tritonserver 的环境变量
    (tmp_path / "ok").mkdir()
    bindir2, _ = fake_control(tmp_path / "ok")
    monkeypatch.setenv("PATH", bindir2 + os.pathsep + os.environ["PATH"])
    s = EmbeddedTritonServer(repo, ServerConfig())
    s._tmp = str(tmp_path / "tmp2")
    env = s._start_mps(log_path)
    assert s.mps is not None and env == s.mps.env() and s.mps_state["active"] is True
    s.mps.stop()


MPS_ALLERGIC = '''"""开着 MPS（环境里有 CUDA_MPS_PIPE_DIRECTORY）时初始化失败，像 MPS 客户端连不上的机器。"""
import os


class TritonPythonModel:
    def initialize(self, args):
        if os.environ.get("CUDA_MPS_PIPE_DIRECTORY"):
            raise RuntimeError("模拟：MPS 客户端连不上")

    def execute(self, requests):
        return []
'''


def test_auto_mps_that_makes_triton_exit_is_dropped_and_triton_restarted_without_it(sleep_repo, tmp_path, monkeypatch):
    """auto 开着 MPS、tritonserver 就绪前退出（这台机器上 MPS 的客户端连不上）：停掉守护进程，不用 MPS 再起一次，报告原因。"""
    import shutil

    bindir, record = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    monkeypatch.setattr("algorithm.serving.mps.decide", lambda setting, repo: (True, "auto：测试"))
    model = os.path.join(sleep_repo, "allergic")
    shutil.copytree(os.path.join(sleep_repo, "sleepy"), model)
    with open(os.path.join(model, "config.pbtxt")) as f:
        text = f.read().replace('name: "sleepy"', 'name: "allergic"')
    with open(os.path.join(model, "config.pbtxt"), "w") as f:
        f.write(text)
    with open(os.path.join(model, "1", "model.py"), "w") as f:
        f.write(MPS_ALLERGIC)
    log_path = str(tmp_path / "out" / "tritonserver.log")
    os.makedirs(os.path.dirname(log_path))
    with EmbeddedTritonServer(sleep_repo, ServerConfig(), ready_models=["sleepy", "allergic"], log_path=log_path) as s:
        assert s.mps is None and s.mps_state["active"] is False
        assert s.mps_state["reason"] == "auto：开着 MPS 时 tritonserver 启动时退出（tritonserver 退出（返回码 1）），已不用 MPS 重启"
        assert "CUDA_MPS_PIPE_DIRECTORY" not in _environ(s.process.pid)
    assert [c[:2] for c in calls(record)] == [["-d", ""], ["", "get_server_list"], ["", "quit"]]  # 第一次的守护进程已停掉
    with open(log_path) as f:
        assert "模拟：MPS 客户端连不上" in f.read()  # 两次启动写同一个日志：第一次的失败留着


def test_auto_does_not_start_beside_a_running_mps_process(tmp_path, monkeypatch):
    bindir, _ = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    monkeypatch.delenv("CUDA_MPS_PIPE_DIRECTORY", raising=False)
    monkeypatch.setattr("algorithm.serving.mps.DEFAULT_PIPE_DIR", str(tmp_path / "no-default-daemon"))
    monkeypatch.setattr("algorithm.serving.mps.running_mps_processes", lambda: [777])
    on, why = decide("auto", engine_repo(tmp_path, count=2))
    assert not on and "pid 777" in why


def test_stop_waits_until_the_daemons_processes_are_gone(tmp_path, monkeypatch):
    """quit 是异步的：stop 等守护进程与 MPS 服务器进程退出，紧接着起的下一个服务器（auto）才不会把它们当成别人的。"""
    from algorithm.serving import mps

    bindir, _ = fake_control(tmp_path)
    monkeypatch.setenv("PATH", bindir + os.pathsep + os.environ["PATH"])
    seen = iter([[], [111]])  # 启动前没有、启动后多了 111（控制守护进程）
    monkeypatch.setattr(mps, "running_mps_processes", lambda: next(seen))
    d = MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log")).start()
    assert d.pids == [111]
    checks = []

    def alive(pid):  # 111 与假的服务器 4242 各在第 3 次检查时退出
        checks.append(pid)
        return checks.count(pid) < 3

    monkeypatch.setattr(mps, "_alive", alive)
    d.stop()
    assert sorted(set(checks)) == [111, 4242] and checks.count(111) == 3 and checks.count(4242) == 3


def test_running_mps_processes_finds_a_process_by_its_name(tmp_path):
    """进程名（/proc/*/comm，截到 15 个字符）以 nvidia-cuda-mps 开头的都算：用一个改名的 sleep 充当留下的守护进程。"""
    import shutil
    import subprocess

    from algorithm.serving.mps import running_mps_processes

    fake = tmp_path / CONTROL
    shutil.copy(shutil.which("sleep"), fake)
    p = subprocess.Popen([str(fake), "30"])
    try:
        for _ in range(50):  # exec 之后 comm 才是新名字
            if p.pid in running_mps_processes():
                break
            import time
            time.sleep(0.02)
        assert p.pid in running_mps_processes() and os.getpid() not in running_mps_processes()
    finally:
        p.kill()
        p.wait()
    assert p.pid not in running_mps_processes()
