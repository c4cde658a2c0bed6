"""The runnable-block convention of the docs (docs/contributing.md says it for readers).

- A fenced block with the info string ``console`` is run: each line starting with ``$ ``
  is a command (a line ending in ``\\`` continues it, and a here-document's lines up to
  its terminator belong to it); the other lines are sample output, not checked.
- A command ending in `` &`` starts in the background and is stopped (SIGTERM) at the end
  of its session; for ``campaign-worker run &`` and ``campaign-worker api &`` the test
  waits for their ``/readyz`` first.
- A command whose comment says ``# exits N`` must exit with N; every other one with 0.
- ``<!-- docs-test: skip REASON -->`` on the line before a block: not run (docker,
  kubectl, installs). Every other shell block (``bash``, ``sh``, ``shell``, ``zsh``,
  ``shell-session``) must carry it: shell commands that run go in ``console`` blocks.
- ``<!-- docs-test: session NAME -->`` starts a new session: the blocks after it run
  on an emptied Redis in a new working directory, as a test of their own. A page starts
  one session (named after the page) at its top.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

RUN_LANG = "console"
SHELL_LANGS = {"bash", "sh", "shell", "zsh", "shell-session", "console"}

_FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
_MARK = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>skip|session)\b\s*(?P<arg>.*?)\s*-->\s*$")
_HEREDOC = re.compile(r"<<-?\s*(['\"]?)(?P<tag>[A-Za-z_]+)\1")
_EXITS = re.compile(r"#\s*exits?\s+(?P<code>\d+)\b")


@dataclass
class Command:
    text: str
    line: int  # 1-based line of the ``$`` in the file

    @property
    def background(self) -> bool:
        return (
            "\n" not in self.text
            and self.text.rstrip().endswith("&")
            and not self.text.rstrip().endswith("&&")
        )

    @property
    def expected_exit(self) -> int:
        found = _EXITS.search(self.text.splitlines()[0])
        return int(found["code"]) if found else 0


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the opening fence
    lang: str
    body: list[str]
    skip: str | None = None  # the reason, when marked not run

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    def commands(self) -> list[Command]:
        """The ``$`` commands of a console block, with continuations and here-documents."""
        out: list[Command] = []
        i = 0
        while i < len(self.body):
            raw = self.body[i]
            if not raw.startswith("$ "):
                i += 1
                continue
            start = i
            parts = [raw[2:]]
            while parts[-1].endswith("\\") and i + 1 < len(self.body):
                i += 1
                parts.append(self.body[i].removeprefix("> "))
            doc = _HEREDOC.search(parts[0])
            if doc:
                while i + 1 < len(self.body):
                    i += 1
                    parts.append(self.body[i])
                    if self.body[i].strip() == doc["tag"]:
                        break
                else:
                    raise AssertionError(f"{self.where}: here-document {doc['tag']} not closed")
            out.append(Command("\n".join(parts), self.line + 1 + start))
            i += 1
        return out


@dataclass
class Session:
    page: Path
    name: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        rel = str(self.page.relative_to(ROOT))
        return rel if self.name == "" else f"{rel}#{self.name}"

    def commands(self) -> list[Command]:
        return [
            c for b in self.blocks if b.lang == RUN_LANG and b.skip is None for c in b.commands()
        ]


def pages() -> list[Path]:
    """README.md and every page under docs/."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[tuple[Block, str | None]]:
    """Every fenced block of a Markdown file, with the session name it starts (if any)."""
    lines = path.read_text().splitlines()
    out: list[tuple[Block, str | None]] = []
    pending_session: str | None = None
    previous = ""
    i = 0
    while i < len(lines):
        mark = _MARK.match(lines[i])
        if mark and mark["kind"] == "session":
            pending_session = mark["arg"] or f"line-{i + 1}"
        opening = _FENCE.match(lines[i])
        if not opening:
            if lines[i].strip():
                previous = lines[i]
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        lang = (opening["info"].split() or [""])[0].strip("{}.").lower()
        body: list[str] = []
        start = i
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(
                lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip()
            )
            i += 1
        skip_mark = _MARK.match(previous)
        skip = (
            (skip_mark["arg"] or "unspecified")
            if skip_mark and skip_mark["kind"] == "skip"
            else None
        )
        out.append((Block(path, start + 1, lang, body, skip), pending_session))
        pending_session = None
        previous = ""
        i += 1
    return out


def sessions() -> list[Session]:
    """The runnable sessions of every page, in page order."""
    out: list[Session] = []
    for page in pages():
        current = Session(page, "")
        for block, new in blocks(page):
            if new is not None:
                if current.commands():
                    out.append(current)
                current = Session(page, new)
            current.blocks.append(block)
        if current.commands():
            out.append(current)
    return out
