"""The README's CLI reference is the Typer app's, regenerated and compared."""

from __future__ import annotations

from pathlib import Path

from clipsearch.cli_docs import END, START, render, updated_readme

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_cli_reference_is_current() -> None:
    text = README.read_text(encoding="utf-8")
    assert text.count(START) == 1 and text.count(END) == 1
    assert updated_readme(text) == text, "run `python -m clipsearch.cli_docs` to regenerate"


def test_reference_covers_every_command_and_option() -> None:
    import typer.main

    from clipsearch.cli import app

    group = typer.main.get_command(app)
    ref = render()
    for name, cmd in group.commands.items():  # type: ignore[attr-defined]
        assert f"#### `clipsearch {name}`" in ref
        for param in cmd.params:
            for opt in param.opts:
                if opt.startswith("-"):
                    assert f"{opt}" in ref, (name, opt)
