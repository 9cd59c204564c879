"""Write the README's settings table from freezeps.config.Config (run: make readme)."""
from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
START, END = "<!-- settings:start -->", "<!-- settings:end -->"


def settings_table() -> str:
    from freezeps.config import Config
    rows = ["| flag | environment | default | read by | meaning |", "|---|---|---|---|---|"]
    for f in fields(Config):
        choices = f.metadata.get("choices")
        meaning = f.metadata["help"] + (f" ({', '.join(map(str, choices))})" if choices else "")
        rows.append(f"| `--{f.name.replace('_', '-')}` | `FREEZEPS_{f.name.upper()}` | `{f.default!r}` | "
                    f"{', '.join(f.metadata['roles'])} | {meaning} |")
    return "\n".join(rows)


def render(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{settings_table()}\n{END}{tail}"


if __name__ == "__main__":
    path = ROOT / "README.md"
    path.write_text(render(path.read_text()))
