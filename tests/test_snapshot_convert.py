"""`convert -l SNAPSHOT` and images opened at an internal snapshot, against qemu-img 7.2.

Images are made with qemu-img create, qemu-io writes and `qemu-img snapshot -c`: several
snapshots with writes between them, snapshots taken before a grow and before a shrink (their
disk_size differs from the image's), an overlay with a backing file, extended L2, compressed
clusters.  `qcow2kit convert -l X -O raw` must give the bytes and the holes of
`qemu-img convert -l X -O raw`, for ids, names and the snapshot.id=/snapshot.name= forms.

What qemu-img 7.2 does, and so what is checked here:
- the short form `-l TEXT` is tried as an id first, then as a name (an id "2" beats a
  snapshot named "2"); the long form needs every key given to match; a key given twice keeps
  its last value; a long form wins over any short form given with it;
- the output has the image's *current* virtual size, whatever the snapshot's disk_size
  (qcow2_snapshot_load_tmp switches the L1 table only); the library's view at a snapshot has
  the snapshot's own size by default, and `qemu-img snapshot -a` on a copy (which reverts the
  size too) is its oracle;
- an unknown snapshot or an unknown key: exit 1, one line, no DST.
"""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from qemu import QEMU_IMG, cli_in_process, data_ranges, qemu_create, qemu_io, qemu_img, run, \
    same_file
from qcow2kit import Image, SnapshotNotFoundError, SnapshotRef
from qcow2kit.convert import convert_to_raw
from qcow2kit.errors import InvalidHeaderError
from qcow2kit.hostorder import HostOrderPlan
from qcow2kit.image.snapshots import read_snapshots
from qcow2kit.layout import offset_of
from qcow2kit.layout.header import SnapshotHeader

pytestmark = pytest.mark.qemu

KiB, MiB = 1024, 1024 * 1024


def _io(path: Path, *cmds: str) -> None:
    qemu_io(path, *cmds, refuse=("failed", "error"))


def _snap(path: Path, name: str) -> None:
    qemu_img("snapshot", "-c", name, str(path))


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("snapconv")
    out: dict[str, Path] = {}

    # Several snapshots with writes between them; a snapshot named "1" (whose id is 2) so
    # the id-before-name rule shows; a snapshot before a grow, one before a shrink.
    p = d / "multi.qcow2"
    qemu_create(p, "4M")
    _io(p, "write -P 0x11 0 192k", "write -P 0x12 1M 64k", "write -P 0x13 3M 4k")
    _snap(p, "first")
    _io(p, "write -P 0x21 64k 64k", "write -z 1M 64k", "write -P 0x22 2M 256k",
        "discard 3M 64k")
    _snap(p, "1")
    _io(p, "write -P 0x31 0 4k", "write -P 0x00 128k 64k")
    _snap(p, "before-grow")
    qemu_img("resize", "-q", str(p), "6M")
    _io(p, "write -P 0x41 5M 128k", "write -P 0x42 4M 4k")
    _snap(p, "grown")
    _io(p, "write -P 0x51 4M 64k")
    _snap(p, "dup")
    _io(p, "write -P 0x52 0 64k")
    _snap(p, "dup")          # two snapshots named "dup": the first one counts
    qemu_img("resize", "-q", "--shrink", str(p), "5M")
    _io(p, "write -P 0x61 4M 8k")
    out["multi"] = p

    # An overlay over a backing file: unallocated ranges of a snapshot read the backing file.
    base = d / "base.qcow2"
    qemu_create(base, "4M")
    _io(base, "write -P 0xb1 0 4M")
    ov = d / "overlay.qcow2"
    qemu_create(ov, "4M", backing="base.qcow2")
    _io(ov, "write -P 0xc1 64k 64k", "write -z 1M 128k")
    _snap(ov, "ov1")
    _io(ov, "write -P 0xc2 0 1M", "write -P 0xc3 3M 64k")
    _snap(ov, "ov2")
    _io(ov, "write -P 0xc4 2M 4k")
    out["overlay"] = ov

    # Extended L2: subcluster writes and zeroes between snapshots.
    ext = d / "extl2.qcow2"
    qemu_create(ext, "4M", "extended_l2=on", "cluster_size=64k")
    _io(ext, "write -P 0xe1 0 4k", "write -P 0xe2 8k 2k", "write -P 0xe3 1M 64k")
    _snap(ext, "e1")
    _io(ext, "write -z 1M 8k", "write -P 0xe4 4k 4k", "write -P 0xe5 2M 6k")
    _snap(ext, "e2")
    _io(ext, "write -P 0xe6 0 64k")
    out["extl2"] = ext

    # Compressed clusters, overwritten after the snapshot.
    comp = d / "compressed.qcow2"
    qemu_create(comp, "4M")
    _io(comp, "write -c -P 0xd1 0 64k", "write -c -P 0xd2 64k 64k", "write -P 0xd3 1M 64k",
        "write -c -P 0xd4 2M 64k")
    _snap(comp, "c1")
    _io(comp, "write -c -P 0xd5 3M 64k", "write -P 0xd6 2M 4k", "write -P 0xd8 0 4k")
    _snap(comp, "c2")
    _io(comp, "write -P 0xd7 64k 64k")
    out["compressed"] = comp
    return out


def _snapshots(path: Path) -> list[tuple[str, str]]:
    with Image.open(path) as img:
        return [(s.id, s.name) for s in img.snapshots]


def _qemu_convert(path: Path, dst: Path, spec: str) -> None:
    run([QEMU_IMG, "convert", "-l", spec, "-O", "raw", path, dst])


def _same_output(ours: Path, theirs: Path) -> None:
    assert same_file(ours, theirs)
    size = os.path.getsize(theirs)
    fa, fb = os.open(ours, os.O_RDONLY), os.open(theirs, os.O_RDONLY)
    try:
        # QEMU allocates the first 4 KiB of every file it creates (allocate_first_block):
        # no decision of convert's, so that block is left out.
        ra = [(max(s, 4096), e) for s, e in data_ranges(fa, size) if e > 4096]
        rb = [(max(s, 4096), e) for s, e in data_ranges(fb, size) if e > 4096]
        assert ra == rb
    finally:
        os.close(fa)
        os.close(fb)


def _forms(k: int, snaps: list[tuple[str, str]]) -> list[str]:
    """The -l values that name snapshot ``snaps[k]`` (id, name) in qemu-img's syntax."""
    sid, name = snaps[k]
    esc = name.replace(",", ",,")
    first_of_name = [n for _, n in snaps].index(name) == k
    forms = [f"snapshot.id={sid}", f"snapshot.id={sid},snapshot.name={esc}",
             sid]                                            # the short form tries ids first
    if first_of_name:
        forms.append(f"snapshot.name={esc}")
        if not any(s == name for s, _ in snaps):
            forms.append(name)
    return forms


@pytest.mark.parametrize("which", ["multi", "overlay", "extl2", "compressed"])
def test_convert_every_snapshot_like_qemu(images, which, tmp_path, capsys):
    path = images[which]
    snaps = _snapshots(path)
    assert len(snaps) >= 2
    checked = 0
    for k, (sid, name) in enumerate(snaps):
        theirs = tmp_path / f"theirs-{sid}.raw"
        _qemu_convert(path, theirs, f"snapshot.id={sid}")
        for j, form in enumerate(_forms(k, snaps)):
            ours = tmp_path / f"ours-{sid}-{j}.raw"
            extra = ["--order=guest"] if (k + j) % 3 == 2 else []
            rc, out, err = cli_in_process(capsys, "convert", "-l", form, "-m", str(1 + j % 4),
                                          *extra, "-O", "raw", str(path), str(ours))
            assert (rc, err) == (0, ""), (form, err)
            _same_output(ours, theirs)
            # qemu-img's own answer for this form is the same file
            again = tmp_path / "again.raw"
            _qemu_convert(path, again, form)
            assert same_file(again, theirs), form
            again.unlink()
            ours.unlink()
            checked += 1
    assert checked >= 2 * len(snaps)


def test_short_form_id_before_name(images, tmp_path, capsys):
    """"1" is snapshot 1 ("first"), not the snapshot named "1" (id 2); snapshot.name=1 is."""
    path = images["multi"]
    snaps = _snapshots(path)
    assert snaps[0] == ("1", "first") and snaps[1] == ("2", "1")
    for form, sid in (("1", "1"), ("snapshot.name=1", "2"), ("first", "1"),
                      ("snapshot.id=1,snapshot.id=2", "2"), ("dup", "5"),
                      ("snapshot.name=dup,", "5")):
        ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
        _qemu_convert(path, theirs, form)
        rc, _, err = cli_in_process(capsys, "convert", "-l", form, "-O", "raw", str(path),
                                    str(ours))
        assert (rc, err) == (0, "")
        _same_output(ours, theirs)
        with Image.open(path, snapshot=SnapshotRef(id=sid), snapshot_size="image") as img:
            assert img.read(0, img.size) == ours.read_bytes()
        ours.unlink()
        theirs.unlink()


def test_long_form_wins_over_short(images, tmp_path, capsys):
    path = images["multi"]
    for args in (["-l", "snapshot.id=3", "-l", "first"], ["-l", "first", "-l", "snapshot.id=3"]):
        ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
        run([QEMU_IMG, "convert", *args, "-O", "raw", path, theirs])
        rc, _, err = cli_in_process(capsys, "convert", *args, "-O", "raw", str(path), str(ours))
        assert (rc, err) == (0, "")
        _same_output(ours, theirs)
        ours.unlink()
        theirs.unlink()


def test_view_has_the_snapshots_own_size(images, tmp_path):
    """At its own size (before a grow: smaller; before a shrink: larger), a snapshot's view is
    what the image holds after `qemu-img snapshot -a` (which reverts the size too)."""
    path = images["multi"]
    with Image.open(path) as img:
        current = img.size
        sizes = {s.name: s.disk_size for s in img.snapshots}
    assert sizes["first"] == 4 * MiB and sizes["grown"] == 6 * MiB and current == 5 * MiB
    for name in ("first", "before-grow", "grown"):
        copy = tmp_path / "applied.qcow2"
        shutil.copy(path, copy)
        qemu_img("snapshot", "-a", name, str(copy))
        theirs = tmp_path / "applied.raw"
        run([QEMU_IMG, "convert", "-O", "raw", copy, theirs])
        ours = tmp_path / "view.raw"
        with Image.open(path, snapshot=name) as view:
            assert view.size == sizes[name] == os.path.getsize(theirs)
            assert view.snapshot is not None and view.snapshot.name == name
            convert_to_raw(view, ours)
        _same_output(ours, theirs)
        for f in (copy, theirs, ours):
            f.unlink()


def test_view_reads_through_the_one_reader_and_planner(images):
    """The view's L1 is the snapshot's; the host-order planner reads it from the L2 tables
    (a reverse map maps the active L1 only)."""
    path = images["overlay"]
    with Image.open(path) as img:
        snap = img.snapshots[0]
        active_l1 = img.l1_table.copy()
    with Image.open(path, snapshot=snap) as view:
        assert view.l2.l1_table_offset == snap.l1_table_offset
        assert view.l1_table.shape[0] == snap.l1_size
        assert (view.l1_table != active_l1).any()
        assert view.backing is not None and view.backing.snapshot is None   # type: ignore[union-attr]
        plan = HostOrderPlan(view)
        assert plan.source == "l2" and "snapshot" in plan.source_reason
        total = sum(int(r["length"].sum()) for _, r in plan)
        assert total > 0


def test_library_lookup_errors(images):
    path = images["multi"]
    with pytest.raises(SnapshotNotFoundError, match="'nope'") as e:
        Image.open(path, snapshot="nope")
    assert isinstance(e.value, LookupError) and str(path) in str(e.value)
    with pytest.raises(SnapshotNotFoundError):
        Image.open(path, snapshot=SnapshotRef(id="2", name="first"))
    with pytest.raises(SnapshotNotFoundError):
        Image.open(path, snapshot=SnapshotRef())
    with pytest.raises(ValueError, match="snapshot_size"):
        Image.open(path, snapshot="first", snapshot_size="other")  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["nope", "snapshot.id=9", "snapshot.id=2,snapshot.name=first",
                                  "snapshot.id=", "", "snapshot.name=first,x",
                                  "snapshot.foo=1", "snapshot.", "snapshot.id=1,=x"])
def test_errors_like_qemu(images, tmp_path, capsys, spec):
    path = images["multi"]
    theirs = tmp_path / "theirs.raw"
    q = run_status([QEMU_IMG, "convert", "-l", spec, "-O", "raw", str(path), str(theirs)])
    ours = tmp_path / "ours.raw"
    rc, out, err = cli_in_process(capsys, "convert", "-l", spec, "-O", "raw", str(path),
                                  str(ours))
    assert q == rc == 1
    assert not theirs.exists() and not ours.exists()
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2kit: "), err
    if spec.startswith("snapshot.") and ("=" not in spec.split(",")[-1] or "foo" in spec
                                         or spec.endswith("=x")):
        assert "unknown parameter" in err
    else:
        assert "can't find snapshot" in err


def run_status(argv: list[str]) -> int:
    return subprocess.run(argv, capture_output=True).returncode


def _corrupt_copy(src: Path, dst: Path, index: int, l1_offset: int) -> int:
    """A copy of src whose snapshot ``index`` has l1_table_offset ``l1_offset``; returns the
    byte offset of that field."""
    shutil.copy(src, dst)
    with Image.open(dst) as img:
        entry = img.snapshots[index].entry_offset
    at = entry + offset_of(SnapshotHeader, "l1_table_offset")
    with open(dst, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(">Q", l1_offset))
    return at


@pytest.mark.parametrize("bad", ["misaligned", "past-eof", "out-of-range"])
def test_corrupt_snapshot_l1_offset(images, tmp_path, capsys, bad):
    path = images["overlay"]
    shutil.copy(path.parent / "base.qcow2", tmp_path / "base.qcow2")
    img_path = tmp_path / "overlay.qcow2"
    with Image.open(path) as img:
        good = img.snapshots[0].l1_table_offset
        file_size = img.src.size
    value = {"misaligned": good + 512, "past-eof": (file_size + 0xFFFF) // 0x10000 * 0x10000,
             "out-of-range": 1 << 60}[bad]
    at = _corrupt_copy(path, img_path, 0, value)
    dst = tmp_path / "out.raw"
    rc, _, err = cli_in_process(capsys, "convert", "-l", "snapshot.id=1", "-O", "raw",
                                str(img_path), str(dst))
    assert rc == 1 and not dst.exists()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert "l1_table_offset" in err and f"at offset {at:#x}" in err and f"{value:#x}" in err
    assert str(img_path) in err
    if bad == "misaligned":   # qemu-img refuses it too (it reads a table past the end as zeros)
        q = run_status([QEMU_IMG, "convert", "-l", "snapshot.id=1", "-O", "raw", str(img_path),
                        str(tmp_path / "q.raw")])
        assert q == 1 and not (tmp_path / "q.raw").exists()
    with pytest.raises(InvalidHeaderError) as e:
        Image.open(img_path, snapshot="ov1")
    assert e.value.field == "l1_table_offset" and e.value.offset == at
    # the other snapshot and the active state still open
    with Image.open(img_path, snapshot="ov2") as view:
        assert view.read(0, 4096)
    with Image.open(img_path) as img:
        assert len(read_snapshots(img.src, img.header)) == 2


def test_factory_snapshots_like_qemu(factory_images, qemu_raw, tmp_path, capsys):
    """Every snapshot of every factory image, by name, to raw like qemu-img -l."""
    checked = 0
    for name, case in sorted(factory_images.items()):
        if case.encrypted or not case.snapshots:
            continue
        for k, snap in enumerate(dict.fromkeys(case.snapshots)):
            ref = qemu_raw(case, snap)
            ours = tmp_path / f"{name}-{k}.raw"
            rc, _, err = cli_in_process(capsys, "convert", "-l",
                                        f"snapshot.name={snap.replace(',', ',,')}", "-O", "raw",
                                        str(case.path), str(ours))
            assert (rc, err) == (0, ""), (name, snap, err)
            assert same_file(ours, ref), (name, snap)
            ours.unlink()
            checked += 1
    assert checked >= 3
