"""The README's code blocks run, in order, as a new user would paste them; so do the
documentation's getting-started pages (docs/getting-started/*.md), each on its own.

Every fenced block is collected from each of those Markdown files:

- ``python`` blocks run one after the other in one fresh Python process per file (a
  subprocess, in an empty working directory), sharing their names, as pasted into one
  interpreter session.
- ``bash`` blocks made of ``python -m kldiv ...`` commands run there too, each command as a
  subprocess; other ``bash`` blocks (installing, ``nox``) are the set-up and CI commands that
  CI itself runs (``test_readme_test_command_is_ci``).
- A block tagged ``gpu`` (```` ```python gpu ````) needs an NVIDIA GPU: it runs only with
  ``KLDIV_README_GPU=1``, which ``nox -s gpu`` sets, and is a skip elsewhere.

A line ``expression  # -> text`` (or a line ``# -> text`` right after the expression) checks
that ``repr(expression)`` is ``text`` (whitespace aside), as the interactive interpreter
would print it; a ``# -> text`` comment on a ``bash`` command checks its standard output.

A block that needs an optional library that is not installed (``ModuleNotFoundError`` for a
module of ``OPTIONAL``, or a ``--backend`` that is not installed) is skipped with that
reason, and so are the later blocks that use a name only such a skipped block defines. Any
other error fails the block.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import tokenize
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Backend

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted(p for p in (ROOT / "docs" / "getting-started").glob("*.md")
                              if p.name != "index.md")]

# Libraries a README block may need that a light install does not have.
OPTIONAL = {
    "torch", "jax", "jaxlib", "dask", "distributed", "array_api_strict", "cupy", "dask_cuda",
    "keras", "tensorflow", "tf_keras", "triton", "tqdm", "rich",
}
# kldiv's --backend names -> the module each needs.
BACKEND_MODULES = {b.library: b.modname.partition(".")[0] for b in Backend}
TAGS = {"gpu"}
FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,})(?P<info>[^`]*)$")


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    tags: list[str]
    code: str
    source: str = "README.md"  # the file, relative to the repository root

    @property
    def id(self) -> str:
        return f"{self.source}:L{self.line}-{self.lang}" + "".join(f"-{t}" for t in self.tags)

    def at(self, k: int = 0) -> str:
        """``file:line`` of line ``k`` of the block (0: the fence)."""
        return f"{self.source}:{self.line + k}"


def parse_blocks(text: str, source: str = "README.md") -> list[Block]:
    """Fenced code blocks of a Markdown text, in order."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, info = m["fence"], m["info"].split()
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not re.match(rf"^ {{0,3}}{fence}`*\s*$", lines[j]):
            body.append(lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{source}:{i + 1}: code fence never closed")
        blocks.append(Block(i + 1, info[0] if info else "", info[1:], "\n".join(body) + "\n",
                            source))
        i = j + 1
    return blocks


def is_cli_block(block: Block) -> bool:
    """A bash block whose every command is ``python -m kldiv ...``."""
    commands = [c for c in (_strip_comment(line)[0] for line in block.code.splitlines()) if c]
    return bool(commands) and all(c.startswith("python -m kldiv ") for c in commands)


def runnable(block: Block) -> bool:
    return block.lang == "python" or (block.lang == "bash" and is_cli_block(block))


def _strip_comment(line: str) -> tuple[str, str | None]:
    """(command, expected output or None) of one bash line; ``# -> text`` is an expectation."""
    code, _, comment = line.partition("#")
    comment = comment.strip()
    return code.strip(), comment[2:].strip() if comment.startswith("->") else None


def _blocks(path: Path) -> list[Block]:
    return parse_blocks(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))


BLOCKS = _blocks(README)
RUNNABLE = [b for b in BLOCKS if runnable(b)]
CASES = [b for doc in DOCUMENTS for b in _blocks(doc) if runnable(b)]


# ------------------------------------------------------------------- in the subprocess
class _Skip(Exception):
    pass


def _normalize(text: str) -> str:
    return " ".join(text.split())


def _expectations(code: str) -> dict[int, str]:
    """Line (1-based, in the block) -> expected repr, from ``# -> text`` comments."""
    found = {}
    for tok in tokenize.generate_tokens(io.StringIO(code).readline):
        if tok.type == tokenize.COMMENT and tok.string.startswith("# ->"):
            found[tok.start[0]] = tok.string[4:].strip()
    return found


def _bound_names(tree: ast.Module) -> set[str]:
    """Names a block binds at its top level."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _check(expected: str, value: Any, where: str) -> None:
    got = repr(value)
    if _normalize(got) != _normalize(expected):
        raise AssertionError(f"{where}: the page says\n    {expected}\nbut it gives\n    {got}")


def _run_python(block: Block, ns: dict[str, Any]) -> None:
    tree = ast.parse(block.code, filename=block.at())
    expected = _expectations(block.code)
    checked: set[int] = set()
    source = block.code.splitlines()
    for stmt in tree.body:
        last = stmt.end_lineno or stmt.lineno
        if last < len(source) and source[last].strip().startswith("# ->"):
            last += 1  # a "# -> ..." line of its own, right after the statement
        lines = [n for n in range(stmt.lineno, last + 1) if n in expected]
        if not lines:
            continue
        if not isinstance(stmt, ast.Expr):
            raise AssertionError(f"{block.at(lines[0])}: '# ->' after a statement "
                                 "that is not an expression")
        where = block.at(lines[0])
        stmt.value = ast.Call(ast.Name("__readme_check__", ast.Load()),
                              [ast.Constant(expected[lines[0]]), stmt.value, ast.Constant(where)], [])
        checked.update(lines)
    if set(expected) - checked:
        raise AssertionError(f"{block.at(min(set(expected) - checked))}: '# ->' "
                             "inside a compound statement is not checked: move it")
    ast.fix_missing_locations(tree)
    ns["__readme_check__"] = _check
    exec(compile(tree, block.at(), "exec"), ns)


def _run_cli(block: Block) -> None:
    skipped = []
    for k, line in enumerate(block.code.splitlines(), start=1):
        command, expected = _strip_comment(line)
        if not command:
            continue
        argv = shlex.split(command)[3:]
        if "--backend" in argv:
            module = BACKEND_MODULES.get(argv[argv.index("--backend") + 1], "")
            if module and importlib.util.find_spec(module) is None:
                skipped.append(f"{block.at(k)}: {module} is not installed")
                continue
        out = subprocess.run([sys.executable, "-m", "kldiv", *argv], capture_output=True,
                             text=True, timeout=300)
        where = block.at(k)
        if out.returncode != 0:
            raise AssertionError(f"{where}: exit status {out.returncode}\n{out.stderr}")
        if expected is not None and _normalize(out.stdout) != _normalize(expected):
            raise AssertionError(f"{where}: the page says {expected!r}, it prints {out.stdout!r}")
    if skipped:
        raise _Skip("; ".join(skipped))


def run_blocks(blocks: list[Block], gpu: bool) -> dict[int, tuple[str, str]]:
    """Run ``blocks`` in order in this process: {fence line: (status, message)}."""
    ns: dict[str, Any] = {"__name__": "__main__"}
    only_in_skipped: dict[str, str] = {}  # name -> why the block that binds it was skipped
    results: dict[int, tuple[str, str]] = {}
    for block in blocks:
        if "gpu" in block.tags and not gpu:
            results[block.line] = ("skip", "a GPU code block of the docs: `nox -s gpu` runs it")
            continue
        try:
            if block.lang == "python":
                _run_python(block, ns)
            else:
                _run_cli(block)
        except _Skip as exc:
            results[block.line] = ("skip", str(exc))
        except ModuleNotFoundError as exc:
            top = (exc.name or "").split(".")[0]
            if top not in OPTIONAL:
                results[block.line] = ("fail", traceback.format_exc())
                continue
            reason = f"a code block of the docs needs {top}, which is not installed"
            results[block.line] = ("skip", reason)
            for name in _bound_names(ast.parse(block.code)) - set(ns):
                only_in_skipped.setdefault(name, f"{block.at()} was skipped ({reason})")
        except NameError as exc:
            name = getattr(exc, "name", None)
            if name in only_in_skipped:
                results[block.line] = ("skip", f"uses {name!r}: {only_in_skipped[name]}")
            else:
                results[block.line] = ("fail", traceback.format_exc())
        except BaseException:
            results[block.line] = ("fail", traceback.format_exc())
        else:
            results[block.line] = ("ok", "")
    return results


def _main(argv: list[str]) -> None:
    source, target = argv
    blocks = [Block(**b) for b in json.loads(Path(source).read_text())]
    results = run_blocks(blocks, gpu=os.environ.get("KLDIV_README_GPU") == "1")
    with contextlib.suppress(Exception):  # close Dask clients, Keras sessions, ... quietly
        sys.stdout.flush()
    Path(target).write_text(json.dumps(results))


# -------------------------------------------------------------------------- the tests
def _run_document(blocks: list[Block]) -> dict[int, tuple[str, str]]:
    """Run one file's blocks in a fresh interpreter: {fence line: (status, message)}."""
    with tempfile.TemporaryDirectory(prefix="kldiv-readme-") as tmp:
        source, target = Path(tmp, "blocks.json"), Path(tmp, "results.json")
        source.write_text(json.dumps([asdict(b) for b in blocks]))
        work = Path(tmp, "work")
        work.mkdir()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]))
        out = subprocess.run([sys.executable, str(Path(__file__).resolve()), str(source), str(target)],
                             cwd=work, capture_output=True, text=True, timeout=900, env=env)
        if not target.exists():
            pytest.fail(f"the run of {blocks[0].source} died (exit status {out.returncode}):\n"
                        f"{out.stdout[-3000:]}\n{out.stderr[-5000:]}")
        return {int(k): (v[0], v[1]) for k, v in json.loads(target.read_text()).items()}


@pytest.fixture(scope="module")
def document_results() -> dict[str, dict[int, tuple[str, str]]]:
    """Each file's results, computed the first time one of its blocks is asked for."""
    return {}


@pytest.mark.parametrize("block", CASES, ids=lambda b: b.id)
def test_doc_block(block: Block, document_results: dict[str, dict[int, tuple[str, str]]]) -> None:
    if block.source not in document_results:
        document_results[block.source] = _run_document([b for b in CASES if b.source == block.source])
    status, message = document_results[block.source][block.line]
    if status == "skip":
        pytest.skip(message)  # no file name: one line per reason in the skip summary
    assert status == "ok", f"{block.at()} ({block.lang}) failed:\n{message}"


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(ROOT)))
def test_doc_blocks_are_known(doc: Path) -> None:
    """Each block is Python, bash or text, with known tags only (a typo would hide a block)."""
    blocks = _blocks(doc)
    assert [b for b in blocks if b.lang == "python"], f"{doc.name} has no Python block"
    for b in blocks:
        assert b.lang in {"python", "bash", "text"}, f"{b.at()}: language {b.lang!r}"
        assert set(b.tags) <= TAGS, f"{b.at()}: unknown tags {b.tags}"
        if b.lang == "python":
            ast.parse(b.code, filename=b.at())


def test_readme_has_its_blocks() -> None:
    assert len([b for b in RUNNABLE if b.lang == "python"]) >= 10


def test_cpu_blocks_are_device_agnostic() -> None:
    """CPU blocks never hard-code a CUDA device (they would fail on a machine without one)."""
    for b in CASES:
        if "gpu" not in b.tags:
            assert not re.search(r"""device\s*=\s*["']cuda(:\d+)?["'](?!\s+if)|\.cuda\(\)"""
                                 r"|--device (cuda|gpu)", b.code), f"{b.at()} hard-codes a GPU"


def _ci_command() -> str:
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    commands = [line for line in lines if line and not line.startswith("#")
                and not line.startswith(("set ", "cd ", "export "))]
    assert len(commands) == 1, commands
    return commands[0]


def test_readme_test_command_is_ci() -> None:
    """The README's "what CI runs" command is .ci/run's command, character for character."""
    ci = _ci_command()
    bash = [line.strip() for b in BLOCKS if b.lang == "bash" for line in b.code.splitlines()]
    assert ci in bash, f"README.md has no bash line equal to .ci/run's {ci!r}"
    assert "nox" in ci and "-s" in ci


def test_readme_every_nox_session_named_exists() -> None:
    """Sessions the README (or .ci/run) names are sessions of noxfile.py."""
    sessions = set(re.findall(r"^def (\w+)\(session", (ROOT / "noxfile.py").read_text(), re.M))
    text = README.read_text() + _ci_command()
    named = set()
    for m in re.finditer(r"nox -s ((?:[a-z_]+ ?)+)", text):
        named.update(m.group(1).split())
    assert named and named <= sessions, named - sessions


def test_all_extra_has_every_cpu_quickstart_library() -> None:
    """``pip install -e '.[all]'`` installs each library the CPU blocks import."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(name: str, seen: set[str]) -> set[str]:
        reqs: set[str] = set()
        for req in extras[name]:
            m = re.match(r"kldiv\[(.+)\]", req)
            if m:
                for sub in m.group(1).split(","):
                    if sub not in seen:
                        seen.add(sub)
                        reqs |= expand(sub, seen)
            else:
                reqs.add(re.split(r"[\[<>=!~ ;]", req, maxsplit=1)[0].lower().replace("-", "_"))
        return reqs

    in_all = expand("all", {"all"}) | {"numpy", "array_api_compat"}
    heavy = {"tensorflow", "tensorflow_cpu", "tf_keras", "keras", "triton", "cupy_cuda12x"}
    assert not in_all & heavy, in_all & heavy
    quickstart_end = README.read_text().index("<!-- /section:core -->")
    imported = set()
    for b in RUNNABLE:
        if b.lang == "python" and "gpu" not in b.tags and b.line < README.read_text()[:quickstart_end].count("\n"):
            for node in ast.walk(ast.parse(b.code)):
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module:
                    imported.add(node.module.split(".")[0])
    imported -= {"kldiv", *sys.stdlib_module_names}
    assert imported, "no imports found in the quickstart"
    assert imported <= in_all, f"the quickstart imports {imported - in_all}, not in [all]"


if __name__ == "__main__":
    _main(sys.argv[1:])
