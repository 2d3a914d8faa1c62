"""The demo writes its banner through one guarded path, so a reader that stops reading
(make's pipe gone, `make demo | head`) never stops the demo (a BrokenPipeError from a bare
print of the banner ended the demo and its children in one run out of four)."""

from __future__ import annotations

import ast
import inspect

from apptunnel import demo


def test_every_stdout_write_of_the_demo_goes_through_say():
    tree = ast.parse(inspect.getsource(demo))
    bare = [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "print"
            and not any(k.arg == "file" for k in node.keywords)]
    assert bare == [], f"print() to stdout at lines {bare}: use _say"
