"""The package's house plan, checked from the source with `ast` (issue 15).

- folders form layers: a module imports only from its own folder, from folders below
  it, and from the loose modules at the bottom (cli > service > fanotify | fscache >
  daemon > registry > builder > rafs > layout > loose);
- no import cycles between modules, lazy (function-level) imports included;
- no `_private` name crosses a module: not imported, not reached as `obj._name` other
  than on `self`/`cls`;
- at most 8 loose modules at the top of the package;
- every folder's `__init__` has a docstring saying what it owns and may import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "erofs_nydus"

# rank of each folder: a module may import from equal (same folder) or lower ranks
RANKS = {
    "cli": 9,
    "service": 8,
    "fanotify": 7,
    "fscache": 7,
    "daemon": 6,
    "registry": 5,
    "builder": 4,
    "rafs": 3,
    "layout": 2,
    "_native": 1,
    "": 0,  # loose modules: mount, config, errors, fsutil, the package __init__
}


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _folder(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and _is_pkg(mod)) else ""


def _is_pkg(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _resolve(name: str) -> str | None:
    """The project module that importing `name` loads (the longest known prefix)."""
    parts = name.split(".")
    while parts:
        cand = ".".join(parts)
        if cand in MODULES:
            return cand
        parts.pop()
    return None


def _imports(mod: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported module, names) for every project import in `mod`, except those
    under `if TYPE_CHECKING:` (never executed)."""
    tree = ast.parse(MODULES[mod].read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                for inner in ast.walk(sub):
                    skip.add(id(inner))
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("erofs_nydus"):
                    target = _resolve(a.name)
                    if target:
                        out.append((node.lineno, target, []))
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
            node.module.startswith("erofs_nydus")
        ):
            names = [a.name for a in node.names]
            subs = [_resolve(f"{node.module}.{n}") for n in names]
            if any(s and s != _resolve(node.module) for s in subs):
                for n, s in zip(names, subs, strict=True):
                    if s and s != _resolve(node.module):
                        out.append((node.lineno, s, []))
                    else:
                        out.append((node.lineno, str(_resolve(node.module)), [n]))
            else:
                target = _resolve(node.module)
                if target:
                    out.append((node.lineno, target, names))
    return out


def test_imports_point_down_the_pipeline() -> None:
    bad = []
    for mod in MODULES:
        me = _folder(mod)
        for line, target, _ in _imports(mod):
            them = _folder(target)
            if them == me or target == "erofs_nydus":
                continue
            if RANKS[them] >= RANKS[me] and not (mod == f"erofs_nydus.{me}" and
                                                 target.startswith(mod + ".")):
                bad.append(f"{MODULES[mod].relative_to(PKG.parent)}:{line}: {me or 'top'} "
                           f"imports {target} ({them or 'top'})")
    assert not bad, "imports going up or sideways:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod in MODULES:
        for _, target, _ in _imports(mod):
            # a package importing its own submodules (lazy re-exports) is not a cycle
            if target != mod and not (_is_pkg(mod) and target.startswith(mod + ".")):
                graph[mod].add(target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_private_names_cross_modules() -> None:
    bad = []
    for path in MODULES.values():
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "erofs_nydus"
            ):
                bad += [f"{path.name}:{node.lineno}: imports {node.module}.{a.name}"
                        for a in node.names if a.name.startswith("_")
                        and not a.name.startswith("__")]
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and not (isinstance(node.value, ast.Name) and node.value.id in {"self", "cls"})
                and ast.unparse(node) not in {"os._exit", "sys._getframe"}
            ):
                bad.append(f"{path.relative_to(PKG.parent)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_few_loose_modules() -> None:
    loose = sorted(p.name for p in PKG.glob("*.py"))
    assert len(loose) <= 8, loose


@pytest.mark.parametrize("folder", sorted(p.parent.name for p in PKG.glob("*/__init__.py")))
def test_every_folder_states_its_contract(folder: str) -> None:
    doc = ast.get_docstring(ast.parse((PKG / folder / "__init__.py").read_text()))
    assert doc and len(doc) > 80, f"{folder}/__init__.py: no docstring stating its contract"
    if folder not in {"_native", "cli"}:
        assert "import" in doc, f"{folder}/__init__.py: docstring does not say what it may import"
