"""The house rules of installer/lorastrap/, checked on the source: every module lives in a room (a subpackage for
one stage), a room imports only the rooms below it, as its own docstring says; no module imports another's private
names, no import cycle (function-level imports included), only core/subproc.py starts processes."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "installer" / "lorastrap"

# The rooms, top floor first; each may import the rooms listed (and itself). This table is the rule; each room's
# docstring must say the same, so a reader of the code sees it where the code is.
ALLOWED = {
    "cli": {"fleet", "care", "install", "locking", "matrix", "machine", "core"},
    "fleet": {"install", "locking", "matrix", "machine", "core"},
    "care": {"install", "locking", "matrix", "machine", "core"},
    "install": {"locking", "matrix", "machine", "core"},
    "locking": {"matrix", "machine", "core"},
    "matrix": {"machine", "core"},
    "machine": {"core"},
    "core": set(),
}
TOP = {"__init__", "__main__"}  # the package's face: its version, and `python -m lorastrap`
# `python -m lorastrap install` starts the embedded engine's worker before the CLI's modules are imported: the one
# module the face imports besides the CLI (install/ahead.py, which imports only the light part of core).
FACE_ALSO = {"install.ahead"}


def modules() -> dict[str, ast.Module]:
    """'room.module' (a room's own __init__ as 'room') → its syntax tree; the package's face as 'lorastrap.X'."""
    out = {}
    for p in sorted(PKG.rglob("*.py")):
        rel = p.relative_to(PKG).with_suffix("")
        parts = [x for x in rel.parts if x != "__init__"] or ["__init__"]
        name = ".".join(parts) if len(rel.parts) > 1 else f"lorastrap.{rel.stem}"
        out[name] = ast.parse(p.read_text(), str(p))
    return out


def room_of(module: str) -> str:
    return module.split(".")[0]


def imports(tree: ast.Module) -> tuple[dict[str, str], set[str], list[str]]:
    """(local alias → lorastrap module, lorastrap modules imported anywhere (as 'room.module' or 'room'),
    private names imported)."""
    alias, used, private = {}, set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lorastrap":
            parts = node.module.split(".")[1:]
            if len(parts) == 1 and parts[0] in ALLOWED:  # from lorastrap.ROOM import module, ...
                for a in node.names:
                    target = f"{parts[0]}.{a.name}" if (PKG / parts[0] / f"{a.name}.py").exists() else parts[0]
                    used.add(target)
                    if target != parts[0]:
                        alias[a.asname or a.name] = target
                    elif a.name.startswith("_") and not a.name.startswith("__"):
                        private.append(f"{node.module}.{a.name}")
            elif parts:
                used.add(".".join(parts[:2]))
                private += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")
                            and not a.name.startswith("__")]
            else:
                used.update(a.name for a in node.names if a.name in ALLOWED)
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lorastrap."):
                    used.add(".".join(a.name.split(".")[1:3]))
    return alias, used, private


def test_every_module_lives_in_a_room():
    loose = [p.name for p in PKG.glob("*.py") if p.stem not in TOP]
    assert not loose, f"modules outside the rooms: {loose}"
    rooms = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert rooms == set(ALLOWED)


def test_rooms_import_only_the_rooms_below_them():
    offences = []
    for name, tree in modules().items():
        if name.startswith("lorastrap."):
            allowed = {"cli"} if name == "lorastrap.__main__" else set()
        else:
            allowed = ALLOWED[room_of(name)] | {room_of(name)}
        offences += [f"{name} imports {used}" for used in sorted(imports(tree)[1])
                     if room_of(used) not in allowed and not (name == "lorastrap.__main__" and used in FACE_ALSO)]
    assert not offences


def test_each_room_says_what_it_may_import():
    for room, allowed in ALLOWED.items():
        doc = ast.get_docstring(ast.parse((PKG / room / "__init__.py").read_text())) or ""
        said = re.search(r"May import: ([^.(]*)", doc)
        assert said, f"{room}/__init__.py: the docstring does not say what the room may import"
        names = set() if "nothing" in said.group(1) else {w.strip() for w in said.group(1).split(",")}
        assert names == allowed, f"{room}: docstring says {sorted(names)}, the rule is {sorted(allowed)}"


def test_the_rule_is_a_ladder():
    """Each room may import exactly the rooms of the floors below it: no two rooms import each other, and a room
    added to the table must be placed on a floor."""
    floors = sorted(ALLOWED, key=lambda r: len(ALLOWED[r]))
    for room in floors:
        for other in ALLOWED[room]:
            assert room not in ALLOWED[other]


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
        if name == "core.subproc":
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                offences += [f"{name}: imports {n}" for n in names if n == "subprocess"]
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                dotted = f"{node.value.id}.{node.attr}"
                offences += [f"{name}: calls {dotted}" for s in starters if dotted.startswith(s) and "." in s]
    assert not offences
