"""The project's layering: toolkits never import effsr, no import cycles between modules, no private names
cross modules, one home per helper."""
from __future__ import annotations

import ast
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
TOOLKITS = ("reparam", "prune", "decompose", "distill")
PACKAGES = (*TOOLKITS, "effsr")


def _files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=None)
def _parsed(path: Path) -> tuple[str, ast.Module]:
    """The text and syntax tree of ``path`` (parsed once per test session)."""
    text = path.read_text(encoding="utf-8")
    return text, ast.parse(text)


def _imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """``(line, absolute module, imported names)`` of every import statement of ``path``."""
    mod = _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(_parsed(path)[1]):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join(parent + ([node.module] if node.module else []))
            out.append((node.lineno, base, [a.name for a in node.names]))
    return out


def import_graph() -> dict[str, set[str]]:
    """package -> the project packages its modules import (statically, lazy imports included)."""
    graph: dict[str, set[str]] = {p: set() for p in PACKAGES}
    for path in _files(*PACKAGES):
        pkg = _module_name(path).split(".")[0]
        for _, module, _ in _imports(path):
            top = module.split(".")[0]
            if top in PACKAGES and top != pkg:
                graph[pkg].add(top)
    return graph


MODULES = {_module_name(p): p for p in _files(*PACKAGES)}

#: Import edges ``(importer, imported)`` that still close a cycle, each a function-local import, to be removed
#: (then deleted here; the test fails while a listed edge no longer exists or no longer closes a cycle).
KNOWN_CYCLES: set[tuple[str, str]] = set()


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING")


def _module_imports(path: Path) -> list[tuple[int, bool, str]]:
    """``(line, function-local?, project module)`` of every import ``path`` runs, module-level and inside
    functions (``if TYPE_CHECKING:`` blocks left out); ``from pkg import sub`` counts as importing ``pkg.sub``."""
    mod = _module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out: list[tuple[int, bool, str]] = []

    def target(name: str) -> str | None:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, local: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                for c in child.orelse:  # type: ignore[attr-defined]
                    visit(c, local)
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, local, t) for a in child.names if (t := target(a.name)))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    parent = package[: len(package) - child.level + 1]
                    base = ".".join(parent + ([child.module] if child.module else []))
                for a in child.names:
                    t = target(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
                    if t:
                        out.append((child.lineno, local, t))
            else:
                visit(child, local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(_parsed(path)[1], False)
    return out


def module_graph(function_local: bool = True) -> dict[str, dict[str, str]]:
    """module -> {imported project module: "file:line"} (function-local imports included unless told)."""
    graph: dict[str, dict[str, str]] = {m: {} for m in MODULES}
    for mod, path in MODULES.items():
        for line, local, target in _module_imports(path):
            if target != mod and (function_local or not local):
                graph[mod].setdefault(target, f"{path.relative_to(ROOT)}:{line}")
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    return found


def _describe(graph: dict[str, dict[str, str]], comps: list[list[str]]) -> str:
    return "\n".join(f"cycle {comp}:\n" + "\n".join(f"  {graph[a][b]}: {a} -> {b}" for a in comp for b in graph[a]
                                                      if b in comp) for comp in comps)


def test_no_import_cycle_between_modules_at_module_level():
    graph = module_graph(function_local=False)
    comps = cycles(graph)
    assert not comps, "import cycles between modules (module-level imports):\n" + _describe(graph, comps)


def test_no_import_cycle_between_modules_function_local_imports_included():
    graph = module_graph()
    for importer, imported in KNOWN_CYCLES:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: remove it from KNOWN_CYCLES"
    comps = cycles(graph)
    for importer, imported in KNOWN_CYCLES:
        assert any(importer in c and imported in c for c in comps), \
            f"{importer} -> {imported} closes no cycle any more: remove it from KNOWN_CYCLES"
    pruned = {m: {t: where for t, where in targets.items() if (m, t) not in KNOWN_CYCLES}
              for m, targets in graph.items()}
    comps = cycles(pruned)
    assert not comps, "import cycles between modules:\n" + _describe(pruned, comps)


def test_the_cycle_check_sees_function_local_and_relative_imports():
    assert "reparam.kernels" in module_graph(function_local=False)["reparam.base"]
    assert cycles({"a": {"b": ""}, "b": {"c": ""}, "c": {"a": ""}, "d": {"a": ""}}) == [["a", "b", "c"]]
    local = {t for _, is_local, t in _module_imports(ROOT / "effsr" / "cli.py") if is_local}
    assert {"effsr.shrink.commands", "effsr.export.cli"} <= local


def test_toolkits_never_import_effsr_statically():
    bad = [f"{p.relative_to(ROOT)}:{line}: {module}" for p in _files(*TOOLKITS)
           for line, module, _ in _imports(p) if module.split(".")[0] == "effsr"]
    assert not bad, "toolkit modules import the SR layer:\n" + "\n".join(bad)
    graph = import_graph()
    assert all("effsr" not in graph[t] for t in TOOLKITS), graph
    assert graph["reparam"] == set(), graph  # the bottom layer imports no other package of the project


@pytest.fixture(scope="module")
def effsr_modules_per_toolkit() -> dict[str, list[str]]:
    """In one fresh interpreter: every module of each toolkit imported in turn, and the effsr modules loaded
    so far after each toolkit (the first toolkit that shows one is the culprit)."""
    code = ("import sys, json, pkgutil, importlib\n"
            "out = {}\n"
            f"for toolkit in {list(TOOLKITS)!r}:\n"
            "    pkg = importlib.import_module(toolkit)\n"
            "    for m in pkgutil.walk_packages(pkg.__path__, toolkit + '.'):\n"
            "        importlib.import_module(m.name)\n"
            "    out[toolkit] = sorted(n for n in sys.modules if n == 'effsr' or n.startswith('effsr.'))\n"
            "print(json.dumps(out))")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("toolkit", TOOLKITS)
def test_importing_a_toolkit_loads_no_effsr_module(toolkit, effsr_modules_per_toolkit):
    assert effsr_modules_per_toolkit[toolkit] == []


def test_no_module_imports_a_private_name_of_another_project_module():
    bad = []
    for path in _files(*PACKAGES):
        for line, module, names in _imports(path):
            if module.split(".")[0] not in PACKAGES:
                continue
            bad += [f"{path.relative_to(ROOT)}:{line}: from {module} import {n}" for n in names
                    if n.startswith("_") and not n.startswith("__")]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_cli_and_command_modules_do_not_import_each_other():
    commands = {m for _, m, _ in _imports(ROOT / "effsr" / "shrink" / "commands.py")}
    assert "effsr.cli" not in commands and "effsr.cli_core" in commands
    models = {m for p in _files("effsr/models") for _, m, _ in _imports(p)}
    assert not any(m.startswith("effsr.shrink") for m in models), models


def test_one_atomic_writer_and_one_input_range_accessor():
    """``os.replace`` writes files only in reparam/utils/io.py (effsr.cli_core's StagedDir moves finished
    outputs into place); ``input_range`` is read only through distill.input_range; no mkstemp (0600)."""
    replace, getattr_range, mkstemp = [], [], []
    for path in _files(*PACKAGES):
        rel = path.relative_to(ROOT).as_posix()
        for node in ast.walk(_parsed(path)[1]):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            name = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if name == "replace" and isinstance(f, ast.Attribute) and getattr(f.value, "id", "") == "os":
                replace.append(f"{rel}:{node.lineno}")
            if name == "mkstemp":
                mkstemp.append(f"{rel}:{node.lineno}")
            if (name == "getattr" and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value == "input_range"):
                getattr_range.append(f"{rel}:{node.lineno}")
    assert {r.split(":")[0] for r in replace} <= {"reparam/utils/io.py", "effsr/cli_core.py"}, replace
    assert not mkstemp, mkstemp
    assert {r.split(":")[0] for r in getattr_range} == {"distill/ranges.py"}, getattr_range


def test_one_module_replacer():
    """Replacing a submodule by dotted name (``rpartition('.')`` + ``setattr``) lives only in reparam.utils.modules."""
    bad = []
    for path in _files(*PACKAGES):
        text, tree = _parsed(path)
        if 'rpartition(".")' not in text:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                body = ast.get_source_segment(text, node) or ""
                if 'rpartition(".")' in body and "setattr(" in body:
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert [b for b in bad if not b.startswith("reparam/utils/modules.py")] == [], bad


# ------------------------------------------------------------------------------------------ the homes
def test_atomic_writes_respect_the_umask(tmp_path):
    from reparam.utils import io

    old = os.umask(0o027)
    try:
        files = [io.write_json(tmp_path / "a" / "x.json", {"v": torch.tensor(1.5)}),
                 io.write_bytes(tmp_path / "b.bin", b"abc"),
                 io.write_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2)}, {"k": "v"})]
        from effsr.data import write_image
        files.append(write_image(tmp_path / "i.png", torch.zeros(2, 2, 3, dtype=torch.uint8).numpy()))
    finally:
        os.umask(old)
    for f in files:
        assert (f.stat().st_mode & 0o777) == 0o640, (f, oct(f.stat().st_mode))
    assert json.loads((tmp_path / "a" / "x.json").read_text()) == {"v": 1.5}


def test_a_failed_write_leaves_the_target_and_no_temporary_file(tmp_path):
    from reparam.utils import io

    target = io.write_text(tmp_path / "t.txt", "old")

    def broken(fh):
        fh.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        io.atomic_write(target, broken)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["t.txt"]
    with pytest.raises(TypeError):  # not encodable: nothing written
        io.write_json(tmp_path / "n.json", {"x": object()}, default=None)
    assert not (tmp_path / "n.json").exists()


def test_walker_keeps_repeats_and_replace_changes_one_place():
    from reparam.utils.modules import get_module, outermost, replace_module

    b = nn.Conv2d(2, 2, 1)
    net = nn.Sequential(b, nn.ReLU(), nn.Sequential(b))
    assert [n for n, _ in outermost(net, lambda m: isinstance(m, nn.Conv2d))] == ["0", "2.0"]
    assert [n for n, _ in outermost(net, lambda m: isinstance(m, nn.Conv2d), duplicates=False)] == ["0"]
    assert replace_module(net, "2.0", nn.Identity()) is b
    assert net[0] is b and isinstance(net[2][0], nn.Identity)
    with pytest.raises(ValueError, match="name"):
        get_module(net, "9.x")


def test_input_range_rule():
    from distill import input_range

    assert input_range(nn.Conv2d(1, 1, 1)) == 1.0  # declares nothing: [0, 1]
    m = nn.Conv2d(1, 1, 1)
    m.input_range = 255
    assert input_range(m) == 255.0
    for bad in (0, -1.0, float("nan"), True, "255"):
        m.input_range = bad
        with pytest.raises(ValueError, match="teacher.input_range"):
            input_range(m, "teacher")


def test_torch_pruning_versions_outside_the_tested_range_are_refused():
    from prune import _tp_compat

    assert _tp_compat.check_version("1.6.1") == "1.6.1"
    for v in ("1.4.0", "1.7.0", "2.0", "garbage"):
        with pytest.raises(ImportError, match=r">=1\.6,<1\.7"):
            _tp_compat.check_version(v)
    pin = (ROOT / "pyproject.toml").read_text()
    assert '"torch-pruning>=1.6,<1.7"' in pin


def test_generic_mac_counter_with_a_convention():
    from reparam.utils.flops import MacConvention, count_macs

    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))
    x = torch.zeros(1, 3, 5, 5)
    c = count_macs(net, x)
    assert (c.macs, c.activations, c.convs) == (27 * 4 * 25 + 4 * 25 + 4 * 2 * 25, 6 * 25, 2)
    assert count_macs(net, x, convention=MacConvention(activations=())).macs == 27 * 4 * 25 + 4 * 2 * 25


def test_docs_and_code_say_nothing_about_how_the_project_was_built():
    """User docs and code comments are timeless: no work-log references ("stop 16", "issue 12", "the prototype's")."""
    import re

    pattern = re.compile(r"stop [0-9]|this stop|since stop|issue [0-9]|the issue's|prototype|the anchors'", re.I)
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder in (*PACKAGES, "benchmarks", "tests", "examples"):
        paths += sorted(p for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md", ".txt", ".cfg", ".toml"))
    bad = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in paths if p != Path(__file__).resolve()
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not bad, "\n".join(bad)


def test_license_and_notice_ship_with_the_package():
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")  # (tomllib needs Python 3.11)
    assert 'license = "MIT"' in pyproject and 'license-files = ["LICENSE", "NOTICE"]' in pyproject
    assert (ROOT / "LICENSE").read_text(encoding="utf-8").startswith("MIT License")
    notice = (ROOT / "NOTICE").read_text(encoding="utf-8")
    for name in ("RFDN", "RLFN", "FMEN", "IMDN", "ECB", "DBB", "RepVGG", "RRRB", "ERB", "ACB", "MobileOne"):
        assert name in notice, name
