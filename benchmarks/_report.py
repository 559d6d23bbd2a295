"""What every benchmark does with its results at the end: the optional ``--json`` file."""
from __future__ import annotations

import json


def write_json(path: str | None, results) -> None:
    """Write ``results`` to ``path`` as indented JSON; nothing when ``path`` is None (``--json``
    not given), so a benchmark can end with ``write_json(args.json, rows)`` unconditionally."""
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)
