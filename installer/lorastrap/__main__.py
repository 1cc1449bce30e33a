"""`python -m lorastrap` and the `lorastrap` console script.  A Ctrl-C while the modules are still being imported
(before the CLI's own handling) ends the run quietly with the interrupted exit code, not a traceback."""

import sys


def main() -> None:
    try:
        if sys.argv[1:2] == ["install"]:  # first of all: the embedded engine's worker (install/ahead.py)
            from lorastrap.install import ahead
            ahead.start_guessing(sys.argv[2:])
        from lorastrap.cli import run
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
