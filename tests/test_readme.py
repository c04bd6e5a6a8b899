"""The README's set-up commands are the ones CI runs; its Python examples import and run."""

import ast
import io
import re
import shutil
import tarfile
from pathlib import Path

import pytest

import qcow2kit

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all("\n" not in c for c in cmds)
    assert "qcow2kit demo" in cmds[0]
    assert "pytest" in cmds[1] and "qemu-utils" in cmds[1]


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


# ------------------------------------------------------------------------------------------
# The README's Python examples: every name they import exists, and the examples run.


def _readme_python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.+?)\n```", text, flags=re.S)


def _import_statements(block: str) -> list[str]:
    """The import statements of a code block, as source (multi-line ones included)."""
    tree = ast.parse(block)
    return [ast.unparse(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Import, ast.ImportFrom))]


def _run_imports(block: str) -> list[str]:
    done = []
    for stmt in _import_statements(block):
        exec(compile(stmt, "<README import>", "exec"), {})   # ImportError if a name is missing
        done.append(stmt)
    return done


def test_readme_python_imports_are_importable():
    blocks = _readme_python_blocks()
    assert len(blocks) >= 3, "the Library section's examples were not found"
    done = [stmt for block in blocks for stmt in _run_imports(block)]
    # the extractor sees what the README shows (a guard against a regex that finds nothing)
    for expected in ("import qcow2kit", "from qcow2kit.mapping import iter_extents, map_batches",
                     "from qcow2kit.hostorder import read_host_order, zero_ranges",
                     "from qcow2kit import GuestFile, open_guest"):
        assert expected in done, (expected, done)


def test_readme_import_check_can_fail():
    with pytest.raises(ImportError):
        _run_imports("import qcow2kit\nfrom qcow2kit import NoSuchThing\n")
    with pytest.raises(ImportError):
        _run_imports("if True:\n    from qcow2kit.mapping import (iter_extents,\n"
                     "                                  no_such_function)\n")


@pytest.mark.qemu
def test_readme_library_examples_run(tmp_path, monkeypatch, capsys):
    """Every ```python block of the README, run in order on small images with the names the
    README uses (disk.qcow2, overlay.qcow2 over a backing file, backup.qcow2 holding a tar)."""
    from qemu import QEMU_IMG, run
    fixtures = ROOT / "fixtures"
    shutil.copy(fixtures / "plain4k.qcow2", tmp_path / "disk.qcow2")
    run([QEMU_IMG, "snapshot", "-c", "before-upgrade", tmp_path / "disk.qcow2"])
    shutil.copy(fixtures / "plain4k.qcow2", tmp_path / "plain4k.qcow2")
    shutil.copy(fixtures / "v2_overlay.qcow2", tmp_path / "overlay.qcow2")  # backing: plain4k
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w") as tar:
        info = tarfile.TarInfo("hello.txt")
        info.size = 6
        tar.addfile(info, io.BytesIO(b"hello\n"))
    raw = tmp_path / "backup.raw"
    raw.write_bytes(bio.getvalue().ljust(1 << 20, b"\0"))
    run([QEMU_IMG, "convert", "-f", "raw", "-O", "qcow2", raw, tmp_path / "backup.qcow2"])
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for i, block in enumerate(_readme_python_blocks()):
        exec(compile(block, f"<README python block {i}>", "exec"), namespace)
    out = capsys.readouterr().out
    assert "['hello.txt']" in out
    with open(tmp_path / "flat.raw", "rb") as f, qcow2kit.open(tmp_path / "overlay.qcow2") as img:
        assert f.read() == img.read(0, img.size)


# ------------------------------------------------------------------------------------------
# The layer drawing of the README's Layout section is the import-linter contract.


def test_readme_layers_are_the_import_contract():
    tomllib = pytest.importorskip("tomllib")
    contract = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    layers = contract["contracts"][0]["layers"]
    text = (ROOT / "README.md").read_text()
    block = text.split("The layers, top to bottom", 1)[1].split("```\n", 2)[1]
    drawn = [re.sub(r"\s{2,}\S.*$", "", line).strip() for line in block.splitlines()]
    expected = [" | ".join(m.strip().removeprefix("qcow2kit.") for m in layer.split("|"))
                for layer in layers]
    assert [d for d in drawn if d] == expected
