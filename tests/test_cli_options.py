"""No option value makes the CLI crash (issue 13): a property test over every command's options.

Whatever value hypothesis puts in an option (numbers of every form and size, negative,
hex, fractions, garbage, empty), each command either succeeds or fails with exit status 1
and one error line (after the command's usage block for a usage error): never a traceback,
never a warning from numpy, never another exit status.  The image is one tiny qemu-img
image; a convert target is a fresh name in a temporary directory.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import pytest
from qemu import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2kit.cli.main import main as cli_main

qemu = pytest.mark.qemu

NUMBERS = st.one_of(
    st.integers(min_value=-(1 << 70), max_value=1 << 70).map(str),
    st.integers(min_value=0, max_value=1 << 66).map(hex),
    st.sampled_from(["0", "1", "511", "512", "4095", "64K", "63K", "1M", "0x10000", "1.5k",
                     "1.5", "8E", "7.9E", "9223372036854775807", "9223372036854775808",
                     "1e3", "", " ", "0x", "-0", "1 M", "nan", "inf", "1G", "16T", "1P"]),
    st.from_regex(r"\A[0-9]{1,4}(\.[0-9]{0,3})?[bkKmMgGtTpPeEqQ]?\Z", fullmatch=True),
    st.text(max_size=6),
)

# command -> (options taking a value, flags, needs a target)
OPTIONS: dict[tuple[str, ...], tuple[list[str], list[str], bool]] = {
    ("map",): (["--start-offset", "--max-length", "--memory"],
               ["--output=json", "--order=host", "--all"], False),
    # (not -r: a rate of a few bytes per second is a valid, very long copy)
    ("convert",): (["--memory", "-m", "-S", "-l"], ["-p", "--order=guest", "--fsync"], True),
    ("bench", "order"): (["--memory", "--max-request", "--model"],
                         ["--no-measure", "--output=json"], False),
    ("rmap", "show"): (["--memory"], ["--output=json"], False),
    ("rmap", "verify"): (["--memory"], [], False),
    ("info",): ([], ["--output=json", "--backing-chain"], False),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli-options")
    img = d / "tiny.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", img, "4M"])
    run(["qemu-io", "-c", "write -P 7 64k 192k", "-c", "write -z 1M 64k", img])
    return img


def _run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # a numpy RuntimeWarning fails the test
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli_main(argv)
    return rc, err.getvalue()


def _check(argv: list[str]) -> None:
    rc, err = _run(argv)
    assert rc in (0, 1), (argv, rc, err)
    assert "Traceback" not in err and "Warning" not in err, (argv, err)
    if rc == 1 and not (argv[:2] == ["rmap", "verify"] and err == ""):  # "no map": an answer
        lines = err.splitlines()
        assert lines and lines[-1].startswith("qcow2kit: "), (argv, err)
        assert len(lines) == 1 or lines[0].startswith("usage: "), (argv, err)


@qemu
@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_no_option_value_crashes(tiny, tmp_path, data):
    command = data.draw(st.sampled_from(sorted(OPTIONS)))
    valued, flags, target = OPTIONS[command]
    argv = list(command)
    for opt in data.draw(st.lists(st.sampled_from(valued), unique=True)) if valued else []:
        argv.append(f"{opt}={data.draw(NUMBERS)}" if opt.startswith("--")
                    else opt)
        if not opt.startswith("--"):
            argv.append(data.draw(NUMBERS))
    argv += data.draw(st.lists(st.sampled_from(flags), unique=True)) if flags else []
    argv.append(str(tiny))
    if target:
        dst = tmp_path / f"out-{data.draw(st.integers(0, 1 << 30))}.raw"
        argv.append(str(dst))
    _check(argv)


@pytest.mark.parametrize("argv", [
    ["demo", "--size", "1"], ["demo", "--size", "0"], ["demo", "--size", "-5"],
    ["demo", "--size", "x"], ["demo", "--size", "1P"], ["demo", "--seed", "-1"],
    ["demo", "--seed", "1.5"], ["demo", "--size", "1M", "--seed", "99999999999"],
])
def test_demo_bad_values(argv):
    rc, err = _run(argv)
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("qcow2kit: demo: "), err


def test_demo_smallest_size_runs():
    rc, err = _run(["demo", "--size", "1M"])
    assert rc == 0, err
