"""The package's layering (docs/layout.md), read from its import graph: every `import` and `from ... import` of
the package in every module, those inside functions too (a circle hidden behind a function-level import is still
a circle). Nothing is imported to build the graph."""

import ast
import pathlib

import pytest

PACKAGE = "sparsedoctor_kernels"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Each module belongs to one unit: its folder under the package, or for a module at the package root the unit
# named here. A unit may import the units listed for it, and itself.
ROOT_MODULES = {
    "__init__": "ops",  # the public ops, re-exported
    "_alloc": "core", "_backend": "core", "_validation": "core", "cost": "core", "launches": "core",
    "_C": "core",  # the compiled extension, when built
    "cli": "entry", "__main__": "entry", "hf_trainer": "entry",
}
LIBRARY = {"core", "reference", "eager", "triton", "cuda", "ops"}
MAY_IMPORT = {
    "core": {"core"},
    "reference": {"core"},
    "eager": {"core", "reference"},
    "triton": {"core", "reference"},
    "cuda": {"core", "reference"},
    "ops": {"core", "reference", "eager", "triton", "cuda"},
    "_util": set(),
    "testing": LIBRARY,
    "model": LIBRARY,
    "train": LIBRARY | {"model", "_util"},
    "eval": LIBRARY | {"model", "train", "_util"},
    "experiments": LIBRARY | {"model", "train", "eval", "_util"},
    "bench": LIBRARY | {"model", "testing", "_util"},
    "entry": None,  # the command line and the import-path shims sit on top: anything
}
APPLICATION = {"model", "train", "eval", "experiments", "bench", "testing", "_util", "entry"}


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(ROOT.rglob("*.py"))}


def _unit(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return ROOT_MODULES["__init__"]
    if parts[0] in ROOT_MODULES:
        return ROOT_MODULES[parts[0]]
    return parts[0]


def _resolve(name: str) -> str:
    """The module an imported name is: the longest prefix that is one of the package's modules."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES or candidate == f"{PACKAGE}._C":
            return candidate
    return PACKAGE


def imports_of(module: str) -> set[str]:
    """The package's modules that `module` imports, anywhere in its source."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: `from . import x` is the package itself, each further dot one level up
                parent = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]  # a submodule, or a name in `base`
        else:
            continue
        found.update(_resolve(name) for name in names if name == PACKAGE or name.startswith(PACKAGE + "."))
    found.discard(module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_the_graph_is_read():
    # A reader that found nothing would pass every rule below: pin a few edges that must be there.
    assert "sparsedoctor_kernels.model.wrapper" in GRAPH["sparsedoctor_kernels.model"]
    assert "sparsedoctor_kernels.model.adapter" in GRAPH["sparsedoctor_kernels.model.wrapper"]
    assert "sparsedoctor_kernels.train.settings" in GRAPH["sparsedoctor_kernels.train.run_dir"]
    assert "sparsedoctor_kernels.eager" in GRAPH["sparsedoctor_kernels.ops.lora_moe"]
    assert len(MODULES) > 60


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    cycle = _cycle(GRAPH)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down_the_layers(module):
    unit = _unit(module)
    assert unit in MAY_IMPORT, f"{module} is in no unit of the layering (add its folder to docs/layout.md)"
    allowed = MAY_IMPORT[unit]
    if allowed is None:
        return
    wrong = sorted(target for target in GRAPH[module] if _unit(target) not in allowed | {unit})
    assert not wrong, f"{module} ({unit}) imports {wrong}, above or beside it"


def test_the_kernel_library_imports_no_application():
    library = [m for m in MODULES if _unit(m) in LIBRARY]
    assert len(library) > 20
    for module in library:
        assert not {_unit(t) for t in GRAPH[module]} & APPLICATION, module


def test_few_modules_at_the_package_root():
    loose = sorted(p.name for p in ROOT.glob("*.py"))
    assert len(loose) <= 10, loose


def test_the_public_import_paths_still_work():
    """The paths users import from (the README, docs/ and earlier releases) survive the layout."""
    import importlib

    for path in ("sparsedoctor_kernels", "sparsedoctor_kernels.model", "sparsedoctor_kernels.model.tiny",
                 "sparsedoctor_kernels.eval", "sparsedoctor_kernels.cli", "sparsedoctor_kernels.triton.compile_check",
                 "sparsedoctor_kernels.hf_trainer", "sparsedoctor_kernels.train"):
        importlib.import_module(path)
    from sparsedoctor_kernels import hf_trainer, model, train
    from sparsedoctor_kernels.model.trainer import SparseDoctorTrainer
    from sparsedoctor_kernels.train.loop import train as train_function
    from sparsedoctor_kernels.train.settings import TrainError, TrainSettings

    assert hf_trainer.SparseDoctorTrainer is model.SparseDoctorTrainer is SparseDoctorTrainer
    assert train.train is train_function and train.TrainSettings is TrainSettings and train.TrainError is TrainError
    with pytest.raises(AttributeError):
        train.no_such_name  # noqa: B018


def test_train_error_has_one_home():
    """TrainError is defined once and re-exported by no module of train/ but the package's lazy names."""
    defining = [m for m, path in MODULES.items() if "class TrainError" in path.read_text(encoding="utf-8")]
    assert defining == ["sparsedoctor_kernels.train.settings"]


def test_the_hybrid_loss_is_written_once():
    """The model's output and SparseDoctorTrainer both take the loss from model/loss.py."""
    writing = sorted(m for m, path in MODULES.items() if "contrastive_coef * contrastive" in
                     "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                               if not line.lstrip().startswith(("#", '"""')) and "`" not in line))
    assert writing == ["sparsedoctor_kernels.model.loss"]
    assert "sparsedoctor_kernels.model.loss" in GRAPH["sparsedoctor_kernels.model.wrapper"]
    assert "sparsedoctor_kernels.model.loss" in GRAPH["sparsedoctor_kernels.model.trainer"]
