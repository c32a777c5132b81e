"""Write constraints.txt: the exact versions tested here, for every package the project needs (setup.cfg's
install_requires + the dev/export extras and everything they pull in), from the installed environment
(``pip freeze`` of that closure).

    python .ci/freeze_constraints.py            # after `pip install -e ".[dev]"` and a green test run
"""
import os
import re
from importlib.metadata import PackageNotFoundError, distribution

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _name(req: str) -> str:
    return re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _requires(dist, extras=()):
    out = []
    for r in dist.requires or []:
        req, _, marker = r.partition(";")
        m = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", marker)
        if m and m.group(1) not in extras:
            continue
        out.append(_name(req))
    return out


def main() -> None:
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    reqs = cfg["options"]["install_requires"].split("\n") + cfg["options.extras_require"]["dev"].split("\n") \
        + cfg["options.extras_require"]["export"].split("\n")
    todo, seen = [_name(r) for r in reqs if r.strip()], {}
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        try:
            d = distribution(n)
        except PackageNotFoundError:  # a platform-specific dependency not installed here
            continue
        seen[n] = f"{d.metadata['Name']}=={d.version}"
        todo.extend(_requires(d))
    lines = sorted(seen.values(), key=str.lower)
    with open(os.path.join(ROOT, "constraints.txt"), "w") as f:
        f.write("# Exact versions the test suite passed with (python .ci/freeze_constraints.py); setup.cfg holds\n"
                "# the lower bounds. Install: pip install -e \".[dev]\" -c constraints.txt\n")
        f.write("\n".join(lines) + "\n")
    print(f"constraints.txt: {len(lines)} packages")


if __name__ == "__main__":
    main()
