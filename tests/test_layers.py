"""The package's layers, enforced: the core imports no I/O, lower layers never import upper
ones, there are no import cycles, and every module declares its public surface.

Layers, lowest first: ``proxy.core`` (sans-I/O), ``proxy.net`` (Trio shells),
``proxy.app`` (wiring), ``proxy.sim`` (the simulator, which uses all of them), and the
entry points ``proxy.firehose``, ``proxy.filtered``, ``proxy.simulator``, ``proxy.journal``.
Imports are read from the source (``ast``), including those under ``TYPE_CHECKING``:
a cycle that only the type checker sees is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "proxy"
LAYERS = {"core": 0, "net": 1, "app": 2, "sim": 3}
ENTRY_POINT_LAYER = 4
#: The modules outside the layers: the package and what ``trio-run`` / ``python -m`` names.
ENTRY_POINTS = {"proxy", "proxy.firehose", "proxy.filtered", "proxy.simulator", "proxy.keys", "proxy.client",
                "proxy.journal", "proxy.replay"}
#: What the sans-I/O core must never import: event loops, sockets, TLS, metrics, files.
CORE_FORBIDDEN = {"trio", "trio_websocket", "prometheus_client", "socket", "ssl", "selectors",
                  "asyncio", "os", "pathlib", "io", "shutil", "decouple", "h11"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports, absolute, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from . import protocol` names a module, not an attribute
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    known = modules()
    return {module for module in found if module in known or not module.startswith("proxy")}


def layer_of(name: str) -> int:
    parts = name.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return LAYERS[parts[1]]
    return ENTRY_POINT_LAYER


def test_the_layers_exist_and_hold_the_modules():
    names = modules()
    assert {"proxy.core.protocol", "proxy.net.connection", "proxy.app.tier", "proxy.sim.simulator",
            "proxy.firehose", "proxy.filtered", "proxy.simulator"} <= set(names)
    # nothing but the entry points and the package itself sits outside a layer
    assert {n for n in names if layer_of(n) == ENTRY_POINT_LAYER} == ENTRY_POINTS


@pytest.mark.parametrize("name", sorted(n for n in modules() if n.startswith("proxy.core")))
def test_the_core_imports_no_io(name):
    roots = {module.split(".")[0] for module in imports_of(name, modules()[name])}
    assert roots & CORE_FORBIDDEN == set()


@pytest.mark.parametrize("name", sorted(modules()))
def test_no_module_imports_a_higher_layer(name):
    higher = {module for module in imports_of(name, modules()[name])
              if module.startswith("proxy.") and layer_of(module) > layer_of(name)}
    assert higher == set()


def test_there_are_no_import_cycles():
    graph = {name: {m for m in imports_of(name, path) if m.startswith("proxy.") and m != name}
             for name, path in modules().items()}
    # a package's __init__ importing nothing, edges to a package stand for its __init__
    visiting: list[str] = []
    done: set[str] = set()

    def visit(node: str) -> None:
        if node in done:
            return
        assert node not in visiting, "import cycle: " + " -> ".join(visiting[visiting.index(node):] + [node])
        visiting.append(node)
        for neighbour in sorted(graph.get(node, ())):
            visit(neighbour)
        visiting.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


@pytest.mark.parametrize("name", sorted(n for n in modules() if layer_of(n) < ENTRY_POINT_LAYER
                                        and not n.endswith(tuple(LAYERS))))
def test_every_layered_module_declares_its_public_surface(name):
    tree = ast.parse(modules()[name].read_text())
    declared = [node for node in tree.body if isinstance(node, ast.Assign)
                and any(getattr(target, "id", None) == "__all__" for target in node.targets)]
    assert declared, f"{name} has no __all__"
    exported = set(ast.literal_eval(declared[0].value))
    public = {node.name for node in tree.body
              if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
              and not node.name.startswith("_")}
    assert public <= exported, f"{name}: public but not in __all__: {public - exported}"
    defined = public | {target.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
                        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
                        if isinstance(target, ast.Name)}
    defined |= {alias.asname or alias.name for node in tree.body if isinstance(node, ast.ImportFrom)
                for alias in node.names}  # a deliberate re-export, like errors.CloseReason
    assert exported <= defined, f"{name}: __all__ names what it does not define: {exported - defined}"


def test_the_checks_catch_what_they_are_for(tmp_path):
    """The import reader sees relative, absolute and TYPE_CHECKING imports alike."""
    sample = tmp_path / "sample.py"
    sample.write_text("import trio\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                      "    from ..app.tier import Tier\nfrom . import protocol\n")
    found = imports_of("proxy.core.sample", sample)
    assert {"trio", "proxy.app.tier", "proxy.core.protocol"} <= found
    assert layer_of("proxy.app.tier") > layer_of("proxy.core.sample")


def _public_definitions(tree: ast.Module) -> list[tuple[str, ast.AST]]:
    """The module's public classes and functions (those in ``__all__`` when it declares one),
    and the public methods of those classes; ``@overload`` stubs left out."""
    exported: set[str] | None = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(target, "id", None) == "__all__" for target in node.targets):
            exported = {element.value for element in node.value.elts}  # type: ignore[attr-defined]
    found: list[tuple[str, ast.AST]] = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if exported is not None and node.name not in exported:
            continue
        if any(getattr(decorator, "id", None) == "overload" for decorator in getattr(node, "decorator_list", [])):
            continue
        found.append((node.name, node))
        if isinstance(node, ast.ClassDef):
            found.extend((f"{node.name}.{method.name}", method) for method in node.body
                         if isinstance(method, (ast.FunctionDef, ast.AsyncFunctionDef))
                         and not method.name.startswith("_"))
    return found


@pytest.mark.parametrize("name", sorted(modules()))
def test_every_module_and_public_definition_says_what_it_is(name):
    """A docstring on each module and on every public class, function and method: the contract."""
    tree = ast.parse(modules()[name].read_text())
    assert ast.get_docstring(tree), f"{name} has no module docstring"
    assert [definition for definition, node in _public_definitions(tree)
            if not ast.get_docstring(node)] == [], f"{name}: public definitions without a docstring"
