"""docs/design.md is the design that code, docs and tests cite as "docs/design.md section N": every
such reference names a section that exists, and nothing cites a design file outside the
repository (the old DESIGN.md)."""

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DESIGN = ROOT / "docs" / "design.md"
SKIP_DIRS = {".git", ".venv", "__pycache__", "node_modules", "bench-out", ".pytest_cache",
             ".hypothesis"}
SUFFIXES = {".py", ".md", ".proto", ".yaml", ".yml", ".toml", ".txt", ".sh", ".cfg"}
NAMES = {"Makefile", "Dockerfile"}
REF = re.compile(r"docs/design\.md,? sections? (\d+(?:(?:, | and | or |-)\d+)*)")


def sections() -> set[int]:
    return {int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M)}


def sources():
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS and not d.endswith(".egg-info")]
        for name in files:
            path = Path(folder) / name
            if path.suffix in SUFFIXES or name in NAMES:
                yield path


def references() -> list[tuple[str, int]]:
    """(file:line, section) for every "docs/design.md section N" in the repository."""
    out = []
    for path in sources():
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for m in REF.finditer(line):
                for number in re.findall(r"\d+", m.group(1)):
                    out.append((f"{path.relative_to(ROOT)}:{n}", int(number)))
    return out


def test_design_sections_are_numbered_in_order():
    numbers = [int(m) for m in re.findall(r"^## (\d+)\. ", DESIGN.read_text(), re.M)]
    assert numbers == list(range(1, len(numbers) + 1)), numbers


def test_every_design_reference_names_an_existing_section():
    have = sections()
    refs = references()
    assert len(refs) >= 20, refs  # the scan finds the references (the code cites it ~25 times)
    missing = [f"{where}: section {number}" for where, number in refs if number not in have]
    assert not missing, f"docs/design.md has sections {sorted(have)}; cited: {missing}"


def test_no_reference_to_a_design_file_outside_the_repository():
    stale = []
    for path in sources():
        if path == Path(__file__).resolve():
            continue
        for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if "DESIGN.md" in line:
                stale.append(f"{path.relative_to(ROOT)}:{n}")
    assert not stale, f"cite docs/design.md instead: {stale}"
