"""The ``kldiv`` command (also ``python -m kldiv``).

- ``kldiv`` (or ``kldiv show``): the seed examples' values, dtype and device on each
  installed backend and device, and how to install each missing backend.
- ``kldiv compute y_true.npy y_pred.npy [...]``: the loss over two ``.npy`` files (see
  ``kldiv compute --help`` and :mod:`kldiv._cli`).
- ``kldiv --help``, ``kldiv --version``.

The help names the command as it was invoked: ``kldiv`` for the installed script,
``python -m kldiv`` for the module.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn

import numpy as np

SEED_1 = ([0.4, 0.9, 0.2], [0.5, 0.8, 0.12])
SEED_2 = ([[0, 1], [0, 0]], [[0.6, 0.4], [0.4, 0.6]])

Converter = Callable[[Any], Any]


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _targets() -> Iterator[tuple[str, str, Converter | None, str]]:
    """(backend, device, converter from nested lists, reason-if-unavailable), in the table's
    order (slow-to-import libraries last: a process that has imported TensorFlow must not
    import Triton afterwards, see the README)."""
    from ._libraries import LIBRARIES

    for lib in LIBRARIES:
        if not _installed(lib.modules[0].partition(".")[0]):
            yield lib.name, "-", None, lib.install_hint
            continue
        lib.hush()
        try:
            rows = list(lib.show_devices())
        except Exception as exc:  # installed, but broken here
            yield lib.name, "-", None, f"installed but unusable here: {type(exc).__name__}: {exc}"
            continue
        for device, conv, reason in rows:
            yield lib.name, device, conv, reason


def _fmt(x: Any) -> str:
    from ._convert import host_numpy
    from ._libraries import lazy_library
    from ._namespace import get_device

    dev = "cpu" if lazy_library().is_instance(x) else get_device(x)  # Dask: host chunks
    arr = host_numpy(x)  # torch (detached), CuPy, Dask (computed), TensorFlow, ...
    vals = np.array2string(np.asarray(arr), precision=8, separator=", ")
    name = getattr(x.dtype, "name", None)  # NumPy, JAX, TensorFlow
    dtype = name if isinstance(name, str) else str(x.dtype).rsplit(".", 1)[-1]  # torch.float32
    dev_str = str(dev)
    if dev_str.startswith("/job:"):  # TensorFlow: /job:localhost/replica:0/task:0/device:CPU:0
        dev_str = dev_str.rpartition("device:")[2]
    return f"{vals}  [{dtype} on {dev_str}]"


def show(out: Any = None) -> int:
    """Print the seed examples on every installed backend; return the number of failures."""
    import kldiv

    out = out or sys.stdout
    failures = 0
    out.write(f"kldiv {kldiv.__version__}: Keras KL divergence on every installed backend\n")
    out.write("  loss = sum(t * log(t / p), axis=-1),  t, p clipped to [1e-7, 1]\n\n")
    for name, device, conv, reason in _targets():
        header = f"{name} ({device})"
        if conv is None:
            out.write(f"- {header}: not available: {reason}\n")
            continue
        out.write(f"- {header}\n")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                yt2, yp2 = conv(SEED_2[0]), conv(SEED_2[1])
                rows = [
                    ("KLD([.4, .9, .2], [.5, .8, .12])", kldiv.KLD(conv(SEED_1[0]), conv(SEED_1[1]))),
                    ("KLD([[0, 1], [0, 0]], [[.6, .4], [.4, .6]])", kldiv.KLD(yt2, yp2)),
                    ("KLDivergence()(...)", kldiv.KLDivergence()(yt2, yp2)),
                    ("KLDivergence()(..., sample_weight=[.8, .2])",
                     kldiv.KLDivergence()(yt2, yp2, sample_weight=[0.8, 0.2])),
                    ("KLDivergence(reduction='sum')(...)", kldiv.KLDivergence(reduction="sum")(yt2, yp2)),
                    ("KLDivergence(reduction='none')(...)", kldiv.KLDivergence(reduction="none")(yt2, yp2)),
                ]
            for label, value in rows:
                out.write(f"    {label:<46} = {_fmt(value)}\n")
        except Exception as exc:  # report, keep going with the other backends
            failures += 1
            out.write(f"    FAILED: {type(exc).__name__}: {exc}\n")
    return failures


def prog_name(argv0: str | None = None) -> str:
    """How this command was invoked: ``python -m kldiv``, or the script's name (``kldiv``)."""
    base = os.path.basename(sys.argv[0] if argv0 is None else argv0)
    if not base or base == "__main__.py" or (base.endswith((".py", ".pyc")) and not base.endswith("-script.py")):
        return "python -m kldiv"
    for suffix in ("-script.pyw", "-script.py", ".exe"):
        base = base.removesuffix(suffix)
    return base


DESCRIPTION = """\
The Keras Kullback-Leibler divergence, sum(t * log(t / p), axis=-1) with t and p clipped to
[1e-7, 1], in the array library and on the device that hold the data.
"""


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + error
        raise _UsageError(message)


def _parser(prog: str) -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog=prog, usage=f"{prog} [-h] [--version] [COMMAND] ...", description=DESCRIPTION,
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog=f"exit status: 0 success, 1 a failure, 2 bad arguments\n"
                       f"more: '{prog} compute --help'")
    p.add_argument("--version", action="version", version=f"kldiv {__version__}")
    sub = p.add_subparsers(dest="command", title="commands", metavar="COMMAND")
    sub.add_parser("show", help="(the default) the seed examples' values, dtype and device on every "
                                "installed backend and device (NumPy, array-api-strict, PyTorch, JAX, "
                                "CuPy, Dask, TensorFlow), and for each missing backend the command "
                                "that installs it")
    sub.add_parser("compute", add_help=False,
                   help="the loss or the metric over two .npy files, batch by batch "
                        f"(see '{prog} compute --help')")
    return p


def main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> int:
    """Run the command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if prog is None:
        prog = prog_name() if argv is None else "python -m kldiv"
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "compute":
        from ._cli import compute_main

        return compute_main(args[1:], prog=f"{prog} compute")
    try:
        ns = _parser(prog).parse_args(args)
    except _UsageError as exc:
        print(f"{prog}: error: {exc} (see '{prog} --help')", file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    assert ns.command in (None, "show")
    return 1 if show() else 0


if __name__ == "__main__":
    sys.exit(main())
