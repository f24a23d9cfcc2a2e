"""Where the benchmark scripts put their figures: benchmarks/results/<name>.md, which docs/guides/benchmarks.md includes, and
benchmarks/results/<name>.json, the raw figures.

The Markdown file starts with one line saying when, on what and with which command the figures were measured, then the table,
then the notes (ratios against the same run's baseline, goals met or missed).
"""
from __future__ import annotations
import json, os, platform, shlex, sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).resolve().parent / "results"
LIBRARIES = ("numpy", "pandas", "scikit-learn", "onnxruntime")


def machine(libraries: tuple[str, ...] = ()) -> dict:
    "Cores, Python and the versions of the libraries that matter to the figures."
    versions = {}
    for lib in (*LIBRARIES, *libraries):
        try: versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError: pass
    return {"cores": os.cpu_count(), "python": platform.python_version(), "versions": versions}


def _json_default(o):
    return o.item() if hasattr(o, "item") else str(o)         # NumPy scalars; paths and the like as text


def write_results(name: str, table: list[dict] | pd.DataFrame | str, notes: list[str] | tuple[str, ...] = (), data: dict | None = None,
                  libraries: tuple[str, ...] = (), floatfmt: str | tuple[str, ...] = ",.2f", out_dir: Path = RESULTS, **markdown) -> Path:
    """Write `out_dir/<name>.md` (header line, `table` as Markdown, `notes` as a list) and `out_dir/<name>.json` (`table`'s records,
    the notes, the command and the machine, and whatever is in `data`). `table` may be Markdown already; `markdown` goes to tabulate
    (e.g. `disable_numparse=True` for cells formatted already). Returns the .md path."""
    now = datetime.now(timezone.utc)
    facts = machine(libraries)
    command = shlex.join(["python", os.path.relpath(sys.argv[0], Path.cwd()) if sys.argv[0] else "-", *sys.argv[1:]])
    libs = ", ".join(f"{k} {v}" for k, v in facts["versions"].items())
    header = f"*measured {now:%Y-%m-%d %H:%M} UTC on {facts['cores']} cores, Python {facts['python']}, {libs}; `{command}`*"
    if isinstance(table, str): markdown, records = table, None
    else:
        frame = table if isinstance(table, pd.DataFrame) else pd.DataFrame(table)
        frame = frame.copy()
        for c in frame.select_dtypes("float"):               # counts that a missing cell made float print as counts again
            if frame[c].isna().any() and (frame[c].dropna() % 1 == 0).all(): frame[c] = frame[c].astype("Int64")
        cells = frame.astype(object).where(frame.notna(), None)            # blanks for what a row does not have
        markdown, records = cells.to_markdown(index=False, floatfmt=floatfmt, missingval="", **markdown), json.loads(frame.to_json(orient="records"))
    lines = [header, "", markdown]
    if notes: lines += ["", *(f"- {n}" for n in notes)]
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / f"{name}.md"
    md.write_text("\n".join(lines) + "\n")
    raw = {"measured_utc": now.isoformat(timespec="seconds"), "command": command, "machine": facts,
           **({"table": records} if records is not None else {}), "notes": list(notes), **(data or {})}
    (out_dir / f"{name}.json").write_text(json.dumps(raw, indent=1, ensure_ascii=False, default=_json_default) + "\n")
    print(f"\nfigures written to {md} (and .json)", flush=True)
    return md
