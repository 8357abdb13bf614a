"""The structure docs/architecture.md describes, checked on the code itself.

Every import statement of ``tpmid/`` is read (module level and inside functions:
a lazy import is a dependency too); only imports under ``if TYPE_CHECKING:`` are
left out, because they never run. From that graph:

* there is no import cycle;
* every module imports only from its own layer or the layers below it;
* the device-side library never imports the reference server or the test support;
* only ``tpmid/tpm/`` imports tpm2-pytss (ESAPI);
* only ``tpmid/store/`` syncs or renames files (the one durable writer);
* only ``tpmid/tpm/identity.py`` looks at a key's kind.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tpmid"

# Lowest first. A module may import from its own layer and the layers below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("tpmid", "tpmid.errors", "tpmid.cancel", "tpmid.clock", "tpmid.config", "tpmid.policy",
               "tpmid.render", "tpmid.der", "tpmid.csr", "tpmid.evidence", "tpmid.aziot",
               "tpmid.pkcs11.uri")),
    ("disk and environment", ("tpmid.secrets", "tpmid.certfiles", "tpmid.store",
                              "tpmid.manifest")),
    ("TPM and TLS", ("tpmid.tpm", "tpmid.tls", "tpmid.pkcs11")),
    ("EST", ("tpmid.est",)),
    ("orchestration and the reference server", ("tpmid.lifecycle", "tpmid.server")),
    ("composition root", ("tpmid.wiring",)),
    ("command line and test support", ("tpmid.cli", "tpmid._cli", "tpmid.testing")),
]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node except what sits under ``if TYPE_CHECKING:``."""
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and (
                (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING")
                or (isinstance(node.test, ast.Attribute) and node.test.attr == "TYPE_CHECKING")):
            todo.extend(node.orelse)
            continue
        yield node
        todo.extend(ast.iter_child_nodes(node))


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not MODULES[module].name == "__init__.py":
        base = base[:-1]
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str) -> set[str]:
    """The modules ``module`` imports at run time (``from pkg import sub`` counts as pkg.sub)."""
    tree = ast.parse(MODULES[module].read_text(), str(MODULES[module]))
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
            found.update(subs or [target])
    return found


GRAPH = {m: {i for i in imports_of(m) if i in MODULES and i != m} for m in MODULES}


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS (and docs/architecture.md)"
    return rank


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_the_imports_it_judges() -> None:
    assert "tpmid.tpm.connection" in GRAPH["tpmid.wiring.tpm"]
    assert "tpmid.store.fsio" in GRAPH["tpmid.store.versions"]
    # Lazy imports at the command boundary count as dependencies too.
    assert "tpmid.wiring.tpm" in GRAPH["tpmid._cli.tpm"]


def test_tpmid_has_no_import_cycle() -> None:
    assert _cycles() == []


def test_every_module_belongs_to_a_layer() -> None:
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_module_imports_only_from_its_layer_or_below(module: str) -> None:
    mine = layer_of(module)
    upward = sorted(f"{dep} ({LAYERS[layer_of(dep)][0]})" for dep in GRAPH[module]
                    if layer_of(dep) > mine)
    assert upward == [], f"{module} ({LAYERS[mine][0]}) imports from above: {upward}"


def test_device_library_never_imports_the_reference_server_or_test_support() -> None:
    offenders = sorted(
        f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
        if d.split(".")[:2] in (["tpmid", "server"], ["tpmid", "testing"])
        and m.split(".")[:2] not in (["tpmid", "server"], ["tpmid", "testing"], ["tpmid", "_cli"])
    )
    assert offenders == []


def test_only_the_tpm_package_imports_tpm2_pytss() -> None:
    offenders = sorted(m for m in MODULES if not m.startswith("tpmid.tpm")
                       and any(i.split(".")[0] == "tpm2_pytss" for i in imports_of(m)))
    assert offenders == []


def _calls(module: str, names: set[str]) -> set[str]:
    tree = ast.parse(MODULES[module].read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "os" \
                and node.func.attr in names:
            found.add(node.func.attr)
    return found


def test_only_the_store_package_makes_writes_durable() -> None:
    durable = {"fsync", "replace", "rename", "fdatasync"}
    offenders = sorted(f"{m}: {sorted(_calls(m, durable))}" for m in MODULES
                       if not m.startswith("tpmid.store") and _calls(m, durable))
    assert offenders == []


KINDS = {"persistent", "ek-derived", "file"}


def _kind_tests(module: str) -> list[int]:
    """Lines that compare something called ``kind`` with a key-kind string."""
    tree = ast.parse(MODULES[module].read_text())
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        names = [n for n in (node.left, *node.comparators)
                 if (isinstance(n, ast.Attribute) and n.attr == "kind")
                 or (isinstance(n, ast.Name) and n.id == "kind")]
        consts = {c.value for n in (node.left, *node.comparators) for c in ast.walk(n)
                  if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        if names and consts & KINDS:
            lines.append(node.lineno)
    return lines


def test_key_kind_is_looked_at_only_where_identity_keys_are_built() -> None:
    offenders = {m: _kind_tests(m) for m in MODULES
                 if m != "tpmid.tpm.identity" and _kind_tests(m)}
    assert offenders == {}
    source = MODULES["tpmid.tpm.identity"].read_text()
    assert "_KINDS[config.kind]" in source  # the one dispatch, by table
