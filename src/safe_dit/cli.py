"""Command line: ``safe-dit COMMAND``. Thin: the commands live in ``safe_dit.commands``, each imported when it
runs; this module parses, logs, and turns errors and signals into one line and an exit code."""

from __future__ import annotations

import logging
import signal
import sys

from safe_dit.commands import build_parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from safe_dit.config import SafeDitError

    previous = signal.signal(signal.SIGTERM, _terminated)  # like Ctrl-C: cleanup runs, then one line
    try:
        return int(args.func(args) or 0)
    except SafeDitError as err:
        print(f"safe-dit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safe-dit: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("safe-dit: terminated", file=sys.stderr)
        return 143
    finally:
        signal.signal(signal.SIGTERM, previous)


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so that every ``finally`` (temporary files, caches) runs."""


def _terminated(_signum, _frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
