"""The README's API examples as a script: which ```sh blocks run, the commands in them, and what the
comment under each command says it answers. The rule (also written in the README, above its marker):

- every ```sh block from `## The API` down to the marker line runs, in order, in one bash session;
  a block opened with ```sh no-run (commands that never end, or need another terminal) does not;
- a command is a line that is not a comment, with its `\\` continuation lines; each command that calls
  curl makes exactly one request;
- the comment line right under a command that starts with a status code (`# 201 {...}`) is what that
  command answers: the status, the JSON fields shown (a subset; `...` stands for the rest, `"..."`
  for any value, a timestamp for any timestamp), headers written `Name: value` after the JSON, and for
  an error status a bare code (`# 404 user_not_found: ...`) is the error's code. Other possible answers
  are written `# or 409 ...` and are not compared. A curl command with no status line must answer 2xx.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

START_HEADING = "## The API"
MARKER = "<!-- readme-examples-end"

_STATUS_LINE = re.compile(r"^#\s+(\d{3})(?:\s+(.*))?$")
_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"|\.\.\.|…|[{}\[\]:,]|-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null')
# A header's value runs to the end of the line or to two spaces (prose may follow).
_HEADER = re.compile(r"\b([A-Z][A-Za-z]*(?:-[A-Z][A-Za-z]*)*): (\S+(?: \S+)*)")
_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(\+00:00|Z)$")
ANY = "..."


@dataclass
class Expected:
    status: int
    body: Any = None  # a partial JSON value, or None when the line shows none
    headers: dict[str, str] = field(default_factory=dict)
    error_code: str | None = None


@dataclass
class Command:
    text: str
    line: int  # 1-based, in the README
    expected: Expected | None = None

    @property
    def calls_curl(self) -> bool:
        return re.search(r"(^|[\s;(|&])curl\s", self.text) is not None


def api_blocks(readme: str) -> list[tuple[int, str]]:
    """(first line number, text) of every block that runs, in order."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == START_HEADING)
    end = next(i for i, line in enumerate(lines) if line.startswith(MARKER))
    blocks: list[tuple[int, str]] = []
    i = start
    while i < end:
        fence = lines[i].strip()
        if fence.startswith("```"):
            j = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == "```")
            if fence.split() == ["```sh"]:
                blocks.append((i + 2, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return blocks


def commands(block: str, first_line: int) -> list[Command]:
    """The block's commands, each with the answer its status line shows (if any)."""
    lines = block.splitlines()
    result: list[Command] = []
    i = 0
    while i < len(lines):
        stripped = lines[i].strip()
        if not stripped:
            i += 1
        elif stripped.startswith("#"):
            match = _STATUS_LINE.match(stripped)
            if match:
                if not result or result[-1].expected is not None:
                    raise ValueError(
                        f"README line {first_line + i}: a second status line; write other answers `# or ...`"
                    )
                result[-1].expected = _parse_answer(int(match.group(1)), match.group(2) or "", lines[i + 1 :])
            i += 1
        else:
            start = i
            while lines[i].rstrip().endswith("\\"):
                i += 1
            result.append(Command("\n".join(lines[start : i + 1]), first_line + start))
            i += 1
    return result


def _parse_answer(status: int, text: str, following: list[str]) -> Expected:
    expected = Expected(status)
    text = text.strip()
    if text[:1] in ("{", "["):
        json_text, rest = _balanced(text, following)
        expected.body = loads_partial(json_text)
    else:
        rest = text
        if status >= 400:
            code = re.match(r"([a-z_]+)\b", text)
            expected.error_code = code.group(1) if code else None
    expected.headers = dict(_HEADER.findall(rest))
    return expected


def _balanced(text: str, following: list[str]) -> tuple[str, str]:
    """The JSON value starting `text`, read on into the comment lines below until its brackets close,
    and whatever follows it on its last line."""
    collected = text
    rest_lines = iter(following)
    while True:
        depth = 0
        for token in _TOKENS.finditer(collected):
            value = token.group()
            depth += value in "{[" and len(value) == 1
            depth -= value in "}]" and len(value) == 1
            if depth == 0:
                return collected[: token.end()], collected[token.end() :]
        line = next(rest_lines)
        collected += " " + line.strip().lstrip("#")


def loads_partial(text: str) -> Any:
    """JSON as the README shows it: `...` stands for elided members or elements."""
    tokens = [t.group() for t in _TOKENS.finditer(text) if t.group() not in ("...", "…")]
    kept: list[str] = []
    for i, token in enumerate(tokens):
        after = tokens[i + 1] if i + 1 < len(tokens) else ""
        if token == "," and (not kept or kept[-1] in ("{", "[", ",") or after in ("}", "]", ",")):
            continue
        kept.append(token)
    return json.loads("".join(kept))


def mismatches(expected: Any, actual: Any, path: str = "") -> list[str]:
    """Where `actual` differs from what the README shows (a subset; "..." and timestamps match any)."""
    if expected == ANY:
        return []
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{path or 'body'}: expected an object, got {actual!r}"]
        found: list[str] = []
        for key, value in expected.items():
            if key not in actual:
                found.append(f"{path}.{key}: missing")
            else:
                found += mismatches(value, actual[key], f"{path}.{key}")
        return found
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) < len(expected):
            return [f"{path or 'body'}: expected at least {len(expected)} elements, got {actual!r}"]
        return [m for i, value in enumerate(expected) for m in mismatches(value, actual[i], f"{path}[{i}]")]
    if isinstance(expected, str) and _TIMESTAMP.match(expected):
        return [] if isinstance(actual, str) and _TIMESTAMP.match(actual) else [f"{path}: not a timestamp: {actual!r}"]
    if type(expected) is not type(actual) or expected != actual:
        return [f"{path}: README shows {expected!r}, got {actual!r}"]
    return []
