"""The package layout stays as README's "Layout" describes it: imports point down, no circles.

Every import counts, including those under ``if TYPE_CHECKING:`` and inside functions: a circle
that only type checkers or a late import see is still a circle for a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("keyservice", "kmsfs")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module ``name`` refers to (a module, or the package of a name in it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str, path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one.
            names = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        for name in names:
            target = _resolve(name)
            if target is not None and target != module:
                targets.add(target)
    # Importing ``a.b.c`` runs ``a/__init__`` and ``a/b/__init__`` too; those import nothing here
    # (test_package_inits_import_nothing), so the edges to them are left out.
    return {t for t in targets if not (MODULES[t].name == "__init__.py" and module.startswith(t + "."))}


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in GRAPH[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def test_the_graph_sees_known_edges() -> None:
    """Guard against a walker that finds nothing (and so can never fail)."""
    assert "keyservice.service" in GRAPH["keyservice.ops.keys"]
    assert "keyservice.ops.keys" in GRAPH["keyservice.ops.registry"]
    assert "keyservice.http.sigv4" in GRAPH["kmsfs.keyclient"]
    assert len(MODULES) > 60


def test_no_import_circle() -> None:
    assert _cycles() == []


def test_cycle_detection_works() -> None:
    GRAPH["keyservice.errors"].add("keyservice.service")
    try:
        assert _cycles()
    finally:
        GRAPH["keyservice.errors"].discard("keyservice.service")


LOWER = ("keyservice.store", "keyservice.audit", "keyservice.authz")
UPPER = ("keyservice.http", "keyservice.cli", "keyservice.ops", "keyservice.service", "keyservice.bootstrap",
         "keyservice.console")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, *LOWER)))
def test_lower_layers_never_import_upward(module: str) -> None:
    upward = sorted(t for t in GRAPH[module] if _in(t, *UPPER))
    assert upward == [], f"{module} imports {upward}"


def test_the_core_knows_no_operation_and_no_wire() -> None:
    wings = ("keyservice.ops", "keyservice.http", "keyservice.cli")
    upward = sorted(t for t in GRAPH["keyservice.service"] if _in(t, *wings))
    assert upward == []


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, "keyservice.ops")))
def test_operations_never_import_the_wire_or_cli(module: str) -> None:
    assert not [t for t in GRAPH[module] if _in(t, "keyservice.http", "keyservice.cli")]


def test_kmsfs_uses_only_the_signer_and_the_envelope_parser() -> None:
    used = {
        (m, t) for m in MODULES if _in(m, "kmsfs") for t in GRAPH[m] if _in(t, "keyservice")
    }
    assert used == {("kmsfs.keyclient", "keyservice.http.sigv4"), ("kmsfs.cli.info", "keyservice.envelope")}


def test_package_inits_import_nothing() -> None:
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module != "kmsfs":
            assert GRAPH[module] == set(), f"{module}/__init__.py imports {GRAPH[module]}"


# The console translates browser requests into service calls: it never touches the store, an
# operation, authorization or the audit writer directly, and the HTTP layer does not know it (it is
# handed in as a mount). Audit reads go through the review/verify readers.
CONSOLE_MAY_IMPORT = (
    "keyservice.console", "keyservice.errors", "keyservice.context", "keyservice.audit.review",
    "keyservice.audit.questions",
    "keyservice.audit.verify", "keyservice.audit.signing", "keyservice.audit.records",
    "keyservice.audit.commit",
)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _in(m, "keyservice.console")))
def test_the_console_uses_only_the_service_facade_and_the_audit_readers(module: str) -> None:
    other = sorted(t for t in GRAPH[module] if not _in(t, *CONSOLE_MAY_IMPORT))
    assert other == [], f"{module} imports {other}"


def test_the_console_is_wired_only_by_the_cli() -> None:
    users = sorted(m for m in MODULES if not _in(m, "keyservice.console")
                   and any(_in(t, "keyservice.console") for t in GRAPH[m]))  # fmt: skip
    assert users == ["keyservice.cli.main"]


@pytest.mark.parametrize("module", ["kmsfs.format", "kmsfs.infile", "kmsfs.dirformat", "kmsfs.names"])
def test_kmsfs_formats_know_no_fuse_and_no_key_service(module: str) -> None:
    """Crypto formats are pure: no libfuse, no client, no HTTP (the brief's layering rule)."""
    banned = ("kmsfs._fuse", "kmsfs.operations", "kmsfs.inodes", "kmsfs.core", "kmsfs.keyclient",
              "kmsfs.transport", "kmsfs.dirkeys", "kmsfs.reports", "keyservice")
    assert not [t for t in GRAPH[module] if _in(t, *banned)]
