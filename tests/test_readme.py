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
