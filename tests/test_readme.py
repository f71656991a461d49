"""The README and the docs/ pages say what is true: every ```python block runs on its own (fresh namespace, a
scratch directory), every relative link leads to a file, the data records and config files they show are read
by the library, and the README keeps the shape CI reads. Signatures that are not meant to run are ```py
blocks."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SHARED

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
CMMLU = SHARED / "data" / "cmmlu-med"


def _blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


EXAMPLES = [(page, index, code) for page in PAGES for index, code in enumerate(_blocks(page, "python"))]


def _check_op_example(namespace: dict, tmp_path: Path) -> None:
    assert namespace["queue"].size.sum() == namespace["T"]
    assert namespace["x"].grad is not None and namespace["lora_b"].grad.abs().sum() > 0


def _check_model_example(namespace: dict, tmp_path: Path) -> None:
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()


def _check_trainer_example(namespace: dict, tmp_path: Path) -> None:
    assert any(path.name.startswith("checkpoint-") for path in (tmp_path / "trainer-run").iterdir())


# What an example must leave behind, recognised by a line it contains.
CHECKS = {
    "queue.enqueue(": _check_op_example,
    'save_pretrained("my-adapter")': _check_model_example,
    'output_dir="trainer-run"': _check_trainer_example,
}


def test_the_examples_are_found():
    names = {(page.name, index) for page, index, _ in EXAMPLES}
    assert ("README.md", 0) in names and ("README.md", 1) in names
    for marker in CHECKS:
        assert any(marker in code for _, _, code in EXAMPLES), f"no example contains {marker!r}"
    assert {page.name for page, _, _ in EXAMPLES} >= {"README.md", "training.md", "evaluation.md"}


@pytest.mark.parametrize("page,index,code", EXAMPLES, ids=[f"{p.name}:{i}" for p, i, _ in EXAMPLES])
def test_every_python_example_runs_alone(page, index, code, tmp_path, monkeypatch):
    if '"path/to/cmmlu"' in code:
        if not CMMLU.exists():
            pytest.skip("needs ../shared/data/cmmlu-med")
        code = code.replace('"path/to/cmmlu"', repr(str(CMMLU)))
    assert "path/to" not in code.replace("path/to/Qwen3-4B", ""), f"{page.name} block {index} has a placeholder"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__example__"}
    exec(compile(code, f"{page.name} python block {index}", "exec"), namespace)
    for marker, check in CHECKS.items():
        if marker in code:
            check(namespace, tmp_path)


def test_the_readme_keeps_its_shape():
    """Two commands first (.ci/run runs them), and short: the rest lives in docs/."""
    text = README.read_text(encoding="utf-8")
    first = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1).strip().splitlines()
    assert first == ['pip install torch==2.13.0 && pip install ".[test]" && sparsedoctor demo', "python -m pytest -q"]
    assert text.index("```bash") < text.index("\n## ")
    assert len(text.splitlines()) <= 120


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_relative_links_lead_to_files(page):
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text(encoding="utf-8")):
        if "://" in target:
            continue
        assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_the_readme_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    for page in PAGES[1:]:
        assert f"docs/{page.name}" in text, f"README does not link docs/{page.name}"


def test_the_training_page_records_and_config_are_read(tmp_path):
    from sparsedoctor_kernels.train.data import record_format, to_conversation
    from sparsedoctor_kernels.train.settings import TrainSettings, read_config_file

    page = ROOT / "docs" / "training.md"
    (records,) = _blocks(page, "json")
    for line in records.strip().splitlines():
        record = json.loads(line)
        assert record_format(record) and to_conversation(record)
    (config,) = _blocks(page, "yaml")
    path = tmp_path / "run.yaml"
    path.write_text(config)
    values = read_config_file(path)
    assert values["adapter"]["num_experts"] == 8 and values["learning_rate"] == 2e-4
    assert set(values) <= set(TrainSettings().to_dict())


def test_the_roofline_table_is_the_scripts_output():
    """docs/gpu.md's modelled roofline is what `benchmarks/roofline.py` prints today (a model change must
    regenerate it)."""
    script = ROOT / "benchmarks" / "roofline.py"
    table = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout.strip()
    assert table in (ROOT / "docs" / "gpu.md").read_text(encoding="utf-8")
