"""The unlearnops import graph, read statically with `ast` (nothing is imported).

A module's imports are split into module-level ones (run on import) and function-local ones (run
when the function is called). Importing `unlearnops.a.b` also runs the packages above it, so those
count as imports too; `from unlearnops.a import b` is the module `unlearnops.a.b` when it is one,
else a name of the package `unlearnops.a` (its __init__). Only unlearnops modules are kept.

Used by test_dvc_deps.py (what each DVC stage runs) and test_import_graph.py (layering, cycles).
"""
from __future__ import annotations

import ast
import functools
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "unlearnops"
ROOT_INIT = f"{PACKAGE}/__init__.py"  # empty by design (test_import_graph checks it stays so)


def module_file(module: str) -> Path | None:
    """`unlearnops.a.b` -> unlearnops/a/b.py or unlearnops/a/b/__init__.py (absolute), None if neither exists."""
    base = ROOT.joinpath(*module.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def relpath(module: str) -> str:
    """The module's file relative to the repository root, as dvc.yaml names it."""
    return module_file(module).relative_to(ROOT).as_posix()


def module_of(path: Path) -> str:
    """unlearnops/a/b.py -> unlearnops.a.b; unlearnops/a/__init__.py -> unlearnops.a."""
    parts = list(path.resolve().relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> list[str]:
    return sorted(module_of(p) for p in (ROOT / PACKAGE).rglob("*.py"))


def _with_parents(module: str) -> set[str]:
    """The module and the packages whose __init__ importing it runs."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def _targets(node: ast.Import | ast.ImportFrom, current: str, is_package: bool) -> set[str]:
    """The unlearnops modules one import statement runs."""
    found: set[str] = set()
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the current package, `level` - 1 packages up
            package = current.split(".") if is_package else current.split(".")[:-1]
            package = package[: len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = []
        for alias in node.names:
            sub = f"{base}.{alias.name}"
            names.append(sub if module_file(sub) is not None else base)
    for name in names:
        if name == PACKAGE or name.startswith(PACKAGE + "."):
            while module_file(name) is None and "." in name:  # `import unlearnops.a.attr` is not a thing, but be safe
                name = name.rsplit(".", 1)[0]
            found |= _with_parents(name)
    return found


@dataclass
class ModuleImports:
    module: str
    top: set[str] = field(default_factory=set)  # module-level imports (class bodies, try/if blocks included)
    local: dict[str, set[str]] = field(default_factory=dict)  # top-level function or class -> imports inside its functions
    refers: dict[str, set[str]] = field(default_factory=dict)  # top-level function -> the module's top-level functions it names

    @property
    def all(self) -> set[str]:
        return self.top.union(*self.local.values())


class _Visitor(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, top_functions: set[str]):
        self.info = ModuleImports(module)
        self.is_package = is_package
        self.top_functions = top_functions
        self.owner: str | None = None  # the top-level definition being visited
        self.depth = 0  # function nesting
        self.shadowed: set[str] = set()

    def _def(self, node):
        outer = self.owner
        if outer is None:
            self.owner = node.name
            if not isinstance(node, ast.ClassDef):  # a parameter named like a function of the module is not a call of it
                self.shadowed = {a.arg for a in (*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs)}
            self.info.local.setdefault(node.name, set())
            self.info.refers.setdefault(node.name, set())
        is_function = not isinstance(node, ast.ClassDef)
        self.depth += is_function
        self.generic_visit(node)
        self.depth -= is_function
        self.owner = outer

    visit_FunctionDef = visit_AsyncFunctionDef = visit_ClassDef = _def

    def _import(self, node):
        targets = _targets(node, self.info.module, self.is_package)
        (self.info.local[self.owner] if self.depth else self.info.top).update(targets)

    visit_Import = visit_ImportFrom = _import

    def visit_Name(self, node):
        if self.owner is not None and node.id in self.top_functions and node.id not in self.shadowed:
            self.info.refers[self.owner].add(node.id)


@functools.cache
def imports_of(path: Path, module: str | None = None) -> ModuleImports:
    """The imports of one file (a module of the package, or a script such as stages/unlearn.py)."""
    path = Path(path).resolve()
    module = module or (module_of(path) if path.is_relative_to(ROOT / PACKAGE) else path.stem)
    tree = ast.parse(path.read_text(), filename=str(path))
    top_functions = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    visitor = _Visitor(module, path.name == "__init__.py", top_functions)
    visitor.visit(tree)
    return visitor.info


def module_imports(module: str) -> ModuleImports:
    return imports_of(module_file(module), module)


def closure(modules, functions: dict[str, set[str]] | None = None, granular=frozenset(), skip=frozenset()) -> set[str]:
    """Every unlearnops module that importing `modules` and calling their functions can run:
    module-level and function-local imports, transitively.

    A module in `granular` counts by function instead: its module-level imports, plus the imports
    inside the functions `functions[module]` names and inside the module's functions those name
    (a dispatch module such as unlearnops.pipeline, whose functions serve different stages).
    Modules in `skip` are left out, and so is what only they import."""
    functions = functions or {}
    seen: set[str] = set()
    todo = [*modules, *functions]
    while todo:
        module = todo.pop()
        if module in seen or module in skip:
            continue
        seen.add(module)
        info = module_imports(module)
        if module not in granular:
            todo.extend(info.all)
            continue
        todo.extend(info.top)
        reached, names = set(), list(functions.get(module, ()))
        while names:
            name = names.pop()
            if name not in reached:
                reached.add(name)
                names.extend(info.refers.get(name, ()))
                todo.extend(info.local.get(name, ()))
    return seen


def module_graph() -> dict[str, set[str]]:
    """module -> the unlearnops modules it imports at module level (its own package's __init__ aside)."""
    return {m: module_imports(m).top - {m} for m in all_modules()}
