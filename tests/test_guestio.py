"""GuestFile: an image's guest content as a read-only binary file (io.RawIOBase).

The oracle is QEMU: what the standard library reads through GuestFile must be what
`qemu-img convert -O raw` writes, byte for byte, and a tar archive or partition table written
into a qcow2 chain with qemu-img/qemu-io must read back through tarfile / struct unchanged.
The file semantics (seek past the end, whence, closing) are compared with a real file's.
"""
from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qemu import QEMU_IMG, QEMU_IO, run, sha256_file
import qcow2kit
from qcow2kit import GuestFile, open_guest
from qcow2kit.image import RawImage
from qcow2kit.source import open_source

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
KiB = 1024
MiB = 1024 * KiB

# Chains and layouts worth streaming: backing chains (qcow2, raw, shorter/longer backing),
# compressed clusters, subclusters over a backing file, an external data file, a size that
# is not a multiple of the cluster size, an empty disk.
STREAM_CASES = ["chain3", "backing_raw", "backing_smaller", "backing_larger", "compressed_zlib",
                "extl2_backing", "datafile", "size_unaligned", "size0"]


# ------------------------------------------------------------------------------------------
# Semantics of the file object (committed fixture, no QEMU needed)


def test_is_a_readable_seekable_raw_io():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        f = GuestFile(img)
        assert isinstance(f, io.RawIOBase)
        assert f.readable() and f.seekable() and not f.writable()
        assert len(f) == img.size == f.size
        assert f.name == img.filename and f.mode == "rb"
        assert f.tell() == 0
        assert f.read(4096) == img.read(0, 4096) and f.tell() == 4096
        with pytest.raises(io.UnsupportedOperation):
            f.write(b"x")
        with pytest.raises(io.UnsupportedOperation):
            f.fileno()
        with pytest.raises(io.UnsupportedOperation):
            f.truncate(0)


def test_seek_whence_and_past_the_end():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        f = GuestFile(img)
        size = img.size
        assert f.seek(100) == 100
        assert f.seek(50, os.SEEK_CUR) == 150
        assert f.seek(-10, os.SEEK_END) == size - 10
        assert f.read(100) == img.read(size - 10, 10)          # a short read at the end
        assert f.read(100) == b"" and f.tell() == size
        assert f.seek(size + 12345) == size + 12345             # allowed, like a file
        assert f.read(10) == b"" and f.readall() == b"" and f.read() == b""
        assert f.readinto(bytearray(10)) == 0
        assert f.tell() == size + 12345
        assert f.seek(5, os.SEEK_END) == size + 5
        with pytest.raises(ValueError, match="negative seek position"):
            f.seek(-1)
        with pytest.raises(ValueError, match="negative seek position"):
            f.seek(-size - 1, os.SEEK_END)
        with pytest.raises(ValueError, match="whence"):
            f.seek(0, 3)
        assert f.tell() == size + 5                              # failed seeks move nothing


def test_readinto_fills_what_is_left_and_counts_it():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        f = GuestFile(img)
        f.seek(img.size - 300)
        buf = bytearray(1000)
        assert f.readinto(buf) == 300
        assert bytes(buf[:300]) == img.read(img.size - 300, 300) and buf[300:] == bytes(700)
        assert f.readinto(buf) == 0
        f.seek(0)
        mv = memoryview(bytearray(8192)).cast("I")               # any writable buffer
        assert f.readinto(mv) == 8192 and mv.tobytes() == img.read(0, 8192)


def test_huge_reads_allocate_only_what_the_disk_holds():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        f = GuestFile(img)
        f.seek(img.size - 7)
        assert f.read(1 << 62) == img.read(img.size - 7, 7)
        f.seek(0)
        assert f.read() == img.read(0, img.size) == (f.seek(0), f.readall())[1]


def test_read_and_readall_from_the_middle():
    with qcow2kit.open(FIXTURES / "extl2.qcow2") as img:
        f = GuestFile(img)
        f.seek(img.size // 3)
        assert f.read(-1) == img.read(img.size // 3, img.size - img.size // 3)
        assert f.tell() == img.size
        f.seek(1000)
        assert f.read(None) == img.read(1000, img.size - 1000)


def test_closing_a_borrowed_view_leaves_the_image_open():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        with GuestFile(img) as f:
            f.read(10)
        assert f.closed and not img.closed
        assert img.read(0, 10) == GuestFile(img).read(10)


def test_open_guest_owns_its_image():
    with open_guest(FIXTURES / "v2_overlay.qcow2") as f:
        img = f.image
        assert f.owns_image and not img.closed
        data = f.read()
    assert f.closed and img.closed
    with qcow2kit.open(FIXTURES / "v2_overlay.qcow2") as ref:
        assert data == ref.read(0, ref.size)


def test_open_guest_takes_the_open_options():
    with open_guest(FIXTURES / "v2_overlay.qcow2", source="mmap", l2_cache_bytes=4096,
                    follow_backing=False, max_backing_depth=1) as f:
        with qcow2kit.open(FIXTURES / "v2_overlay.qcow2", follow_backing=False) as ref:
            assert f.read() == ref.read(0, ref.size)


def test_every_operation_after_close_raises_value_error():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        f = GuestFile(img)
        f.close()
        f.close()                                               # twice is fine
        for op in (lambda: f.read(1), lambda: f.read(), lambda: f.readall(),
                   lambda: f.readinto(bytearray(1)), lambda: f.seek(0), lambda: f.tell(),
                   lambda: f.readable(), lambda: f.seekable(), lambda: f.writable(),
                   lambda: f.readline(), lambda: io.BufferedReader(f)):
            with pytest.raises(ValueError, match="closed"):
                op()


def test_a_view_of_a_closed_image_refuses_to_read():
    img = qcow2kit.open(FIXTURES / "plain4k.qcow2")
    f = GuestFile(img)
    img.close()
    with pytest.raises(ValueError, match="I/O operation on closed image"):
        f.read(1)
    with pytest.raises(ValueError, match="I/O operation on closed image"):
        GuestFile(img)


def test_a_failed_view_does_not_close_the_image():
    img = qcow2kit.open(FIXTURES / "plain4k.qcow2")
    img.close()
    with pytest.raises(ValueError):
        GuestFile(img, owns_image=True)
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        f = GuestFile(img, owns_image=True)
        del f                                                   # IOBase.__del__ closes it
        assert img.closed


def test_a_disk_of_size_zero_is_still_a_true_file_object(tmp_path):
    raw = tmp_path / "empty.raw"
    raw.write_bytes(b"")
    with RawImage(open_source(raw), str(raw)) as layer:
        f = GuestFile(layer)
        assert len(f) == 0 and bool(f) and f.read() == b"" and f.readinto(bytearray(4)) == 0


def test_raw_layers_have_a_view_too(tmp_path):
    raw = tmp_path / "disk.raw"
    data = random.Random(7).randbytes(300 * KiB + 11)
    raw.write_bytes(data)
    with RawImage(open_source(raw), str(raw)) as layer:
        f = GuestFile(layer)
        assert len(f) == len(data) and f.read() == data
        f.seek(-11, os.SEEK_END)
        assert f.read(1 << 40) == data[-11:]
        f.close()
        assert not layer.closed
    assert layer.closed
    with pytest.raises(ValueError, match="closed image"):
        GuestFile(layer)


# ------------------------------------------------------------------------------------------
# Against QEMU: the standard library reads a qcow2 chain through GuestFile


@pytest.mark.qemu
@pytest.mark.parametrize("name", STREAM_CASES)
def test_copyfileobj_equals_qemu_img_convert(factory_images, qemu_raw, tmp_path, name):
    case = factory_images[name]
    out = tmp_path / "out.raw"
    with open_guest(case.path) as f, open(out, "wb") as dst:
        shutil.copyfileobj(f, dst, 256 * KiB + 512)             # not a multiple of any cluster
    assert out.read_bytes() == qemu_raw(case).read_bytes()


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["chain3", "compressed_zlib"])
def test_hashlib_loop_equals_qemu_img_convert(factory_images, qemu_raw, name):
    case = factory_images[name]
    h = hashlib.sha256()
    with qcow2kit.open(case.path) as img, io.BufferedReader(GuestFile(img)) as f:
        for chunk in iter(lambda: f.read(64 * KiB + 1), b""):
            h.update(chunk)
    assert h.hexdigest() == sha256_file(qemu_raw(case)) == case.sha256


def _positions(size: int) -> st.SearchStrategy[int]:
    near = st.builds(lambda c, d: max(0, c * 65536 + d), st.integers(0, size // 65536 + 2),
                     st.integers(-600, 600))
    return st.one_of(st.integers(0, size + 3 * 65536), near, st.sampled_from([0, size, size + 1]))


@pytest.mark.qemu
@pytest.mark.parametrize("name", ["chain3", "extl2_backing", "size_unaligned"])
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_buffered_random_access_matches_the_raw_file(factory_images, qemu_raw, name, data):
    """Random seeks (all whences, past the end) and reads through io.BufferedReader, step by
    step the same as the same calls on qemu-img's raw output opened with open()."""
    case = factory_images[name]
    raw = qemu_raw(case)
    size = raw.stat().st_size
    buffer_size = data.draw(st.sampled_from([512, 4096, 65536, 100_000]), label="buffer_size")
    with qcow2kit.open(case.path) as img, \
            io.BufferedReader(GuestFile(img), buffer_size=buffer_size) as ours, \
            open(raw, "rb") as ref:
        for _ in range(data.draw(st.integers(1, 25), label="steps")):
            op = data.draw(st.sampled_from(["seek", "read", "read1", "readinto", "readline"]),
                           label="op")
            if op == "seek":
                target = data.draw(_positions(size), label="target")
                whence = data.draw(st.sampled_from([0, 1, 2]), label="whence")
                offset = target - (0, ref.tell(), size)[whence]
                assert ours.seek(offset, whence) == ref.seek(offset, whence) == target
            else:
                n = data.draw(st.integers(0, 200_000), label="n")
                if op == "read":
                    assert ours.read(n) == ref.read(n)
                elif op == "read1":
                    # read1 may return less than asked, and how much depends on buffering
                    got = ours.read1(n)
                    assert got == ref.read(len(got))
                elif op == "readinto":
                    a, b = bytearray(n), bytearray(n)
                    assert ours.readinto(a) == ref.readinto(b)
                    assert a == b
                else:
                    assert ours.readline(n) == ref.readline(n)
            assert ours.tell() == ref.tell()


def _make_tar(rng: random.Random) -> bytes:
    bio = io.BytesIO()
    with tarfile.open(fileobj=bio, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for i, size in enumerate([0, 1, 511, 512, 65536, 65537, 300_000, 1_000_003]):
            info = tarfile.TarInfo(f"dir/file{i}.bin")
            info.size = size
            info.mtime = 1_700_000_000
            tar.addfile(info, io.BytesIO(rng.randbytes(size)))
        info = tarfile.TarInfo("dir/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "file1.bin"
        tar.addfile(info)
    raw = bio.getvalue()
    return raw + bytes(-len(raw) % MiB)


@pytest.mark.qemu
def test_tarfile_reads_a_tar_stored_in_a_qcow2_chain(tmp_path):
    """A tar written by Python's tarfile, stored by QEMU across two layers (compressed 4 KiB
    clusters in the base, the second half written into the overlay with qemu-io), reads back
    through tarfile.open(fileobj=GuestFile) member for member."""
    tar_bytes = _make_tar(random.Random(13))
    half = len(tar_bytes) // 2 // 4096 * 4096 + 1234              # not cluster aligned
    base_raw = tmp_path / "base.raw"
    base_raw.write_bytes(tar_bytes[:half] + bytes(len(tar_bytes) - half))
    run([QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
                 "cluster_size=4096", base_raw, tmp_path / "base.qcow2"])
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                 "qcow2", tmp_path / "top.qcow2"], cwd=tmp_path)
    tail = tmp_path / "tail.bin"
    tail.write_bytes(tar_bytes[half:])
    run([QEMU_IO, "-f", "qcow2", "-c",
                 f"write -s {tail} {half} {len(tar_bytes) - half}", tmp_path / "top.qcow2"])

    expected = tarfile.open(fileobj=io.BytesIO(tar_bytes))
    with open_guest(tmp_path / "top.qcow2") as f, tarfile.open(fileobj=f) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == expected.getnames()
        for m in members:
            if m.isfile():
                got = tar.extractfile(m)
                assert got is not None
                want = expected.extractfile(m.name)
                assert want is not None and got.read() == want.read(), m.name
            else:
                assert m.issym() and m.linkname == "file1.bin"
    # streaming mode (no seeks) reads the same
    with open_guest(tmp_path / "top.qcow2") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        assert [m.name for m in tar] == expected.getnames()


def _mbr(entries: list[tuple[int, int, int, int]]) -> bytes:
    """A classic MBR: 446 bytes of boot code, four 16-byte entries, 0x55 0xAA."""
    table = b"".join(struct.pack("<B3sB3sII", boot, b"\0\0\0", ptype, b"\0\0\0", lba, count)
                     for boot, ptype, lba, count in entries)
    table += bytes(16 * (4 - len(entries)))
    return b"\xeb\x63\x90" + bytes(443) + table + b"\x55\xaa"


@pytest.mark.qemu
def test_partition_table_reads_at_0x1be(tmp_path):
    """An MBR written with qemu-io into an overlay whose base holds other data reads back,
    entry by entry, at 0x1BE through a buffered GuestFile."""
    entries = [(0x80, 0x83, 2048, 8192), (0x00, 0x07, 10240, 6144)]
    sector0 = tmp_path / "mbr.bin"
    sector0.write_bytes(_mbr(entries))
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "8M"])
    run([QEMU_IO, "-f", "qcow2", "-c", "write -P 0x5a 1M 4M",
                 tmp_path / "base.qcow2"])
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                 "qcow2", tmp_path / "top.qcow2"], cwd=tmp_path)
    run([QEMU_IO, "-f", "qcow2", "-c", f"write -s {sector0} 0 512",
                 tmp_path / "top.qcow2"])
    with open_guest(tmp_path / "top.qcow2") as raw, io.BufferedReader(raw) as f:
        f.seek(0x1FE)
        assert f.read(2) == b"\x55\xaa"
        f.seek(0x1BE)
        got = [struct.unpack("<B3sB3sII", f.read(16)) for _ in range(4)]
        assert [(g[0], g[2], g[4], g[5]) for g in got] == entries + [(0, 0, 0, 0)] * 2
        first_lba = got[0][4]
        f.seek(first_lba * 512)
        assert f.read(4) == b"\x5a" * 4                           # from the base image
        assert f.tell() == first_lba * 512 + 4
