"""The docs build strictly, their loss table comes from the registry, and every Python snippet in them runs."""

import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

from trl_dpo_plus import list_losses

ROOT = Path(__file__).resolve().parents[1]
PAGES = sorted((ROOT / "docs").glob("*.md"))
SNIPPET = re.compile(r"```python\n(.*?)```", re.S)


def test_docs_build_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    losses_page = (tmp_path / "site" / "losses" / "index.html").read_text()
    for name in list_losses():
        assert f"<code>{name}</code>" in losses_page, name
    index = (tmp_path / "site" / "index.html").read_text()
    assert f"<strong>{len(list_losses())} losses</strong>" in index  # the count, from the registry too


def test_the_readme_counts_the_registry():
    """The README is not built by mkdocs (PyPI shows it), so its count is checked against the registry instead."""
    count = re.search(r"A registry of (\d+) preference losses", (ROOT / "README.md").read_text())
    assert count and int(count.group(1)) == len(list_losses())


@pytest.mark.parametrize("page", [p for p in PAGES if SNIPPET.search(p.read_text())], ids=lambda p: p.name)
def test_doc_snippets_run(page, tmp_path, monkeypatch, clean_registry):
    monkeypatch.chdir(tmp_path)
    namespace = {}
    for snippet in SNIPPET.findall(page.read_text()):
        exec(compile(snippet, f"{page.name}", "exec"), namespace)  # noqa: S102


@pytest.mark.slow
def test_custom_loss_example_trains(tmp_path, monkeypatch, clean_registry):
    monkeypatch.chdir(tmp_path)
    trainer = runpy.run_path(str(ROOT / "examples" / "custom_loss.py"))["main"]()
    logs = [h for h in trainer.state.log_history if "rewards/margins" in h]
    assert logs[-1]["rewards/margins"] > logs[0]["rewards/margins"]
    assert trainer.loss_kwargs == [{"beta": 0.1, "margin": 1.0}]
