"""``kldiv compute`` (also ``python -m kldiv compute``): the loss or the metric over two ``.npy`` files.

Bad input (a missing file, not ``.npy``, non-numeric, shapes that do not fit, an output path
that is an input or a directory, bad options) gets one line on stderr and exit status 2; a
backend or device that is not there, or any other failure, one line and exit status 1; an
interruption (Ctrl-C) exit status 130. Never a traceback. With ``--output``, an existing file
is replaced only when the run succeeds.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Any, NoReturn

import numpy as np

__all__ = ["compute_main"]

PROG = "python -m kldiv compute"

DESCRIPTION = """\
The Keras KL divergence, sum(t * log(t / p), axis=-1) with t, p clipped to [1e-7, 1], over two
.npy files of the same number of rows, read batch by batch (memory-mapped windows) so memory
stays bounded whatever the files' size. Prints the result on stdout. Files may be big-endian
and of any real numeric dtype.

With --reduction none the per-sample losses are written to --output (a .npy file, written
batch by batch to a temporary file beside it, renamed into place only when complete: a failed
or interrupted run leaves an existing file untouched); a summary line is printed instead of
the values.
"""

EPILOG = """\
examples:
  {prog} y_true.npy y_pred.npy
  {prog} y_true.npy y_pred.npy --reduction sum --sample-weight w.npy
  {prog} y_true.npy y_pred.npy --metric --backend torch --device cuda
  {prog} y_true.npy y_pred.npy --backend tensorflow --device gpu
  {prog} y_true.npy y_pred.npy --reduction none --output loss.npy
  {prog} y_true.npy y_pred.npy --backend dask --scheduler tcp://host:8786

exit status: 0 success, 2 bad input or options, 1 other failure (backend or device missing,
...), 130 interrupted
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        raise _UsageError(message)


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    from ._libraries import BACKENDS
    from ._reduction import Reduction

    p = _Parser(prog=prog, description=DESCRIPTION, epilog=EPILOG.format(prog=prog),
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("y_true", help="the true distributions, a .npy file of shape (N, ..., C)")
    p.add_argument("y_pred", help="the predicted distributions, a .npy file (N, ..., C)")
    p.add_argument("--sample-weight", metavar="W.npy",
                   help="per-sample weights: a .npy file (N,) or a number (Keras 2 rules)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--reduction", default="auto", choices=[r for r in Reduction.all() if r != Reduction.BATCHMEAN],
                      help="as kldiv.KLDivergence(reduction=...) (default: auto)")
    what.add_argument("--metric", action="store_true",
                      help="the metric instead: kldiv.metrics.KLDivergence's weighted mean")
    p.add_argument("--backend", default="numpy", choices=BACKENDS, help="default: numpy")
    p.add_argument("--device", help="e.g. cuda, cuda:1 (torch, cupy), gpu (jax, tensorflow); "
                                    "default: the backend's")
    p.add_argument("--batch-rows", type=int, metavar="N",
                   help="rows per batch (default: about 64 MiB of the widest input)")
    p.add_argument("--output", metavar="OUT.npy",
                   help="with --reduction none: where to write the per-sample losses")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="with --backend dask: a dask.distributed scheduler, e.g. tcp://host:8786 "
                        "(the workers must see the files at the same paths)")
    bar = p.add_mutually_exclusive_group()
    bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="show a progress bar on stderr (default: when stderr is a terminal)")
    bar.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def _weight(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return value


def _format(value: Any) -> str:
    from ._convert import host_numpy
    from ._namespace import dtype_name

    arr = np.asarray(host_numpy(value))
    # a float16 result comes to the host as float32 from some libraries (torch): print it
    # in its own digits, as NumPy, JAX and Dask print theirs
    if dtype_name(getattr(value, "dtype", arr.dtype)) == "float16" and arr.dtype != np.float16:
        arr = arr.astype(np.float16)
    if arr.ndim == 0:
        return str(arr[()])
    return np.array2string(arr, separator=", ", threshold=20)


def _run(args: argparse.Namespace) -> str:
    from ._files import evaluate_files
    from ._libraries import lazy_library, library

    if args.batch_rows is not None and args.batch_rows < 1:
        raise _UsageError(f"--batch-rows must be a positive integer, got {args.batch_rows}")
    if args.reduction == "none" and args.output is None and not args.metric:
        raise _UsageError("--reduction none needs --output OUT.npy (where to write the per-sample losses)")
    if args.output is not None and (args.reduction != "none" or args.metric):
        raise _UsageError("--output is for --reduction none")
    lib = library(args.backend)
    if args.scheduler is not None and not lib.lazy:
        raise _UsageError(f"--scheduler is for --backend {lazy_library().name}")
    lib.hush()  # a library's start-up chatter (TensorFlow's)
    # --output (an input, a link to one, a directory, a missing directory): evaluate_files
    # refuses it with a ValueError before anything is read or written (exit status 2).

    def evaluate() -> Any:
        result = evaluate_files(
            args.y_true, args.y_pred, sample_weight=_weight(args.sample_weight),
            reduction=args.reduction, metric=args.metric or None, backend=args.backend,
            device=args.device, batch_rows=args.batch_rows, out=args.output,
            progress=args.progress,
        )
        if lib.lazy and hasattr(result, "compute"):
            result = result.compute()
        return result

    if args.scheduler is not None:
        from distributed import Client

        with Client(args.scheduler, timeout="20s"):
            result = evaluate()
    else:
        result = evaluate()
    if args.output is not None:
        n = result.shape[0] if result.ndim else 1
        return (f"wrote {n} per-sample loss{'es' if n != 1 else ''} "
                f"({result.dtype}, shape {tuple(result.shape)}) to {args.output}")
    return _format(result)


def compute_main(argv: list[str], *, prog: str = PROG) -> int:
    """Run ``kldiv compute`` with ``argv`` (the arguments after ``compute``).

    ``prog`` is the command as invoked (``kldiv compute`` or ``python -m kldiv compute``),
    for the help and the error messages. Returns the exit status: 0 on success, 2 for bad
    input or options (one line on stderr), 1 for a missing backend or device and any other
    failure (one line on stderr), 130 when interrupted. Python warnings raised on the way
    (NumPy's ``invalid value encountered``, for NaN or infinite data) are one line each too,
    ``kldiv compute: warning: ...``, once per distinct message.
    """
    with warnings.catch_warnings(record=True) as caught:
        status = _compute(argv, prog)
    for message in dict.fromkeys(" ".join(str(w.message).split()) for w in caught):
        print(f"kldiv compute: warning: {message}", file=sys.stderr)
    return status


def _compute(argv: list[str], prog: str) -> int:
    from ._npyio import DataFileError

    def fail(status: int, message: str) -> int:
        message = " ".join(str(message).split())  # one line
        print(f"kldiv compute: error: {message}", file=sys.stderr)
        return status

    try:
        args = _parser(prog).parse_args(argv)
        print(_run(args))
    except _UsageError as exc:
        return fail(2, f"{exc} (see '{prog} --help')")
    except DataFileError as exc:
        return fail(2, str(exc))
    except (ValueError, TypeError) as exc:
        return fail(2, str(exc))
    except (ImportError, RuntimeError) as exc:  # a backend or a device that is not there
        return fail(1, str(exc))
    except KeyboardInterrupt:
        return fail(130, "interrupted")
    except SystemExit as exc:  # argparse's --help
        return int(exc.code or 0) if isinstance(exc.code, int) or exc.code is None else 2
    except MemoryError:
        return fail(1, "out of memory: try a smaller --batch-rows")
    except Exception as exc:
        return fail(1, f"{type(exc).__name__}: {exc}")
    return 0
