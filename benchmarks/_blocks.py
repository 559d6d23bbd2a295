"""Generated sections of one docs page, each owned by one script.

A block is the text between ``<!-- begin:NAME -->`` and ``<!-- end:NAME -->``. A script rewrites
only its own block (:func:`replace_block`); a script that regenerates the whole page keeps the
others (:func:`extract_blocks`, then puts them back)."""
from __future__ import annotations

import re
from pathlib import Path

_BLOCK = re.compile(r"<!-- begin:([\w-]+) -->\n.*?<!-- end:\1 -->\n", re.S)


def extract_blocks(text: str) -> list[str]:
    """Every block of ``text``, markers included, in page order."""
    return [m.group(0) for m in _BLOCK.finditer(text)]


def replace_block(path: Path, name: str, body: str, before: str = "\n## ") -> None:
    """Write ``body`` as block ``name`` of the page at ``path``: in place of the old block, or
    else before the first line starting with ``before`` (after the page's introduction)."""
    block = f"<!-- begin:{name} -->\n{body.rstrip()}\n<!-- end:{name} -->\n"
    text = path.read_text() if path.exists() else ""
    old = next((b for b in extract_blocks(text) if b.startswith(f"<!-- begin:{name} -->")), None)
    if old is not None:
        text = text.replace(old, block)
    else:
        found = [j for j in (text.find(before), text.find("\n<!-- begin:")) if j >= 0]  # not inside a block
        i = min(found) if found else -1
        text = text + "\n" + block if i < 0 else text[:i + 1] + block + text[i:]
    path.write_text(text)
