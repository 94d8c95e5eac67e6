"""The repository's documentation stands on its own.

The design the project started from lived in a directory outside the repository; a checkout, a
release tarball or the container image has no such directory, so a reference to it is a dead end.
docs/contract.md states the contract in the project's own words, and these tests keep it that way:
no tracked file points outside, every "docs/contract.md §N" names a section that exists, and every
relative Markdown link resolves.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("README.md", "docs", "pipeline", "consumers", "sinks", "deploy")

# The outside design directory, and its two documents as they were cited ("CONTRACT §6",
# "ARCHITECTURE.md", 'ARCHITECTURE "One batch"'). Upper case, whole words: the ordinary words
# "contract" and "architecture" (and names like CONTRACT_VERSION) do not match.
OUTSIDE_REFERENCES = {
    "../shared": re.compile(r"\.\./shared"),
    "shared/design": re.compile(r"shared/design"),
    "CONTRACT": re.compile(r"\bCONTRACT\b"),
    "ARCHITECTURE": re.compile(r"\bARCHITECTURE\b"),
}

# Applied migrations are checksummed (sinks/migrate.py refuses to run when an applied file changed),
# so an old comment in them cannot be edited; these are the only citations allowed to stay.
FROZEN_CITATIONS = {
    "sinks/migrations/0001_omnimesh.sql": {"CONTRACT"},
    "sinks/migrations/0002_usage.sql": {"CONTRACT"},
    "sinks/migrations/0003_ingest_bookkeeping.sql": {"ARCHITECTURE"},
    "sinks/migrations/0004_aggregate_parts.sql": {"ARCHITECTURE"},
}


def _tracked_files() -> list[Path]:
    """The files git tracks under CHECKED; outside a git checkout, every file there on disk."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--", *CHECKED],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        paths: list[Path] = []
        for top in CHECKED:
            start = ROOT / top
            paths.extend([start] if start.is_file() else (p for p in start.rglob("*") if p.is_file()))
        return [p for p in paths if "__pycache__" not in p.parts]
    return [ROOT / name for name in listed.decode().split("\0") if name]


def _references(text: str) -> Iterator[tuple[str, int]]:
    """(name, line number) of the first match of each outside reference in `text`."""
    for name, pattern in OUTSIDE_REFERENCES.items():
        found = pattern.search(text)
        if found:
            yield name, text.count("\n", 0, found.start()) + 1


def test_the_checked_files_are_found() -> None:
    # Guards the test itself: an empty listing would make the next test pass vacuously.
    names = {p.relative_to(ROOT).as_posix() for p in _tracked_files()}
    assert {"README.md", "docs/contract.md", "pipeline/contract/validate.py", "sinks/objects.py"} <= names


def test_no_tracked_file_points_outside_the_repository() -> None:
    offenders = []
    for path in _tracked_files():
        if not path.is_file():  # listed by git but deleted in the working tree
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        name = path.relative_to(ROOT).as_posix()
        allowed = FROZEN_CITATIONS.get(name, set())
        for reference, line in _references(text):
            if reference not in allowed:
                offenders.append(f"{name}:{line}: {reference}")
    assert offenders == [], "cite docs/contract.md or docs/architecture.md instead:\n" + "\n".join(offenders)


def test_the_outside_reference_check_catches_each_form() -> None:
    for sample, expected in [
        ("see ../shared/design/CONTRACT.md", {"../shared", "shared/design", "CONTRACT"}),
        ("(CONTRACT §6)", {"CONTRACT"}),
        ('ARCHITECTURE "One batch, end to end", step 1', {"ARCHITECTURE"}),
        ("not ARCHITECTURE's 5k", {"ARCHITECTURE"}),
        ("the contract; the architecture; CONTRACT_VERSION", set()),
        ("docs/contract.md §3 and docs/architecture.md", set()),
    ]:
        assert {name for name, _ in _references(sample)} == expected, sample
    assert list(_references("one\ntwo ../shared\n")) == [("../shared", 2)]


_SECTION_HEADING = re.compile(r"^## (\d+)\. ", re.MULTILINE)
_SECTION_CITATION = re.compile(r"docs/contract\.md[\"”]?,? §(\d+)")


def test_every_cited_contract_section_exists() -> None:
    sections = set(_SECTION_HEADING.findall((ROOT / "docs/contract.md").read_text(encoding="utf-8")))
    assert sections, "docs/contract.md has no numbered sections"
    dangling = []
    for path in _tracked_files():
        if not path.is_file() or path.suffix not in {".md", ".py", ".sql", ".yaml", ".yml"}:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for number in _SECTION_CITATION.findall(text):
            if number not in sections:
                dangling.append(f"{path.relative_to(ROOT).as_posix()}: §{number}")
    assert dangling == [], f"docs/contract.md has sections {sorted(sections, key=int)}; cited:\n" + "\n".join(
        dangling
    )


_FENCED_CODE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK_TARGET = re.compile(r"\]\(([^)\s]+)\)")


def test_relative_markdown_links_resolve() -> None:
    broken = []
    for path in _tracked_files():
        if path.suffix != ".md" or not path.is_file():
            continue
        prose = _INLINE_CODE.sub("", _FENCED_CODE.sub("", path.read_text(encoding="utf-8")))
        for target in _LINK_TARGET.findall(prose):
            if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL, or an anchor in the same file
            file_part = target.split("#", 1)[0]
            if not (path.parent / file_part).exists():
                broken.append(f"{path.relative_to(ROOT).as_posix()}: {target}")
    assert broken == [], "\n".join(broken)


def test_every_setting_is_documented() -> None:
    """Each environment variable the settings read is explained in the README or docs/."""
    from pipeline.settings import Settings

    text = (ROOT / "README.md").read_text() + "".join(
        p.read_text() for p in sorted((ROOT / "docs").glob("*.md"))
    )
    names = []
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        names.append(getattr(alias, "choices", [alias])[0])
    assert [n for n in names if n not in text] == []
