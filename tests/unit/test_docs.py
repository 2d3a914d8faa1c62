"""The docs stay true: they render cleanly and every test they cite as proof exists.

docs/security.rst names, for each attack, the test that shows it refused; a renamed or
deleted test would leave the claim without its proof, silently. This catches that, and
reStructuredText that no longer renders as written (a table or a list that broke).
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import docutils.core
import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = sorted([ROOT / "README.rst", *(ROOT / "docs").glob("*.rst")])
TEST_FILES = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("*.py")}
TEST_NAMES = {name for p in (ROOT / "tests").rglob("*.py")
              for name in re.findall(r"def (test_\w+)", p.read_text())}


def cited(text: str) -> tuple[set[str], set[str]]:
    """The test files (tests/....py) and test names (test_...) a document mentions."""
    files = set(re.findall(r"\b(tests/[\w/]+\.py)\b", text))
    names = set(re.findall(r"\b(test_\w+)\b(?!\.py)", text))   # not a module's own name
    return files, names


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_the_document_renders_without_warnings(doc):
    warnings = io.StringIO()
    docutils.core.publish_doctree(
        doc.read_text(), source_path=str(doc),
        settings_overrides={"warning_stream": warnings, "report_level": 2,
                            "halt_level": 5})
    assert warnings.getvalue() == ""


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_test_the_document_cites_exists(doc):
    files, names = cited(doc.read_text())
    assert sorted(files - TEST_FILES) == []
    assert sorted(names - TEST_NAMES) == []


def test_a_missing_citation_is_seen():
    files, names = cited("see ``tests/unit/test_nope.py::test_that_was_renamed``")
    assert files - TEST_FILES == {"tests/unit/test_nope.py"}
    assert names - TEST_NAMES == {"test_that_was_renamed"}
