"""The house rules, checked: the trainer holds TRL's seams only, the jobs behind them never reach back into it, and
the import graph has no cycle."""

import ast
import inspect
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "trl_dpo_plus"


def modules():
    return {".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def imports(path: Path, name: str) -> set[str]:
    """The package modules `path` imports (at any depth of the file, lazy imports included)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("trl_dpo_plus"):
                found.add(target)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("trl_dpo_plus"))
    return found


@pytest.mark.parametrize("folder", ["layout", "diagnostics", "data_kinds", "compare", "iterate", "losses"])
def test_the_jobs_never_reach_back_into_the_trainer(folder):
    """No module under these folders reads a trainer attribute: none names a `trainer`, none imports the trainer at
    module level (compare and iterate build trainers to train their runs, inside their functions)."""
    for name, path in modules().items():
        if not name.startswith(f"trl_dpo_plus.{folder}"):
            continue
        source = path.read_text()
        top_level = {n.module for n in ast.parse(source).body if isinstance(n, ast.ImportFrom) and n.module}
        assert not any(m.endswith("trainer") for m in top_level), name
        if folder not in ("compare", "iterate"):
            assert not re.search(r"(?<![.\w])trainer\.\w", source), f"{name} reads a trainer attribute"


def test_the_import_graph_has_no_cycle():
    graph = {name: {t for t in imports(path, name) if t in modules()} - {name} for name, path in modules().items()}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for target in graph[node]:
            if state.get(target) == "open":
                # a package's __init__ re-exporting its own modules is not a cycle
                if not target.startswith(node + ".") and not node.startswith(target + "."):
                    raise AssertionError(" -> ".join([*stack, node, target]))
            elif target not in state:
                visit(target, [*stack, node])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_trainer_has_no_data_kind_branch_and_names_every_seam():
    from trl.trainer.dpo_trainer import DPOTrainer

    from trl_dpo_plus import trainer

    source = inspect.getsource(trainer)
    assert "data_kind ==" not in source and "kind.name ==" not in source
    assert len(source.splitlines()) <= 360  # seams only: the jobs behind them live in their own files
    overridden = [name for name, member in vars(trainer.DPOPlusTrainer).items()
                  if callable(member) and hasattr(DPOTrainer, name) and not name.startswith("__")]
    assert {"_compute_loss", "_prepare_dataset", "_precompute_ref_logps", "compute_ref_log_probs", "log"} <= set(overridden)
    for name in overridden:
        assert f"`{name}`" in trainer.__doc__, f"trainer.py's docstring does not name the seam {name}"
