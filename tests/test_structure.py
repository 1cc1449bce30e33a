"""The house rules of installer/lorastrap/, checked on the source: no module imports another's private names, no
import cycle (function-level imports included), only subproc.py starts processes."""

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "installer" / "lorastrap"


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PKG.glob("*.py"))}


def imports(tree: ast.Module) -> tuple[dict[str, str], set[str], list[str]]:
    """(local alias → lorastrap module, lorastrap modules imported anywhere, private names imported)."""
    alias, used, private = {}, set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorastrap":
            if node.module == "lorastrap":
                for a in node.names:
                    used.add(a.name)
                    alias[a.asname or a.name] = a.name
            else:
                used.add(node.module.split(".")[1])
                private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                            and not a.name.startswith("__")]
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lorastrap."):
                    used.add(a.name.split(".")[1])
    return alias, used, private


def test_no_private_names_of_other_modules():
    offences = []
    for name, tree in modules().items():
        alias, _, private = imports(tree)
        offences += [f"{name}: imports {p}" for p in private]
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in alias
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                offences.append(f"{name}: uses {alias[node.value.id]}.{node.attr}")
    assert not offences


def test_no_import_cycles():
    graph = {name: imports(tree)[1] - {name} for name, tree in modules().items()}
    done, stack = set(), []

    def visit(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done or node not in graph:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        stack.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)


def test_only_subproc_starts_processes():
    starters = {"subprocess", "os.system", "os.fork", "os.exec", "os.spawn", "os.popen"}
    offences = []
    for name, tree in modules().items():
        if name == "subproc":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offences += [f"{name}: imports {n}" for n in names if n == "subprocess"]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                dotted = f"{node.value.id}.{node.attr}"
                offences += [f"{name}: calls {dotted}" for s in starters if dotted.startswith(s) and "." in s]
    assert not offences
