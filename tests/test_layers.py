"""The import rule of docs/INTERNALS.md ("Layers"), checked on the code itself.

    shmwatch.tools (tools/)        the shmwatch command, top, stress, bench
    broker/          clientlib/    side by side: neither imports the other
    shmwatch.wire (shmwatch/)      the wire contract both sides share; imports neither
    shm/                           shared-memory primitives; imports nothing of ours

Every import counts, wherever it is written (inside functions too) and however it is
spelled (relative imports, `importlib.import_module("...")` and `__import__` with a
literal name). A back-edge fails this test with the file, line and import."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OURS = ("shm", "shmwatch", "broker", "clientlib")

# folder -> (its import name, the layers of ours it may import besides itself)
LAYERS = {
    "shm": ("shm", ()),
    "shmwatch": ("shmwatch", ()),  # the namespace root and the wire contract
    "broker": ("broker", ("shm", "shmwatch")),
    "clientlib": ("clientlib", ("shm", "shmwatch")),
    "tools": ("shmwatch.tools", ("shm", "shmwatch", "broker", "clientlib")),
}


def layer_of(name: str) -> str | None:
    """The layer an absolute module name belongs to (None: not ours)."""
    if name == "shmwatch.tools" or name.startswith("shmwatch.tools."):
        return "shmwatch.tools"
    top = name.split(".")[0]
    return top if top in OURS else None


def module_name(folder: str, path: Path, root: Path) -> str:
    package = LAYERS[folder][0]
    parts = list(path.relative_to(root / folder).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imports_of(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = module.split(".")
                if not is_package:
                    pkg = pkg[:-1]
                pkg = pkg[:len(pkg) - (node.level - 1)]
                base = ".".join(pkg + ([base] if base else []))
            out.append((node.lineno, base))
            if base == "shmwatch":  # `from shmwatch import tools`: the name is the layer
                out += [(node.lineno, f"{base}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
            if fname in ("import_module", "__import__") and node.args \
                    and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                out.append((node.lineno, node.args[0].value))
    return out


def back_edges(root: Path) -> list[str]:
    """Every import that breaks the rule, as 'file:line: layer imports name'."""
    bad = []
    for folder, (package, allowed) in LAYERS.items():
        base = root / folder
        if not base.is_dir():
            continue
        mine = layer_of(package)
        files = sorted(base.rglob("*.py"))
        if folder == "tools":  # also the executable scripts tools/top, tools/stress, ...
            files += sorted(p for p in base.iterdir() if p.is_file() and not p.suffix)
        for path in files:
            if folder == "shmwatch" and "tools" in path.relative_to(base).parts:
                continue
            module = module_name(folder, path, root) if path.suffix == ".py" else package
            for line, name in imports_of(path, module):
                target = layer_of(name)
                if target is None or target == mine or target in allowed:
                    continue
                if folder == "shmwatch" and name == "shmwatch":
                    continue
                bad.append(f"{path.relative_to(root)}:{line}: {mine} imports {name}")
    return bad


def test_imports_run_one_way():
    assert back_edges(ROOT) == []


def test_the_check_catches_a_back_edge_even_inside_a_function(tmp_path):
    """The checker itself: a hidden back-edge in a small tree is reported."""
    for folder in LAYERS:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "broker" / "server.py").write_text(
        "import os\nfrom shm import ring\n\ndef late():\n    from clientlib import client\n")
    (tmp_path / "clientlib" / "cli.py").write_text(
        "import importlib\n\ndef tool():\n    importlib.import_module('shmwatch.tools.top')\n")
    (tmp_path / "shm" / "ring.py").write_text("import shmwatch.wire\nfrom . import errors\n")
    (tmp_path / "shmwatch" / "wire.py").write_text(
        "from shmwatch import __version__\nfrom broker.server import late\n")
    (tmp_path / "tools" / "top.py").write_text("from broker import server\nfrom . import x\n")
    (tmp_path / "clientlib" / "aio.py").write_text("from shmwatch import tools\n")
    assert sorted(back_edges(tmp_path)) == [
        "broker/server.py:5: broker imports clientlib",
        "clientlib/aio.py:1: clientlib imports shmwatch.tools",
        "clientlib/cli.py:4: clientlib imports shmwatch.tools.top",
        "shm/ring.py:1: shm imports shmwatch.wire",
        "shmwatch/wire.py:2: shmwatch imports broker.server",
    ]
