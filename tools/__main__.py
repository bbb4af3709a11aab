"""`kvc`'s entry point: an interrupt that arrives while the tools are still importing ends with
the same one line as one arriving later (`python -m kvcodec.tools` runs it too)."""

import sys


def main():
    try:
        from kvcodec.tools.cli import main as run
    except KeyboardInterrupt:
        sys.stderr.write("kvc: interrupted\n")
        sys.exit(130)
    run()


if __name__ == "__main__":
    main()
