"""Package boundaries: the library (src/hiermem) never imports the experiments (src/hiermem_experiments).

Only two functions of hiermem/cli.py may, lazily: `cmd_demo` and `cmd_corpus` (the `hiermem demo` and
`hiermem corpus` entry points), as Meta Lingua's apps/ are built on lingua/ and not the other way round.
"""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ALLOWED = {("hiermem/cli.py", "cmd_demo"), ("hiermem/cli.py", "cmd_corpus")}


def _imported_modules(root: ast.AST) -> list[str]:
    mods = []
    for node in ast.walk(root):
        if isinstance(node, ast.Import):
            mods += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods.append(node.module)
    return mods


def _experiment_imports(path: Path) -> set[tuple[str | None, str]]:
    """(top-level function name, or None for anything else, module) per import of hiermem_experiments."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = set()
    for stmt in tree.body:
        scope = stmt.name if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) else None
        found |= {(scope, m) for m in _imported_modules(stmt) if m.split(".")[0] == "hiermem_experiments"}
    return found


def test_the_library_never_imports_the_experiments():
    files = sorted((SRC / "hiermem").rglob("*.py"))
    assert len(files) > 20
    offending = [f"{path.relative_to(SRC).as_posix()}:{scope or '<module>'} imports {mod}"
                 for path in files for scope, mod in _experiment_imports(path)
                 if (path.relative_to(SRC).as_posix(), scope) not in ALLOWED]
    assert not offending, offending
    # the two entry points do load it, inside the functions
    assert {scope for scope, _ in _experiment_imports(SRC / "hiermem" / "cli.py")} == {"cmd_demo", "cmd_corpus"}


def test_the_checker_sees_every_kind_of_import(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import hiermem_experiments\nif True:\n    from hiermem_experiments.longtail import demo\n"
                    "def f():\n    import hiermem_experiments.longtail.corpus as c\n"
                    "class C:\n    def g(self):\n        from hiermem_experiments import longtail\n"
                    "from hiermem import errors\n")
    assert _experiment_imports(path) == {(None, "hiermem_experiments"), (None, "hiermem_experiments.longtail"),
                                         ("f", "hiermem_experiments.longtail.corpus")}


# Inside the library, imports go one way down these layers (a module may import its own layer or lower ones).
LAYERS = [{"errors", "io_utils", "integrity", "locking"}, {"config", "device"}, {"model"}, {"memory", "data"},
          {"routing"}, {"train"}, {"eval", "verify"}, {"hf"}, {"serve"}, {"bench"}, {"cli", "__main__"}]


def _layer(module: str) -> int:
    name = module.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if name in layer)


def test_library_imports_go_one_way_down_the_layers():
    wrong = []
    for path in (SRC / "hiermem").rglob("*.py"):
        rel = path.relative_to(SRC).with_suffix("")
        module = ".".join(rel.parts).removesuffix(".__init__")
        if module == "hiermem":
            continue
        own = _layer(module)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "hiermem":
                names = [f"hiermem.{a.name}" for a in node.names]  # from hiermem import config
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for imported in names:
                if imported.split(".")[0] == "hiermem" and _layer(imported) > own:
                    wrong.append(f"{module} imports {imported}")
    assert wrong == []
    assert _layer("hiermem.model.transformer") < _layer("hiermem.memory.bank")  # memory builds on model
