"""The notebooks read as a book (tests/book.py): each public definition is shown by an example with stored output in its
own notebook, failures are asserted with fastcore's `test_fail`, and the README is the index notebook's text, short."""
from __future__ import annotations
import re, sys
from pathlib import Path

import book

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "docs"))
import build  # noqa: E402  (docs/build.py)


def test_every_public_definition_is_shown_by_an_example_with_output():
    missing = {ch.path.relative_to(ROOT).as_posix(): ch.missing() for ch in book.chapters() if ch.missing()}
    assert not missing, f"definitions without an example with stored output: {missing}"


def test_failures_are_asserted_with_test_fail():
    idioms = {ch.path.name: ch.assertion_idioms for ch in book.chapters() if ch.assertion_idioms}
    assert not idioms, f"`try: ...; raise AssertionError` where fastcore.test.test_fail would do: {idioms}"


def test_the_checker_sees_a_missing_example(tmp_path):
    nb = tmp_path / "x.ipynb"
    nb.write_text('{"cells": [{"cell_type": "code", "source": ["#| export\\n", "def shown(): pass\\n", "def hidden(): pass"]},'
                  ' {"cell_type": "code", "source": ["shown()"], "outputs": [{"output_type": "execute_result"}]},'
                  ' {"cell_type": "code", "source": ["hidden()"], "outputs": []}], "metadata": {}}')
    assert book.Chapter.read(nb).missing() == ["hidden"]


def test_readme_is_the_index_notebook_and_short():
    text = (ROOT / "README.md").read_text()
    assert text == build.readme(), "README.md is out of date: run `make docs` (it is written from nbs/index.ipynb)"
    assert len(text.splitlines()) <= 200
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if not re.match(r"^[a-z]+:", target): assert (ROOT / target).exists(), f"README links to a missing file: {target}"
