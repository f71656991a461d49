"""The README's op example runs as written."""

import re
from pathlib import Path

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
