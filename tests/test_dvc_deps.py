"""dvc.yaml's deps follow the code: every stage names each unlearnops module it can run, and no other.

A stage's code is read statically (tests/import_graph.py): its script in stages/, the pipeline
functions that script runs (unlearnops.stages.STAGES), and every module they import, module-level or
inside a function, transitively. unlearnops.pipeline counts by function (each stage runs a few of
its functions); every other module counts whole. An unlearning stage adds its method's module (and
what it imports); a composite method (one whose params name a registered `base`) adds its base's
module and `methods.<base>` params; a condensed run (`--condense NAME`) adds unlearnops/condense.py
and `condense.NAME` params. Missing deps serve stale results; extra ones rerun stages for nothing.

`python -m pytest tests/test_dvc_deps.py` is the check; `python tests/test_dvc_deps.py` prints each
stage's expected code deps.
"""
from __future__ import annotations

import ast
import copy
import shlex
import sys
from functools import cache
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from import_graph import PACKAGE, ROOT, ROOT_INIT, closure, imports_of, module_file, relpath  # noqa: E402

GRANULAR = frozenset({"unlearnops.pipeline"})  # dispatch module: a stage depends on the functions it runs, not all of them
# Imported only on one command-line option's path (pipeline.unlearn and pipeline.run_name import it
# under `if condense is not None`): a dep of the stages whose cmd has that option only.
OPTIONAL = {"unlearnops.condense": "--condense"}
METHODS_DIR = f"{PACKAGE}/methods"


@cache
def stage_table() -> dict[str, tuple[str, ...]]:
    """unlearnops.stages.STAGES, read without importing it."""
    tree = ast.parse((ROOT / PACKAGE / "stages.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "STAGES" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("unlearnops/stages.py has no STAGES table")


@cache
def method_modules() -> dict[str, str]:
    """Registered method name -> its module, from the `@register("name")` decorators in unlearnops/methods/."""
    found = {}
    for path in sorted((ROOT / METHODS_DIR).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                for deco in node.decorator_list:
                    if isinstance(deco, ast.Call) and getattr(deco.func, "id", None) == "register":
                        found[deco.args[0].value] = f"{PACKAGE}.methods.{path.stem}"
    return found


def _files(modules: set[str]) -> set[str]:
    return {relpath(m) for m in modules} - {ROOT_INIT}


def script_stage(script: Path) -> str:
    """The name passed to run_stage in a stages/ script."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "run_stage":
            return node.args[0].value
    raise AssertionError(f"{script} calls no run_stage")


def base_methods(method: str, params: dict) -> list[str]:
    """`method` and the registered methods it runs (methods.<name>.base, transitively)."""
    chain = [method]
    while isinstance(base := (params.get("methods", {}).get(chain[-1]) or {}).get("base"), str) and base in method_modules():
        if base in chain:
            break
        chain.append(base)
    return chain


def expected(cmd: str, params: dict) -> tuple[set[str], set[str]]:
    """The code files and the params keys a stage's cmd needs."""
    words = shlex.split(cmd)
    assert words[0] == "python" and words[1].startswith("stages/"), f"unexpected cmd {cmd!r}"
    script = ROOT / words[1]
    name = script_stage(script)
    options = {w for w in words if w.startswith("--")}
    skip = {m for m, flag in OPTIONAL.items() if flag not in options}
    modules = closure(imports_of(script).all, {"unlearnops.pipeline": set(stage_table()[name])}, GRANULAR, skip)
    files, keys = {words[1]} | _files(modules), set()
    if name == "unlearn":
        for method in base_methods(words[2], params):
            files |= _files(closure([method_modules()[method]]))
            keys.add(f"methods.{method}")
        if "--condense" in options:
            condenser = words[words.index("--condense") + 1]
            files |= _files(closure(["unlearnops.condense"]))
            keys.add(f"condense.{condenser}")
    if name == "ulira":  # unlearns with every method of the grid (unlearnops.layout.run_names), condensed runs too
        files |= _files(closure([*method_modules().values(), "unlearnops.condense"]))
        keys |= {"methods", "condense"}
    return files, keys


def _covers(dep: str, file: str) -> bool:
    return file == dep or file.startswith(dep.rstrip("/") + "/")


def _param_covered(key: str, params_deps: list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in params_deps)


def resolved_stages(dvc_yaml: dict | None = None) -> dict[str, dict]:
    """dvc.yaml's stages with foreach/matrix expanded by DVC's own resolver (against params.yaml)."""
    from dvc.parsing import DataResolver
    from dvc.repo import Repo

    dvc_yaml = dvc_yaml if dvc_yaml is not None else yaml.safe_load((ROOT / "dvc.yaml").read_text())
    with Repo(str(ROOT), config={"core": {"no_scm": True}}) as repo:  # no git needed (a copy of the tree will do)
        resolved = DataResolver(repo, str(ROOT), dvc_yaml).resolve()
    return resolved["stages"]


def _dep_paths(stage: dict) -> list[str]:
    return [next(iter(d)) if isinstance(d, dict) else d for d in stage.get("deps", [])]


def _param_keys(stage: dict) -> list[str]:
    keys = []
    for entry in stage.get("params", []):
        if isinstance(entry, dict):  # {file: [keys]}
            keys += [k for ks in entry.values() for k in (ks or [])]
        else:
            keys.append(entry)
    return keys


def problems(stages: dict[str, dict], params: dict) -> list[str]:
    """One line per missing or extra code dep and missing params dep."""
    found = []
    for name, stage in stages.items():
        files, keys = expected(stage["cmd"], params)
        deps = _dep_paths(stage)
        for file in sorted(files):
            if not any(_covers(d, file) for d in deps):
                found.append(f"{name}: deps miss {file}")
        for key in sorted(keys):
            if not _param_covered(key, _param_keys(stage)):
                found.append(f"{name}: params miss {key}")
        unlearning = shlex.split(stage["cmd"])[1] == "stages/unlearn.py"
        for dep in deps:
            if not (dep.startswith(f"{PACKAGE}/") or dep.startswith("stages/")):
                continue
            under = {f for f in _code_files() if _covers(dep, f)}
            if not under:
                found.append(f"{name}: deps name {dep}, which is no code file")
            elif extra := sorted(under - files - (_helpers() if unlearning else set())):
                found.append(f"{name}: deps name {dep}, which covers code the stage does not run: {', '.join(extra)}")
    return found


@cache
def _code_files() -> frozenset[str]:
    return frozenset(p.relative_to(ROOT).as_posix() for d in (PACKAGE, "stages") for p in (ROOT / d).rglob("*.py"))


@cache
def _helpers() -> frozenset[str]:
    """Modules of unlearnops/methods/ that some methods share: those that are no method (passes.py,
    weight_surgery.py, ...) and a method's module that another method imports (salun imports
    random_label's passes). A DVC matrix cannot give each method its own list, so every unlearning
    stage may name them; editing one reruns every method."""
    methods = {relpath(m) for m in method_modules().values()}
    imported = set()
    for module in method_modules().values():
        imported |= {relpath(m) for m in imports_of(module_file(module)).all if m != module}
    return frozenset(f for f in _code_files() if f.startswith(METHODS_DIR + "/") and (f not in methods or f in imported))


@pytest.fixture(scope="module")
def params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())


@pytest.fixture(scope="module")
def stages(raw) -> dict[str, dict]:
    return resolved_stages(raw)


def test_every_stage_depends_on_the_code_it_runs_and_no_other(stages, params):
    assert problems(stages, params) == []


def test_unlearning_stages_depend_on_their_own_method_only(stages, params):
    """Editing one method's file reruns that method's stages and those of the methods built on it."""
    methods = method_modules()
    for name, stage in stages.items():
        words = shlex.split(stage["cmd"])
        if words[1] != "stages/unlearn.py":
            continue
        own = {relpath(methods[m]) for m in base_methods(words[2], params)} - _helpers()
        named = {d for d in _dep_paths(stage) if d in {relpath(m) for m in methods.values()} - _helpers()}
        assert named == own, f"{name}: method files {sorted(named)}, expected {sorted(own)}"
        assert f"{METHODS_DIR}" not in _dep_paths(stage), f"{name} depends on the whole methods folder"


def test_layered_depends_on_its_base_method(stages, params):
    base = params["methods"]["layered"]["base"]
    layered = [s for s in stages.values() if shlex.split(s["cmd"])[1:3] == ["stages/unlearn.py", "layered"]]
    assert layered, "no stage runs layered"
    for stage in layered:
        assert f"{METHODS_DIR}/{base}.py" in _dep_paths(stage)
        assert _param_covered(f"methods.{base}", _param_keys(stage))


def test_only_condensed_runs_depend_on_condense(stages):
    for name, stage in stages.items():
        condensed = "--condense" in stage["cmd"] or shlex.split(stage["cmd"])[1] == "stages/ulira.py"  # U-LiRA runs the condensed runs too
        assert (f"{PACKAGE}/condense.py" in _dep_paths(stage)) == condensed, name


@pytest.mark.parametrize("stage, dep", [
    ("split", f"{PACKAGE}/pipeline.py"),
    ("retrain", f"{PACKAGE}/evaluation.py"),
    ("report", f"{PACKAGE}/report"),
    ("unlearn", f"{PACKAGE}/methods/${{item.method}}.py"),
    ("unlearn_layered", f"{PACKAGE}/methods/${{methods.layered.base}}.py"),
    ("unlearn_blend", f"{PACKAGE}/condense.py"),
])
def test_the_check_fails_when_a_dep_is_removed(raw, params, stage, dep):
    """The check itself: drop one dep from dvc.yaml (as written, before templating) and it names the stage and the file."""
    broken = copy.deepcopy(raw)
    definition = broken["stages"][stage]
    body = definition.get("do", definition)
    assert dep in body["deps"], f"{stage} does not list {dep}"
    body["deps"].remove(dep)
    found = problems(resolved_stages(broken), params)
    assert found, f"removing {dep} from {stage} went unnoticed"
    assert all(line.startswith(stage) and "deps miss" in line for line in found), found


def test_the_check_fails_on_a_dep_the_stage_does_not_run(stages, params):
    broken = copy.deepcopy(stages)
    name = next(n for n in broken if n.startswith("split"))
    broken[name]["deps"].append(f"{PACKAGE}/report/__init__.py")
    assert problems(broken, params) == [f"{name}: deps name {PACKAGE}/report/__init__.py, which covers code the stage does not run: "
                                        f"{PACKAGE}/report/__init__.py"]


def test_the_check_fails_when_a_base_method_params_dep_is_removed(stages, params):
    broken = copy.deepcopy(stages)
    base = params["methods"]["layered"]["base"]
    name = next(n for n, s in broken.items() if shlex.split(s["cmd"])[1:3] == ["stages/unlearn.py", "layered"])
    broken[name]["params"] = [k for k in _param_keys(broken[name]) if k != f"methods.{base}"]
    assert problems(broken, params) == [f"{name}: params miss methods.{base}"]


def test_the_package_root_is_empty():
    """unlearnops/__init__.py is in no stage's deps: it must hold no code."""
    tree = ast.parse((ROOT / ROOT_INIT).read_text())
    assert all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in tree.body)


if __name__ == "__main__":
    _params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for _name, _stage in resolved_stages().items():
        _files_, _keys = expected(_stage["cmd"], _params)
        print(f"{_name}:\n  " + "\n  ".join(sorted(_files_)) + ("\n  params: " + ", ".join(sorted(_keys)) if _keys else ""))
