"""``python -m gwnet {train,predict,data,export,serve} ...``: the console scripts under one entry point
(what ``torchrun -m gwnet train ...`` launches)."""
from __future__ import annotations

import sys

COMMANDS = {"train": "gwnet.cli.train", "predict": "gwnet.cli.predict", "data": "gwnet.cli.data",
            "export": "gwnet.cli.export", "serve": "gwnet.cli.serve"}


def main(argv: list[str] | None = None) -> int:
    import importlib

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--version"]:
        from ._version import __version__

        print(f"gwnet {__version__}")
        return 0
    if not argv or argv[0] not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(argv[0], COMMANDS, n=1) if argv else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        print(f"usage: python -m gwnet {{{','.join(COMMANDS)}}} [options] | --version{hint}", file=sys.stderr)
        return 2
    return importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
