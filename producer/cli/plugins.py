"""The plugins command: converters and optimizers a job file can name, with their parameters.

The facts come from ``worker.plugins.catalog.describe()`` (a list of dicts, one per plugin); this
module renders the keys it knows (name, kind, summary, params) and lists any others as they are.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from producer.cli.app import app, console

KNOWN = ("name", "kind", "summary", "params")
KINDS = ("converter", "optimizer")


@app.command()
def plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False) -> None:
    """List the converters (model.format) and optimizers (optimize.variants) with their parameters."""
    from worker.plugins import catalog  # imports the plugin modules, not their frameworks

    described = catalog.describe()
    if as_json:
        console.print_json(json.dumps({"plugins": described}, default=str))
        return
    kinds = [k for k in KINDS if any(p.get("kind") == k for p in described)]
    kinds += sorted({str(p.get("kind")) for p in described} - set(kinds))
    for kind in kinds:
        console.print(_table(kind, [p for p in described if str(p.get("kind")) == kind]))


def _table(kind: str, entries: list[dict[str, Any]]) -> Table:
    table = Table(title=f"{kind}s ({len(entries)})", title_justify="left", show_lines=True)
    table.add_column("name", style="bold", no_wrap=True)
    table.add_column("summary")
    table.add_column("params")
    table.add_column("facts")
    for entry in sorted(entries, key=lambda e: str(e.get("name"))):
        facts = "\n".join(f"{key}: {_value(value)}" for key, value in entry.items() if key not in KNOWN)
        params = "\n".join(param_line(p) for p in entry.get("params") or [])
        table.add_row(escape(str(entry.get("name", "?"))), escape(str(entry.get("summary") or "")),
                      escape(params) or "-", escape(facts) or "-")
    return table


def param_line(param: dict[str, Any]) -> str:
    """``per_channel: bool = true — quantize per output channel [choices: a, b]``"""
    line = str(param.get("name", "?"))
    if param.get("type"):
        line += f": {param['type']}"
    if param.get("default") is not None:  # None: required, or chosen at run time
        line += f" = {_value(param['default'])}"
    if param.get("choices"):
        line += f" [{', '.join(map(_value, param['choices']))}]"
    if param.get("help"):
        line += f" — {param['help']}"
    return line


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list | tuple):
        return ", ".join(map(_value, value)) or "-"
    return json.dumps(value, default=str)
