"""把新构建的仓库版本滚动进运行中的内嵌 Triton（scripts/serve.py 启动的那个），或回滚到上一个版本。

  python scripts/build.py build_dir=build/v2 ...                       # 新版本构建在自己的目录里
  python scripts/rollout.py url=127.0.0.1:8000 source=build/v2/model_repository        # 上线
  python scripts/rollout.py url=127.0.0.1:8000 rollback                                # 回到上一个版本
  python scripts/rollout.py url=127.0.0.1:8000 status                                  # 现在服务哪个版本

参数（key=value，与其余脚本的 Hydra 覆盖写法相同）：
  url         运行中服务器的 HTTP 地址（serve.py 启动时打印的 HTTP 一行；必填）
  repository  服务器的模型仓库（serve.py 打印的“仓库”；默认 build/model_repository，即默认 build_dir 的仓库）
  source      上线时：新构建的 model_repository（必须带 build_info.json，且精度门禁通过）
  tag         上线时：版本标签（默认 v2、v3……）；模型以 <步骤>__<tag> 的名字加载
动作（不带 = 的词）：rollout（给了 source 时的默认）、rollback、status（没给 source 时的默认）。

做法与保证见 algorithm/serving/rollout.py 与 docs/serving.md“上线与回滚”。被拒时退出码 2，旧版本继续服务。
为什么不用 Hydra：只有这几个输入，不需要整个 ServingConfig；Hydra 应用还会为每次运行建输出目录。
"""
from __future__ import annotations

import json
import sys
from typing import Optional, Sequence

from algorithm.errors import RolloutError, UGTServingError
from algorithm.serving import rollout as ro
from algorithm.serving.build import paths
from algorithm.serving.config import ServingConfig

ACTIONS = ("rollout", "rollback", "status")
KEYS = ("url", "repository", "source", "tag")


def parse_argv(argv: Sequence[str]) -> dict:
    args = {"repository": paths(ServingConfig())["repository"]}
    actions = []
    for a in argv:
        if "=" not in a:
            if a not in ACTIONS:
                raise SystemExit(f"未知的动作 {a!r}：可用 {list(ACTIONS)}")
            actions.append(a)
            continue
        k, v = a.split("=", 1)
        if k not in KEYS:
            raise SystemExit(f"未知参数 {k!r}：可用 {list(KEYS)}")
        args[k] = v
    if len(actions) > 1:
        raise SystemExit(f"只能给一个动作，得到 {actions}")
    args["action"] = actions[0] if actions else ("rollout" if "source" in args else "status")
    if "url" not in args:
        raise SystemExit("缺少 url=HOST:PORT（运行中服务器的 HTTP 地址，scripts/serve.py 启动时打印）")
    if args["action"] == "rollout" and "source" not in args:
        raise SystemExit("rollout 需要 source=<新构建的 model_repository>")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_argv(sys.argv[1:] if argv is None else argv)
    try:
        if args["action"] == "status":
            print(json.dumps(ro.status(args["url"], args["repository"]), indent=2, ensure_ascii=False))
            return 0
        if args["action"] == "rollback":
            report = ro.rollback(args["url"], args["repository"])
        else:
            report = ro.rollout(args["url"], args["repository"], args["source"], tag=args.get("tag"))
    except RolloutError as e:
        print(f"被拒：{e}", file=sys.stderr)
        return 2
    except UGTServingError as e:
        print(f"失败：{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"现在服务版本 {report['tag']}（上一个 {report['previous']}）：加载 {report['load_s']:.1f} s、冒烟 "
          f"{report['smoke_s']:.2f} s、切换 {report['switch_s']:.2f} s、卸载旧版本 {report['unload_s']:.1f} s"
          + (f"；删掉了更早的版本 {report['pruned']}" if report.get("pruned") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
