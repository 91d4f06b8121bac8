"""The package's import structure: dependencies point ``trainer -> sae_kernels -> csrc_triton``, no module
imports back up that order, and there is no import circle anywhere, counting the imports inside functions
(which would otherwise hide a circle until the function runs) and the package ``__init__`` every import of
a submodule runs first. Private names (``_x``) are imported only within their own package."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYERS = ("csrc_triton", "sae_kernels", "trainer")  # each may import only those before it (and itself)


def _modules():
    out = {}
    for root in LAYERS:
        for f in sorted((REPO / root).rglob("*.py")):
            parts = f.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return out


def _imports(mods):
    """``{module: {(target module, imported name or None, line)}}`` for every import of the three packages."""
    out = {}
    for name, f in mods.items():
        pkg = name if f.name == "__init__.py" else name.rpartition(".")[0]
        found = out.setdefault(name, set())
        for n in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(n, ast.ImportFrom):
                if n.level:
                    base = pkg.split(".")
                    base = base[: len(base) - (n.level - 1)]
                    target = ".".join(base + ([n.module] if n.module else []))
                else:
                    target = n.module
                if target.split(".")[0] in LAYERS:
                    for a in n.names:
                        sub = f"{target}.{a.name}"
                        found.add((sub, None, n.lineno) if sub in mods else (target, a.name, n.lineno))
            elif isinstance(n, ast.Import):
                found |= {(a.name, None, n.lineno) for a in n.names if a.name.split(".")[0] in LAYERS}
    return out


def _graph(mods, imports):
    """Edges, with the packages whose ``__init__`` an import runs first (not the importer's own ancestors)."""
    g = {m: set() for m in mods}
    for m, found in imports.items():
        mine = {m.rsplit(".", i)[0] for i in range(m.count(".") + 1)}
        for target, _, _ in found:
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                t = ".".join(parts[:i])
                if t in mods and t not in mine:
                    g[m].add(t)
    return g


def test_dependencies_point_one_way():
    mods = _modules()
    wrong = []
    for m, found in _imports(mods).items():
        allowed = LAYERS[: LAYERS.index(m.split(".")[0]) + 1]
        wrong += [f"{mods[m].relative_to(REPO)}:{line} imports {t}" for t, _, line in found
                  if t.split(".")[0] not in allowed]
    assert not wrong, "imports against trainer -> sae_kernels -> csrc_triton:\n" + "\n".join(wrong)


def test_no_import_circle():
    mods = _modules()
    g = _graph(mods, _imports(mods))
    # Tarjan's strongly connected components: a component of more than one module is a circle
    index, low, stack, on, comps, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
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
            comps.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    circles = [c for c in comps if len(c) > 1 or c[0] in g[c[0]]]
    assert not circles, f"import circles: {circles}"


def test_private_names_stay_in_their_package():
    mods = _modules()
    crossing = []
    for m, found in _imports(mods).items():
        pkg = m if mods[m].name == "__init__.py" else m.rpartition(".")[0]
        for target, name, line in found:
            if name and name.startswith("_") and not name.startswith("__"):
                home = target if target in mods and mods[target].name == "__init__.py" else target.rpartition(".")[0]
                # the raw kernels of csrc_triton (named _..._kernel, as Triton's own code names them) are
                # what sae_kernels.triton_ops launches: its launchers are their one client
                if home != pkg and not (m == "sae_kernels.triton_ops" and target.startswith("csrc_triton.")):
                    crossing.append(f"{mods[m].relative_to(REPO)}:{line} imports {target}.{name}")
    assert not crossing, "private names used outside their package:\n" + "\n".join(crossing)


def test_the_check_sees_a_circle_and_a_wrong_direction(tmp_path):
    """The checks above on a made-up package: a circle through a function-level import, and an import of
    trainer from sae_kernels, are found (a check that could not fail would prove nothing)."""
    a = tmp_path / "sae_kernels"
    a.mkdir()
    (a / "__init__.py").write_text("")
    (a / "x.py").write_text("from . import y\n")
    (a / "y.py").write_text("def f():\n    from .x import g\n    from trainer import run\n")
    mods = {"sae_kernels": a / "__init__.py", "sae_kernels.x": a / "x.py", "sae_kernels.y": a / "y.py",
            "trainer": a / "__init__.py", "trainer.run": a / "__init__.py"}
    imports = _imports(mods)
    g = _graph(mods, imports)
    assert "sae_kernels.y" in g["sae_kernels.x"] and "sae_kernels.x" in g["sae_kernels.y"]
    assert any(t == "trainer.run" for t, _, _ in imports["sae_kernels.y"])
