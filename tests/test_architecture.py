"""结构：algorithm/ 的 import 图没有环；在 Triton 里运行的 runtime/ 不导入导出、优化、门禁、仓库生成、构建或压测；
模型（algorithm/models）不导入服务（algorithm/serving）。解析源码（包括函数内的 import），不运行任何代码。"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "algorithm")
# runtime 可以用的本包模块（其余 algorithm.* 都不行）
RUNTIME_ALLOWED = ("algorithm.interfaces", "algorithm.errors", "algorithm.models.catalog", "algorithm.models.config",
                   "algorithm.serving.config", "algorithm.serving.bucket_plan", "algorithm.serving.runtime")


def modules():
    out = {}
    for dirpath, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports_of(path, name, known):
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # 相对导入
                parts = name.split(".")[:-node.level] if not path.endswith("__init__.py") else name.split(".")[:len(name.split(".")) - node.level + 1]
                base = ".".join(parts + [node.module])
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            # 取能对上的最长模块名（from pkg import module 也算依赖 module）
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n.startswith("algorithm") and n != name:
                found.add(n)
    return found


def graph():
    mods = modules()
    return {m: imports_of(p, m, mods) for m, p in mods.items()}


def test_no_import_cycle_anywhere_in_algorithm():
    g = graph()
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in g.get(m, ()):
            if d.startswith(m + ".") or m.startswith(d + ".") and d in ("algorithm", "algorithm.serving"):
                continue  # 包与自己的子模块
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not cycles, "import 环：\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_runtime_imports_only_the_contract_config_and_itself():
    g = graph()
    bad = {m: sorted(d for d in deps if not d.startswith(RUNTIME_ALLOWED))
           for m, deps in g.items() if m.startswith("algorithm.serving.runtime")}
    bad = {m: d for m, d in bad.items() if d}
    assert not bad, f"runtime 模块导入了构建 / 压测模块：{bad}"


def test_models_do_not_import_serving():
    g = graph()
    bad = {m: sorted(d for d in deps if d.startswith("algorithm.serving"))
           for m, deps in g.items() if m.startswith("algorithm.models")}
    assert not {m: d for m, d in bad.items() if d}, bad


def test_the_checker_sees_function_level_imports():
    g = graph()
    assert "algorithm.serving.engines" in g["algorithm.serving.build"]  # build() 里的 import
    assert "algorithm.serving.runtime.engines.torch_int8" in g["algorithm.serving.runtime.engines.torch"]


def test_only_the_profiler_imports_the_profiler():
    """剖析（serving/profile）在最上层：它用构建、运行器与压测的模块，包里别的模块都不导入它。"""
    g = graph()
    assert "algorithm.serving.runtime.buckets" in g["algorithm.serving.profile.throughput"]  # 检查器看得到剖析的模块
    bad = {m: sorted(d for d in deps if d.startswith("algorithm.serving.profile"))
           for m, deps in g.items() if not m.startswith("algorithm.serving.profile")}
    assert not {m: d for m, d in bad.items() if d}, bad
