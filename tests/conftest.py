"""Shared fixtures: qcow2 images built by the real qemu-img / qemu-io (see factory.py).

The images of `factory_images` are shared by the whole session: treat them as read-only
(QEMU would even repair the dirty ones on a read-write open). A test that writes uses
`clone_image(case)` to get its own copy.
"""
from __future__ import annotations

import hashlib
import subprocess
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import factory  # noqa: E402  (needs the sys.path entry above)
from qemu import have_qemu, qemu_convert_raw  # noqa: E402

QEMU_MISSING = ("qemu-img/qemu-io not found on PATH (install qemu-utils); "
                "tests that need QEMU-built images are skipped")


def pytest_configure(config):
    config.addinivalue_line("markers", "qemu: needs qemu-img / qemu-io (skipped when missing)")


def pytest_collection_modifyitems(config, items):
    if have_qemu():
        return
    skip = pytest.mark.skip(reason=QEMU_MISSING)
    for item in items:
        if "qemu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def factory_images(tmp_path_factory) -> dict[str, factory.ImageCase]:
    """Every factory case by name, built once per session."""
    if not have_qemu():
        pytest.skip(QEMU_MISSING)
    return factory.build_all(tmp_path_factory.mktemp("qcow2-factory"))


@pytest.fixture(scope="session")
def qemu_raw(tmp_path_factory, factory_images):
    """Function: case (or case name) [, snapshot name] -> Path of `qemu-img convert -O raw`
    output, converted once per session."""
    outdir = tmp_path_factory.mktemp("qemu-raw")
    cache: dict[tuple[str, str | None], Path] = {}
    lock = threading.Lock()

    def convert(case, snapshot: str | None = None) -> Path:
        if isinstance(case, str):
            case = factory_images[case]
        key = (case.name, snapshot)
        with lock:
            if key not in cache:
                extra = ["-l", f"snapshot.name={snapshot}"] if snapshot is not None else []
                suffix = ("" if snapshot is None else
                          ".snap-" + hashlib.sha1(snapshot.encode()).hexdigest()[:10])
                dst = outdir / f"{case.name}{suffix}.raw"
                cache[key] = qemu_convert_raw(case, dst, extra)
            return cache[key]

    return convert


@pytest.fixture
def clone_image(tmp_path):
    """Function: case -> a private, writable copy of the case (its whole builder directory)."""
    def clone(case: factory.ImageCase) -> factory.ImageCase:
        return factory.clone_case(case, tmp_path)
    return clone


@pytest.fixture
def small_tmpfs(tmp_path):
    """An 8 MiB tmpfs (root only; skipped otherwise): a target that runs out of space."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8M", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)
