"""Write docs/benchmarks.md from the benchmark records in docs/results/*.json.

    python -m tools.benchmarks_doc            # regenerate docs/benchmarks.md
    python -m tools.benchmarks_doc --check    # exit 1 if docs/benchmarks.md is not what the records give

Run from the repository root. Standard library only.

A record is one measured table, one JSON object per file, named
`docs/results/<YYYY-MM-DD>_<topic>.json` (the file name, without `.json`, is the record's
anchor in the page: `docs/benchmarks.md#2026-11-25_recon_methods`). Exactly these keys:

    {
      "title":   "Reconstruction methods against onnxruntime",
      "date":    "2026-11-25",
      "tool":    "tools/bench_recon.py",
      "command": "python tools/bench_recon.py",
      "machine": "2-core CPU, torch 2.13.0 (CPU build), onnxruntime 1.32.0",
      "columns": ["model", "bits", "float", "qdrop"],
      "rows":    [["zoo_resnet", "W4A4", "90.25", "89.30"]],
      "notes":   "Fast preset: 500 iterations per block ..."
    }

- title (str): the section heading.
- date (str, YYYY-MM-DD): the day it was measured.
- tool (str): the script that measured it, `tools/xxx.py` (or `onnxqlimit` for runs of
  the command line itself).
- command (str): the command line that produced the table.
- machine (str): where it ran: cores, accelerator, torch and onnxruntime versions.
- columns (list of str): the table header.
- rows (list of lists): one list per table row, each exactly as long as `columns`. A cell is
  a string (markdown; written as given), a number (written as Python's str() writes it: pass
  a string to keep trailing zeros), a bool, or null (an empty cell). A `|` in a cell is
  escaped here; a newline becomes a space.
- notes (str): markdown under the table (may be empty): settings, caveats, what the table
  shows. Relative links and images are relative to docs/ (`img/x.png`, `reconstruction.md`).

The page lists the records newest first; records of one date are ordered by file name, so
`<date>_<topic>_<detail>.json` names keep a topic's tables together (`mixed_*`, `speed_*`).
Older records stay: the page is the history.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
OUTPUT = ROOT / "docs" / "benchmarks.md"
COMMAND = "python -m tools.benchmarks_doc"
KEYS = ("title", "date", "tool", "command", "machine", "columns", "rows", "notes")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


class RecordError(ValueError):
    pass


def load_record(path: Path) -> dict:
    """Read and check one record; RecordError names the file and what is wrong."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise RecordError(f"{path.name}: not readable JSON ({err})") from None
    if not isinstance(record, dict):
        raise RecordError(f"{path.name}: expected a JSON object")
    missing = [k for k in KEYS if k not in record]
    extra = sorted(set(record) - set(KEYS))
    if missing or extra:
        raise RecordError(f"{path.name}: " + "; ".join(
            part for part in (f"missing {', '.join(missing)}" if missing else "",
                              f"unknown {', '.join(extra)}" if extra else "") if part))
    for key in ("title", "date", "tool", "command", "machine", "notes"):
        if not isinstance(record[key], str):
            raise RecordError(f"{path.name}: {key} must be a string")
    for key in ("title", "date", "tool", "command", "machine"):
        if not record[key].strip():
            raise RecordError(f"{path.name}: {key} is empty")
    if not _DATE.fullmatch(record["date"]):
        raise RecordError(f"{path.name}: date must be YYYY-MM-DD (got {record['date']!r})")
    columns, rows = record["columns"], record["rows"]
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise RecordError(f"{path.name}: columns must be a non-empty list of strings")
    if not isinstance(rows, list) or not all(isinstance(r, list) for r in rows):
        raise RecordError(f"{path.name}: rows must be a list of lists")
    for i, row in enumerate(rows):
        if len(row) != len(columns):
            raise RecordError(f"{path.name}: row {i + 1} has {len(row)} cells for {len(columns)} columns")
        for cell in row:
            if cell is not None and not isinstance(cell, (str, int, float, bool)):
                raise RecordError(f"{path.name}: row {i + 1}: a cell must be a string, number, bool or null")
    return record


def load_records(folder: Path) -> list[tuple[str, dict]]:
    """(anchor, record) for every docs/results/*.json, newest first, then by file name."""
    records = [(path.stem, load_record(path)) for path in sorted(folder.glob("*.json"))]  # by file name
    records.sort(key=lambda item: item[1]["date"], reverse=True)  # stable: file-name order kept within a date
    return records


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    text = str(value).replace("\r\n", " ").replace("\n", " ")
    return text.replace("|", "\\|")


def _code(text: str) -> str:
    """`text` as an inline code span, however many backticks it holds."""
    ticks = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def table(columns: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def section(anchor: str, record: dict) -> str:
    parts = [f'<a id="{anchor}"></a>',
             f"## {record['title']}",
             f"Measured {record['date']} with {_code(record['command'])} ({record['tool']}); {record['machine']}.",
             table(record["columns"], record["rows"]) if record["rows"] else "*(no rows)*"]
    notes = record["notes"].strip()
    if notes:
        parts.append(notes)
    return "\n\n".join(parts)


def render(records: list[tuple[str, dict]]) -> str:
    head = [
        "# Benchmarks",
        f"<!-- Generated by `{COMMAND}` from docs/results/*.json. Edit the records, not this file. -->",
        f"Generated by `{COMMAND}` from the measurement records in [results/](results/), one JSON "
        "file per table (the format is in the docstring of `tools/benchmarks_doc.py`). Newest "
        "first; older measurements stay as the history. Every table says when, with which "
        "command and on what machine it was measured: code changed since then may give other "
        "numbers.",
    ]
    contents = [f"- {record['date']}: [{record['title']}](#{anchor})" for anchor, record in records]
    body = [section(anchor, record) for anchor, record in records]
    return "\n\n".join(head + ["\n".join(contents)] + body) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the page differs from what the records give")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of records (default docs/results)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="page to write (default docs/benchmarks.md)")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.results)
    except RecordError as err:
        print(f"benchmarks_doc: error: {err}", file=sys.stderr)
        return 2
    text = render(records)
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.is_file() else None
        if current != text:
            print(f"benchmarks_doc: {args.output} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output} ({len(records)} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
