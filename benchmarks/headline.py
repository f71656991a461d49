"""Regenerate the headline table in benchmarks/README.md from the committed GPU CSVs in results/.

    python benchmarks/headline.py          # rewrites the block between the HEADLINE markers
"""

import csv
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
BEGIN, END = "<!-- HEADLINE:BEGIN -->", "<!-- HEADLINE:END -->"


def gpu_csvs(directory: pathlib.Path) -> list[pathlib.Path]:
    """The results CSVs of GPUs in `directory` (a `cpu*.csv` only shows that the suite runs)."""
    return [path for path in sorted(directory.glob("*.csv")) if not path.name.startswith("cpu")]


def _rows():
    for path in gpu_csvs(HERE / "results"):
        with path.open(newline="") as handle:
            yield from csv.DictReader(handle)


def headline() -> str:
    rows = list(_rows())
    if not rows:
        return "No GPU results are committed yet, so there is no headline table: no number is estimated."
    lines = ["| device | measurement | sparsedoctor / triton | naive | dense | lora | base |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    index = {}
    for row in rows:
        key = (row["device"], row["op"], row["shape"], row["T"], row["E"], row["mode"])
        index.setdefault(key, {})[row["impl"]] = row
    for (device, op, shape, tokens, experts, mode), impls in sorted(index.items()):
        if op == "step":
            cells = [impls.get(i, {}).get("tokens_per_s", "") for i in ("sparsedoctor", "naive", "dense", "lora",
                                                                         "base")]
            lines.append(f"| {device} | step {shape} T={tokens} (tokens/s) | " + " | ".join(cells) + " |")
        elif op == "lora_moe" and shape == "gate_proj" and tokens == "8192" and experts == "8" and mode == "full":
            cells = [impls.get(i, {}).get("ms_p50", "") for i in ("triton", "naive", "dense", "lora", "base")]
            lines.append(f"| {device} | lora_moe gate_proj T=8192 E=8 fwd+bwd (ms) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    readme = HERE / "README.md"
    text = readme.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    readme.write_text(text[:start] + "\n" + headline() + "\n" + text[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
