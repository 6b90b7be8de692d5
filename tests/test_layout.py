"""仓库布局的规则：scripts/ 只放用户的入口（每个都写在 README 里），tools/ 是本项目自己的 GPU 测量工具（每个都写在
tools/README.md 里）；scripts/、tools/、examples/ 与包里没有文件改 sys.path（本包由 pip install -e 安装，GPU 机器上由
gpu_bench.sh 的 PYTHONPATH 找到）；文档与脚本里写到的 scripts/、tools/ 路径都存在。"""
import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NO_SYS_PATH_DIRS = ("scripts", "tools", "examples", "algorithm")
# 写到 scripts/、tools/ 路径的地方（benchmarks/ 各次测量的 README 记的是当时的命令，不查；索引 benchmarks/README.md 查）
DOCS = ["README.md", "tools/README.md", "benchmarks/README.md", "Dockerfile", ".ci/run", *sorted(
    str(p.relative_to(ROOT)) for d in ("docs", "scripts", "tools", "algorithm", "examples", "conf") for p in (ROOT / d).rglob("*")
    if p.is_file() and p.suffix in (".md", ".py", ".sh", ".yaml"))]
PATH_RE = re.compile(r"\b((?:scripts|tools)/[A-Za-z0-9_.-]+\.(?:py|sh|md))")
# 索引里说明“以前在哪、现在在哪”时写到的旧路径
HISTORICAL = {"benchmarks/README.md": {"scripts/engine_profile.py"}}


def sys_path_uses(source: str):
    """源码里读写 sys.path 或调用 site.addsitedir 的行号。"""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and (
                (node.value.id == "sys" and node.attr == "path") or (node.value.id == "site" and node.attr == "addsitedir")):
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "sys" and any(a.name == "path" for a in node.names):
            found.append(node.lineno)
    return found


def test_the_sys_path_check_sees_the_usual_forms():
    assert sys_path_uses("import sys\nsys.path.insert(0, 'x')\n") == [2]
    assert sys_path_uses("import sys, os\nif 1:\n    sys.path[:0] = [os.getcwd()]\n") == [3]
    assert sys_path_uses("from sys import path\npath.append('x')\n") == [1]
    assert sys_path_uses("import site\nsite.addsitedir('x')\n") == [2]
    assert sys_path_uses("import sys\nprint(sys.argv)  # sys.path 只在注释里\n") == []


def test_no_file_under_scripts_tools_examples_or_the_package_changes_sys_path():
    bad = {}
    for d in NO_SYS_PATH_DIRS:
        for p in sorted((ROOT / d).rglob("*.py")):
            lines = sys_path_uses(p.read_text())
            if lines:
                bad[str(p.relative_to(ROOT))] = lines
    assert not bad, f"这些文件改了 sys.path（用安装的包、PYTHONPATH 或 importlib 按路径加载）：{bad}"


def test_every_file_in_scripts_is_a_user_entry_point_named_in_the_readme():
    """规则：scripts/ 里每个文件都在 README.md 里以 scripts/<文件名> 写到；Python 入口能直接运行（有 __main__ 分支），
    不导入 tools/ 的东西，也没有给别的脚本用的辅助模块（下划线开头）。"""
    readme = (ROOT / "README.md").read_text()
    files = sorted(p.name for p in (ROOT / "scripts").iterdir() if p.is_file())
    assert files, "scripts/ 是空的"
    missing = [f for f in files if f"scripts/{f}" not in readme]
    assert not missing, f"README.md 里没有写到的 scripts/ 文件（用户的入口要写进 README；实验室工具放 tools/）：{missing}"
    for f in files:
        assert not f.startswith("_"), f"scripts/{f}：共用的代码放进包（例如 algorithm/serving/cli.py）"
        if f.endswith(".py"):
            text = (ROOT / "scripts" / f).read_text()
            assert 'if __name__ == "__main__":' in text, f"scripts/{f} 不能直接运行"
            assert not re.search(r"^\s*(from|import) tools\b", text, re.M), f"scripts/{f} 导入了 tools/"
        else:
            assert f.endswith(".sh"), f"scripts/{f}：只放 .py 与 .sh 入口"


def test_every_tool_is_described_in_tools_readme():
    readme = (ROOT / "tools" / "README.md").read_text()
    tools = sorted(p.name for p in (ROOT / "tools").iterdir() if p.is_file() and p.name != "README.md")
    missing = [t for t in tools if f"`{t}" not in readme]
    assert not missing, f"tools/README.md 里没有写到：{missing}"


def test_shell_scripts_run_from_the_repository_root():
    """scripts/ 与 tools/ 的 .sh 都先 cd 到仓库根目录（它们在仓库根目录下一层），之后的相对路径才对。"""
    for p in sorted([*(ROOT / "scripts").glob("*.sh"), *(ROOT / "tools").glob("*.sh")]):
        assert 'cd "$(dirname "$0")/.."' in p.read_text(), f"{p.relative_to(ROOT)} 没有 cd 到仓库根目录"


def test_scripts_and_tools_paths_named_in_docs_and_code_exist():
    bad = []
    for doc in DOCS:
        path = ROOT / doc
        if not path.is_file():
            continue
        for m in PATH_RE.finditer(path.read_text()):
            ref = m.group(1)
            if ref.split("/")[1].split(".")[0] == "X" or ref in HISTORICAL.get(doc, ()):  # 占位（scripts/X.py）或旧路径
                continue
            if not (ROOT / ref).is_file():
                bad.append(f"{doc}: {ref}")
    assert not bad, "写到的文件不存在（移动过？）：\n" + "\n".join(sorted(set(bad)))
