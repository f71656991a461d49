"""The README's Python examples run as written."""

import os
import re
from pathlib import Path

import pytest

from conftest import SHARED

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_runs():
    blocks = [b for b in re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
              if "import sparsedoctor_kernels as sdk" in b]
    assert blocks, "README has no runnable op example"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["queue"].size.sum() == namespace["T"]
    assert namespace["x"].grad is not None and namespace["lora_b"].grad.abs().sum() > 0


def test_readme_roofline_table_is_the_scripts_output():
    """The README's modelled roofline is what `benchmarks/roofline.py` prints today (a model change must
    regenerate it)."""
    import subprocess
    import sys

    script = README.parent / "benchmarks" / "roofline.py"
    table = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True).stdout.strip()
    assert table in README.read_text()


def test_every_readme_python_example_runs(tmp_path, monkeypatch):
    """Each block in order, in one namespace (later blocks use earlier names), in a scratch directory; the one
    placeholder path, the CMMLU data, is the shared copy."""
    cmmlu = SHARED / "data" / "cmmlu-med"
    if not cmmlu.exists():
        pytest.skip("needs ../shared/data/cmmlu-med")
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for index, block in enumerate(blocks):
        code = block.replace('"path/to/cmmlu"', repr(str(cmmlu)))
        assert "path/to" not in code.replace("path/to/Qwen3-4B", ""), f"block {index} has a placeholder path"
        exec(compile(code, f"README.md python block {index}", "exec"), namespace)
    assert (tmp_path / "my-adapter" / "adapter_config.json").exists()
    assert any(name.startswith("checkpoint-") for name in os.listdir(tmp_path / "trainer-run"))
