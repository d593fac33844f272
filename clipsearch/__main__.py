"""Console entry point: `clipsearch` and `python -m clipsearch`.

The CLI module imports Typer and the rest (a few hundred ms); a Ctrl-C in that window would
print a traceback from the import machinery. This module imports nothing heavy, so the
interrupt is caught here too and exits 130 quietly like one during a command."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from clipsearch.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        raise SystemExit(130) from None
    cli_main()


if __name__ == "__main__":
    main()
