"""Run the ```python code blocks of a Markdown page, in order, in one namespace.

Docs pages are tested by executing their code: a page whose code no longer runs fails CI. Use
from a test::

    from docs_runner import run_markdown_blocks

    def test_my_page():
        ns = run_markdown_blocks(DOCS / "my_page.md")
        assert ns["result"] < 1e-6

Only fences whose info string's first word is ``python`` (or ``py``) run; ``text``, ``bash``,
``pycon`` etc. are shown to readers but not executed. Fences may be indented (inside list items);
the opening fence's indentation is removed from the block's lines. A failing block raises with the page name
and the block's line number in the traceback (each block is compiled with filename
``<page>:<line>`` and its lines offset to match the page).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["CodeBlock", "extract_blocks", "extract_python_blocks", "run_markdown_blocks"]

# Any indentation: fences inside (nested) list items are indented by the item's content offset.
_FENCE = re.compile(r"^(?P<indent>[ ]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_RUNNABLE = {"python", "py"}


@dataclass(frozen=True)
class CodeBlock:
    """A fenced code block: its info-string language, source and first code line (1-based)."""

    language: str
    source: str
    line: int


def extract_blocks(text: str) -> list[CodeBlock]:
    """All fenced code blocks of a Markdown text (CommonMark-style ``` / ~~~ fences)."""
    blocks: list[CodeBlock] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, indent = m.group("fence"), len(m.group("indent"))
        lang = m.group("info").strip().split()[0] if m.group("info").strip() else ""
        body, j = [], i + 1
        while j < len(lines):
            close = _FENCE.match(lines[j])
            if (
                close
                and close.group("fence")[0] == fence[0]
                and len(close.group("fence")) >= len(fence)
                and not close.group("info").strip()
            ):
                break
            # Strip the opening fence's indentation from the content (CommonMark rule).
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise ValueError(f"unclosed code fence opened at line {i + 1}")
        blocks.append(CodeBlock(lang.lower(), "\n".join(body) + "\n", i + 2))
        i = j + 1
    return blocks


def extract_python_blocks(path: str | Path) -> list[CodeBlock]:
    """The runnable (```python / ```py) blocks of the Markdown file ``path``, in page order."""
    text = Path(path).read_text(encoding="utf-8")
    return [b for b in extract_blocks(text) if b.language in _RUNNABLE]


def run_markdown_blocks(
    path: str | Path, namespace: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Execute the ```python blocks of ``path`` in order in one namespace and return it.

    ``namespace`` (default: a fresh dict with ``__name__ = "__main__"``) is updated in place, so
    later blocks see the names earlier ones defined, as a reader running the page would.
    ``ValueError`` if the page has no runnable block (a page that silently tests nothing).
    """
    path = Path(path)
    blocks = extract_python_blocks(path)
    if not blocks:
        raise ValueError(f"{path} has no ```python code blocks to run")
    ns: dict[str, Any] = {"__name__": "__main__"} if namespace is None else namespace
    for block in blocks:
        # Pad with newlines so tracebacks report the line number in the Markdown page.
        code = compile("\n" * (block.line - 1) + block.source, f"{path}", "exec")
        exec(code, ns)
    return ns
