"""Land what a GPU session brought back: the results CSV, its raw logs beside it, the headline regenerated.

    python benchmarks/land_gpu_session.py <folder>    # the folder the device tool put $OUT's files in

`gpu_session.py` leaves `summary.md`, `logs.tar.gz` and `<device>.csv` in $OUT. The CSV was written on the
device over the committed one (its rows replace their own and keep the rest), so it replaces
`benchmarks/results/<device>.csv`; the logs go to `benchmarks/results/<device>-logs/` with the summary; then
`headline.py` rewrites the headline block of benchmarks/README.md from the CSVs. Review and commit the result.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import shutil
import sys
import tarfile

BENCHMARKS = pathlib.Path(__file__).resolve().parent


def _safe_members(bundle: tarfile.TarFile) -> list[tarfile.TarInfo]:
    """Plain files with relative paths that stay inside the folder they are extracted to; not the bundle's copies
    of the CSVs and the summary, which are landed from the folder itself."""
    members = []
    for member in bundle.getmembers():
        parts = pathlib.PurePosixPath(member.name).parts
        inside = member.isfile() and parts and not member.name.startswith("/") and ".." not in parts
        if inside and parts[0] != "results" and member.name != "summary.md":
            members.append(member)
    return members


def land(folder: pathlib.Path, benchmarks: pathlib.Path = BENCHMARKS) -> list[pathlib.Path]:
    """Copy the session's files into `benchmarks`/results and regenerate its README's headline; the paths written."""
    spec = importlib.util.spec_from_file_location("headline", BENCHMARKS / "headline.py")
    headline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(headline)
    csvs = headline.gpu_csvs(folder)
    if not csvs:
        raise SystemExit(f"no GPU results CSV in {folder}: the session measured nothing (see its summary.md)")
    results = benchmarks / "results"
    results.mkdir(parents=True, exist_ok=True)
    written = []
    for path in csvs:
        target = results / path.name
        shutil.copyfile(path, target)
        written.append(target)
        logs = results / f"{path.stem}-logs"
        if logs.exists():
            shutil.rmtree(logs)  # the logs of the session that wrote these rows, not of an earlier one
        logs.mkdir()
        bundle_path = folder / "logs.tar.gz"
        if bundle_path.is_file():
            with tarfile.open(bundle_path) as bundle:
                for member in _safe_members(bundle):
                    destination = logs / member.name
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    destination.write_bytes(bundle.extractfile(member).read())
                    written.append(destination)
        if (folder / "summary.md").is_file():
            shutil.copyfile(folder / "summary.md", logs / "summary.md")
            written.append(logs / "summary.md")
    headline.HERE = benchmarks
    headline.main()
    written.append(benchmarks / "README.md")
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=pathlib.Path, help="where the device tool put the session's files")
    parser.add_argument("--benchmarks", type=pathlib.Path, default=BENCHMARKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for path in land(args.folder, args.benchmarks):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
