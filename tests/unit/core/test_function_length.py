"""The function-length lint rule (scripts/function_length.py, run by `make lint`)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "function_length.py"
spec = importlib.util.spec_from_file_location("function_length", SCRIPT)
function_length = importlib.util.module_from_spec(spec)
spec.loader.exec_module(function_length)


def _function(name: str, lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


def test_a_function_over_the_limit_is_named_with_its_place_and_length():
    source = (
        _function("short", 80)
        + _function("long", 81)
        + "class C:\n"
        + _function("method", 90, "    ")
    )
    hits = list(function_length.long_functions(source, "m.py"))
    assert hits == ["m.py:81 long (81 lines > 80)", "m.py:163 method (90 lines > 80)"]


def test_the_command_fails_on_a_long_function_and_passes_otherwise(tmp_path, capsys):
    (tmp_path / "ok.py").write_text(_function("f", 80))
    assert function_length.main([str(tmp_path)]) == 0
    (tmp_path / "bad.py").write_text(_function("g", 81))
    assert function_length.main([str(tmp_path)]) == 1
    assert "bad.py:1 g (81 lines > 80)" in capsys.readouterr().out
