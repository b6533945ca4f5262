"""`moe` command line: train | compare | generate | eval | match | plan | sweep | report | launch | bench | parity |
ckpt | export | info | data. parser.py declares the commands, commands.py runs them, main() turns every failure into one line."""
from __future__ import annotations

import errno
import os
import sys
from typing import List, Optional

os.environ.setdefault("WANDB_SILENT", "true")

from moe.cli.commands import debug_mode, die  # noqa: E402  (after WANDB_SILENT: wandb reads it on import)
from moe.cli.parser import build_parser  # noqa: E402
from moe.errors import MoeError  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    """Every failure a user can cause ends as one `error:` line naming the key, file or value, exit 2;
    MOE_DEBUG=1 shows the traceback instead."""
    args = build_parser().parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    try:
        args.func(args)
    except SystemExit:
        raise
    except KeyboardInterrupt:
        if debug_mode():
            raise
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001  (the one place every failure is turned into a message)
        if debug_mode():
            raise
        die(describe_error(exc))


def describe_error(exc: BaseException) -> str:
    """One line for any exception: our own errors say what they say; OS errors name the path
    (ENOSPC: the disk is full); anything else is named as unexpected."""
    if isinstance(exc, MoeError):
        return str(exc).strip().replace("\n", " ")
    if isinstance(exc, OSError):
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        what = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC:
            what = "no space left on the device (disk full)"
        return f"{where}: {what}" if where else what
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text} (unexpected; MOE_DEBUG=1 shows the traceback)"

