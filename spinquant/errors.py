"""One exception type for bad user input, and the CLI wrapper that prints it as one line."""

import contextlib
import sys
from collections.abc import Iterator


class UserError(ValueError):
    """Input the user can fix: printed as one line by the CLIs, never as a traceback."""


@contextlib.contextmanager
def one_line_errors(prog: str) -> Iterator[None]:
    try:
        yield
    except UserError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
