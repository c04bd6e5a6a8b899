"""`qcow2kit snapshot -l` against `qemu-img snapshot -l`: the same table, the same exit status,
on every factory image, and the same refusals."""
from __future__ import annotations

import subprocess

import pytest

from qemu import QEMU_IO, cli_process, open_args, qemu_create, qemu_img

pytestmark = pytest.mark.qemu


def test_factory_images_list_as_qemu_does(factory_images):
    with_snapshots = 0
    # every image with snapshots, and a few without (encrypted, data file, v2, extended L2)
    cases = {n: c for n, c in factory_images.items()
             if c.snapshots or n in ("aes", "luks", "datafile", "v2", "extl2_16k", "cs512")}
    for name, case in sorted(cases.items()):
        ours = cli_process("snapshot", "-l", case.path)
        # in the image's directory: QEMU 7.2 opens a relative data-file name from there only
        # (qemu-img snapshot takes no -f; an encrypted image needs its secret, qcow2kit not)
        where = open_args(case) if case.encrypted else [case.path]
        theirs = qemu_img("snapshot", "-l", *where, ok=None, cwd=case.path.parent)
        if theirs.returncode != 0:
            assert ours.returncode == 1, name
            continue
        assert (ours.returncode, ours.stdout) == (0, theirs.stdout), name
        with_snapshots += "Snapshot list:" in theirs.stdout
    assert with_snapshots >= 3          # the factory's snapshot cases were compared


def test_names_dates_and_clocks_of_new_snapshots(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_create(img, "4M")
    for tag in ("first", "a much longer tag than the column", "x" * 40):
        qemu_img("snapshot", "-c", tag, img)
    ours = cli_process("snapshot", "-l", img)
    assert ours.returncode == 0
    assert ours.stdout == qemu_img("snapshot", "-l", img).stdout
    assert ours.stdout.count("\n") == 5


def test_no_snapshots_prints_nothing(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_create(img, "1M")
    ours = cli_process("snapshot", "-l", img)
    assert (ours.returncode, ours.stdout, ours.stderr) == (0, "", "")
    assert qemu_img("snapshot", "-l", img).stdout == ""


def test_refusals(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_create(img, "1M")
    before = img.read_bytes()
    missing = cli_process("snapshot", "-l", tmp_path / "missing.qcow2")
    assert missing.returncode == 1 and "missing.qcow2" in missing.stderr
    mixed = cli_process("snapshot", "-l", "-c", "x", img)
    assert mixed.returncode == 1 and "Cannot mix '-l', '-a', '-c', '-d'" in mixed.stderr
    for op in ("-c", "-a", "-d"):
        p = cli_process("snapshot", op, "x", img)
        assert p.returncode == 1 and f"qemu-img snapshot {op}" in p.stderr
    assert img.read_bytes() == before


def test_image_in_use_by_a_writer(tmp_path):
    img = tmp_path / "a.qcow2"
    qemu_create(img, "1M")
    qemu_img("snapshot", "-c", "s", img)
    io = subprocess.Popen([QEMU_IO, "-f", "qcow2", str(img)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        io.stdin.write("read 0 512\n")
        io.stdin.flush()
        io.stdout.readline()                      # qemu-io has the image open
        theirs = qemu_img("snapshot", "-l", img, ok=None)
        ours = cli_process("snapshot", "-l", img)
        assert theirs.returncode == ours.returncode == 1
        assert 'Failed to get shared "write" lock' in ours.stderr
        shared = cli_process("snapshot", "-l", "-U", img)
        assert shared.returncode == 0
        assert shared.stdout == qemu_img("snapshot", "-l", "-U", img).stdout
    finally:
        io.communicate("quit\n", timeout=30)
