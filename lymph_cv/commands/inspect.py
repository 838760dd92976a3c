"""``lymph-cv inspect PATH``: what a Caffe file or database holds."""
from __future__ import annotations

import os

import click

from lymph_cv.commands.defaults import DEFAULT_KEY_LIMIT


@click.command("inspect")
@click.argument("path", type=click.Path(path_type=str))
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON.")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEFAULT_KEY_LIMIT,
    show_default=True,
    help="How many database keys to list.",
)
def inspect(path: str, as_json: bool, limit: int) -> None:
    """Describe a caffemodel, solverstate, mean binaryproto, net/solver prototxt or LevelDB/LMDB."""
    if not as_json and os.path.isdir(path):
        # A database: what is known once it is open first, the totals after the scan of every record.
        from lymph_cv.formats.inspect_db import describe_db, format_db_header, format_db_totals

        info = describe_db(path, limit, on_header=lambda header: click.echo(format_db_header(header), nl=False))
        click.echo(format_db_totals(info), nl=False)
        return
    from lymph_cv.formats.inspect import describe, format_description

    info = describe(path, limit=limit)
    if as_json:
        import json

        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(format_description(info), nl=False)
