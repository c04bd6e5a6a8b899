"""The persistent reverse map (``qcow2kit rmap``, docs/rmap-extension.md) against the real QEMU.

Every image here is made by qemu-img / qemu-io in the test's own directory, and every claim of
the format document is checked from QEMU's side:

* building a map leaves an image that ``qemu-img check`` finds clean, that converts, reads and
  describes itself (``qemu-img info``) exactly as before; the map itself is decoded here from
  the document (not through qcow2kit) and compared with ``qemu-img map``;
* any read-write open by QEMU makes the map stale, and everything that plans host-order reads
  notices it; a rebuild makes it valid again;
* ``verify`` finds a hand-edited map (with a recomputed checksum) and a corrupted checksum;
* killing ``rmap build`` / ``rmap drop`` after each ordered step (``QCOW2KIT_WRITER_STOP_AT``)
  leaves an image that reads identically, checks clean and never carries a valid wrong map;
* the writer's image locks and QEMU's exclude each other;
* ``drop`` restores the image; v2 and encrypted images are refused.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest

import qemu
from qemu import (QEMU_IO, cli_process, create_encrypted, qemu_create, qemu_img, qemu_img_check,
                  qemu_img_info, qemu_img_map, qemu_io_read, sha256_file)
from qcow2kit.rmap import format as rmap_format
from qcow2kit.cli.main import main as cli_main
from qcow2kit.hostorder import HostOrderPlan, read_host_order
from qcow2kit.image import Image

pytestmark = pytest.mark.qemu

KiB = 1024
MiB = 1024 * KiB

RMAP_TYPE = 0x524D4150
AUTOCLEAR_BIT = 1 << 32
BUILD_STEPS = 4     # docs/rmap-extension.md "Writing": data, backing name, extension, bit
DROP_STEPS = 2      # clear the bit, remove the extension (then truncate, no step after it)


# --------------------------------------------------------------------------- running things


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "QCOW2KIT_WRITER_STOP_AT"}
    env.update(extra)
    return env


def qk_proc(*args, **extra_env: str) -> subprocess.CompletedProcess:
    """The real command line, in its own process."""
    return cli_process(*args, env=child_env(**extra_env), timeout=120)


@pytest.fixture
def qk(capsys):
    """The command line in this process (much faster): (exit status, stdout, stderr)."""
    def run(*args):
        capsys.readouterr()
        rc = cli_main([os.fspath(a) for a in args])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err
    return run


def qemu_io(path: Path, *cmds: str, readonly: bool = False, ok=(0,)) -> subprocess.CompletedProcess:
    """qemu.qemu_io; when it must succeed, output saying "error" or "failed" fails too."""
    return qemu.qemu_io(path, *cmds, readonly=readonly, ok=ok,
                        refuse=("error", "failed") if ok == (0,) else ())


def assert_check_clean(path: Path) -> dict:
    rc, res = qemu_img_check(path, ok=(0, 1, 2, 3))
    assert rc == 0, res
    assert res.get("check-errors", 0) == 0, res
    assert res.get("leaks", 0) == 0 and res.get("corruptions", 0) == 0, res
    assert res.get("leaks-fixed", 0) == 0 and res.get("corruptions-fixed", 0) == 0, res
    return res


_raw_seq = itertools.count()


def qemu_raw(path: Path) -> bytes:
    """The guest disk as ``qemu-img convert -O raw`` writes it."""
    dst = path.parent / f"{path.name}.{next(_raw_seq)}.raw"
    try:
        qemu_img("convert", "-f", "qcow2", "-O", "raw", path, dst, cwd=path.parent)
        return dst.read_bytes()
    finally:
        dst.unlink(missing_ok=True)


def info_without_size(info: dict) -> dict:
    info = dict(info)
    info.pop("actual-size", None)
    return info


def align_up(n: int, a: int) -> int:
    return -(-n // a) * a


# --------------------------------------------------------------------------- the format


@dataclasses.dataclass
class Header:
    raw: bytes
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    incompatible: int
    autoclear: int
    header_length: int
    compression_type: int
    exts: list[tuple[int, int, bytes]]      # (type, offset of the data in the file, data)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def backing_name(self) -> bytes:
        o = self.backing_file_offset
        return self.raw[o:o + self.backing_file_size] if o else b""

    def ext(self, typ: int) -> list[tuple[int, bytes]]:
        return [(off, data) for t, off, data in self.exts if t == typ]


def read_header(path: Path) -> Header:
    with open(path, "rb") as f:
        head = f.read(104)
        cb = struct.unpack_from(">I", head, 20)[0]
        f.seek(0)
        raw = f.read(1 << cb)
    version = struct.unpack_from(">I", raw, 4)[0]
    bfo, bfs, cb, size = struct.unpack_from(">QIIQ", raw, 8)
    l1_size, l1_off = struct.unpack_from(">IQ", raw, 36)
    if version >= 3:
        incompat, _compat, autoclear, _order, hlen = struct.unpack_from(">QQQII", raw, 72)
    else:
        incompat, autoclear, hlen = 0, 0, 72
    ctype = raw[104] if hlen > 104 else 0
    exts = []
    off = hlen
    while off + 8 <= len(raw):
        t, n = struct.unpack_from(">II", raw, off)
        if t == 0:
            break
        exts.append((t, off + 8, raw[off + 8:off + 8 + n]))
        off += 8 + align_up(n, 8)
    return Header(raw, version, bfo, bfs, cb, size, l1_size, l1_off, incompat, autoclear, hlen,
                  ctype, exts)


@dataclasses.dataclass
class Map:
    ext_offset: int         # file offset of the extension's data
    version: int
    flags: int
    offset: int
    length: int
    nb_records: int
    l1_table_offset: int
    l1_crc32: int
    data_crc32: int
    data: bytes
    cluster_bits: int
    unit_bits: int
    widths: tuple[int, int, int]
    reserved: bytes
    nb_data: int
    nb_comp: int
    records: list[tuple[int, int, int]]     # (host unit, guest unit, count), host order
    gaps: list[int]
    comp: list[tuple[int, int, int]]        # (host offset, guest cluster, compressed length)


def read_map(path: Path) -> Map:
    """Decode the map from docs/rmap-extension.md alone (no qcow2kit code)."""
    h = read_header(path)
    found = h.ext(RMAP_TYPE)
    assert len(found) == 1, f"{len(found)} reverse-map extensions"
    ext_off, ext = found[0]
    assert len(ext) == 48
    version, flags, offset, length, nrec, l1off, l1crc, dcrc = struct.unpack(">IIQQQQII", ext)
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    assert len(data) == length, "map data beyond the end of the file"
    magic, cb, ub, hw, gw, cw = struct.unpack_from("<8sBBBBB", data, 0)
    assert magic == b"QKRMAP\0\1"
    nd, nc = struct.unpack_from("<QQ", data, 16)
    rw = hw + gw + cw
    records, gaps = [], []
    pos, prev_end = 40, 0
    for _ in range(nd):
        gap = int.from_bytes(data[pos:pos + hw], "little")
        guest = int.from_bytes(data[pos + hw:pos + hw + gw], "little")
        count = int.from_bytes(data[pos + hw + gw:pos + rw], "little")
        host = prev_end + gap
        records.append((host, guest, count))
        gaps.append(gap)
        prev_end = host + count
        pos += rw
    comp = []
    for _ in range(nc):
        ho, gc, cl = struct.unpack_from("<QQI", data, pos)
        comp.append((ho, gc, cl))
        pos += 20
    assert pos == length, "map length does not match its record counts"
    return Map(ext_off, version, flags, offset, length, nrec, l1off, l1crc, dcrc, data, cb, ub,
               (hw, gw, cw), data[13:16], nd, nc, records, gaps, comp)


def header_autoclear(path: Path) -> int:
    with open(path, "rb") as f:
        f.seek(88)
        return struct.unpack(">Q", f.read(8))[0]


def l1_crc(path: Path) -> int:
    h = read_header(path)
    with open(path, "rb") as f:
        f.seek(h.l1_table_offset)
        return zlib.crc32(f.read(h.l1_size * 8))


def min_width(v: int) -> int:
    return max(1, (v.bit_length() + 7) // 8)


def decompress(ctype: int, stream: bytes, cluster_size: int) -> bytes:
    if ctype == 0:
        return zlib.decompressobj(-12).decompress(stream, cluster_size)
    import io

    import zstandard
    return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(stream)).read(cluster_size)


# --------------------------------------------------------------------------- test images


@dataclasses.dataclass
class Case:
    name: str
    path: Path
    backing: Path | None = None
    data_file: Path | None = None
    data_file_raw: bool = False


def _sources(d: Path, rng: random.Random) -> list[str]:
    """Data files for ``write -s``: two random, one compressible."""
    names = []
    for i in range(2):
        p = d / f"src{i}.bin"
        p.write_bytes(rng.randbytes(512 * KiB))
        names.append(str(p))
    words = [rng.randbytes(rng.randrange(3, 12)) for _ in range(40)]
    text = b"".join(rng.choice(words) for _ in range(120000))[:512 * KiB]
    p = d / "src-text.bin"
    p.write_bytes(text)
    names.append(str(p))
    return names


def _writes(rng: random.Random, srcs: list[str], size: int, count: int, *, align: int = 512,
            max_len: int = 256 * KiB, lo: int = 0) -> list[str]:
    cmds = []
    for _ in range(count):
        n = rng.randrange(1, max_len // align + 1) * align
        off = lo + rng.randrange(0, (size - lo - n) // align + 1) * align
        if rng.random() < 0.5:
            cmds.append(f"write -q -P {rng.randrange(1, 256)} {off} {n}")
        else:
            cmds.append(f"write -q -s {rng.choice(srcs)} {off} {n}")
    return cmds


def _compressed_writes(rng: random.Random, srcs: list[str], size: int, cs: int, count: int
                       ) -> list[str]:
    cmds = []
    for off in sorted(rng.sample(range(0, size, cs), count), key=lambda _: rng.random()):
        if rng.random() < 0.5:
            cmds.append(f"write -q -c -P {rng.randrange(1, 256)} {off} {cs}")
        else:
            cmds.append(f"write -q -c -s {srcs[2]} {off} {cs}")
    return cmds


def make_case(name: str, d: Path, seed: int = 0) -> Case:
    """A small image made by qemu-img / qemu-io in ``d``."""
    rng = random.Random(f"{name}/{seed}")
    srcs = _sources(d, rng)
    top = d / f"{name}.qcow2"
    size = 8 * MiB
    if name == "plain64k":
        # 16 MiB; the first cluster stays unallocated (a later QEMU write lands on the map)
        size = 16 * MiB
        qemu_create(top, size)
        qemu_io(top, *_writes(rng, srcs, size, 40, lo=64 * KiB),
                "write -q -z 4M 64k", "discard -q 5M 64k", "write -q -P 0x11 4M 4k")
        return Case(name, top)
    if name == "cs4k":
        qemu_create(top, size, "cluster_size=4096")
        qemu_io(top, *_writes(rng, srcs, size, 60, max_len=64 * KiB))
        return Case(name, top)
    if name == "cs512-backing":
        base = d / "base512.qcow2"
        qemu_create(base, 1 * MiB, "cluster_size=512")
        qemu_io(base, *_writes(rng, srcs, 1 * MiB, 10, max_len=16 * KiB))
        qemu_create(top, 1 * MiB, "cluster_size=512", backing=base.name, cwd=d)
        qemu_io(top, *_writes(rng, srcs, 1 * MiB, 10, max_len=16 * KiB))
        return Case(name, top, backing=base)
    if name == "extl2":
        qemu_create(top, size, "extended_l2=on,cluster_size=64k")
        qemu_io(top, *_writes(rng, srcs, size, 50, max_len=16 * KiB))
        return Case(name, top)
    if name in ("zlib", "zstd"):
        # compressed writes go to unallocated clusters only, so they come first
        qemu_create(top, size, f"compression_type={name}")
        qemu_io(top, *_compressed_writes(rng, srcs, size, 64 * KiB, 20),
                *_writes(rng, srcs, size, 12, max_len=128 * KiB))
        return Case(name, top)
    if name == "convert-c":
        # qemu-img convert -c: compressed clusters, a file size that is not cluster aligned
        src = d / "convsrc.qcow2"
        qemu_create(src, size)
        qemu_io(src, *_writes(rng, srcs, size, 20))
        qemu_img("convert", "-c", "-O", "qcow2", "-o", "compression_type=zlib", src, top)
        return Case(name, top)
    if name in ("datafile", "datafile-raw"):
        raw = name == "datafile-raw"
        df = d / f"{name}.data"
        qemu_create(top, size, f"data_file={df}" + (",data_file_raw=on" if raw else ""))
        qemu_io(top, *_writes(rng, srcs, size, 30))
        return Case(name, top, data_file=df, data_file_raw=raw)
    if name in ("backing", "backing-longname", "extl2-backing"):
        opts = "extended_l2=on,cluster_size=64k" if name == "extl2-backing" else ""
        base = d / (("b" * 200 if name == "backing-longname" else "base") + ".qcow2")
        qemu_create(base, size, opts)
        qemu_io(base, *_writes(rng, srcs, size, 25))
        qemu_create(top, size, opts, backing=base.name, cwd=d)
        max_len = 16 * KiB if name == "extl2-backing" else 192 * KiB
        qemu_io(top, *_writes(rng, srcs, size, 25, max_len=max_len))
        return Case(name, top, backing=base)
    if name == "prealloc-metadata":
        qemu_create(top, size, "preallocation=metadata")
        qemu_io(top, *_writes(rng, srcs, size, 20), "write -q -z 1M 128k")
        return Case(name, top)
    if name in ("refbits1", "refbits64"):
        qemu_create(top, size, f"refcount_bits={name[7:]}")
        qemu_io(top, *_writes(rng, srcs, size, 30))
        return Case(name, top)
    if name == "snapshot-bitmap":
        # an internal snapshot (clusters it alone references are not in the map) and a
        # persistent bitmap (autoclear bit 0, which the map must leave alone)
        qemu_create(top, size)
        qemu_io(top, *_writes(rng, srcs, size, 20))
        qemu_img("snapshot", "-c", "snap1", top)
        qemu_io(top, *_writes(rng, srcs, size, 20))
        qemu_img("bitmap", "--add", top, "bm0")
        return Case(name, top)
    if name == "empty":
        qemu_create(top, size)
        return Case(name, top)
    if name == "size-unaligned":
        # the disk ends inside a cluster (and inside a subcluster): the last run is clipped
        size = 5 * MiB + 2560
        qemu_create(top, size, "extended_l2=on,cluster_size=64k")
        qemu_io(top, *_writes(rng, srcs, size, 20, max_len=64 * KiB),
                f"write -q -P 0x77 {size - 3072} 3072")
        return Case(name, top)
    if name == "many-runs":
        # ~1500 single-cluster writes in random order: more runs than one planning window
        size = 32 * MiB
        qemu_create(top, size, "cluster_size=4096")
        offs = rng.sample(range(0, size, 4096), 1500)
        qemu_io(top, *(f"write -q -P {i % 251 + 1} {o} 4096" for i, o in enumerate(offs)))
        return Case(name, top)
    raise KeyError(name)


BUILD_CASES = ["plain64k", "cs4k", "cs512-backing", "extl2", "zlib", "zstd", "convert-c",
               "datafile", "datafile-raw", "backing", "backing-longname", "extl2-backing",
               "prealloc-metadata", "refbits1", "refbits64", "snapshot-bitmap", "empty",
               "size-unaligned"]


# --------------------------------------------------------------------------- shared checks


def expected_from_qemu_map(path: Path, unit: int, cluster_size: int
                           ) -> tuple[set[tuple[int, int]], set[int]]:
    """What the document says the map holds, from ``qemu-img map``: the (host unit, guest unit)
    pairs of the top layer's allocated data, and the guest clusters stored compressed."""
    data: set[tuple[int, int]] = set()
    comp: set[int] = set()
    for e in qemu_img_map(path):
        if e["depth"] != 0 or not e["data"]:
            continue
        start, end = e["start"], e["start"] + e["length"]
        if "offset" not in e:        # compressed (QEMU 7.2 gives no offset for those)
            comp.update(range(start // cluster_size * cluster_size, end, cluster_size))
            continue
        # extents may split inside a unit (file holes of preallocated clusters)
        delta = e["offset"] - start
        assert delta % unit == 0, e
        for u in range(start // unit, -(-end // unit)):
            data.add((u + delta // unit, u))
    return data, comp


def assert_map_matches_spec(case: Case, raw: bytes, *, size_before: int,
                            end_before: int, autoclear_before: int) -> Map:
    """Decode the stored map by the document and check each of its statements."""
    path = case.path
    h = read_header(path)
    m = read_map(path)
    cs = h.cluster_size
    ext_l2 = bool(h.incompatible & (1 << 4))
    assert m.version == 1
    assert m.flags == (1 if case.data_file else 0)
    # placement: past everything refcounted, cluster aligned, appended to the file
    assert m.offset % cs == 0
    assert m.offset == max(align_up(size_before, cs), end_before)
    assert m.offset + m.length == path.stat().st_size
    assert m.nb_records == m.nb_data + m.nb_comp
    assert m.l1_table_offset == h.l1_table_offset and m.l1_crc32 == l1_crc(path)
    assert zlib.crc32(m.data) == m.data_crc32
    # data header
    assert m.cluster_bits == h.cluster_bits
    assert m.unit_bits == h.cluster_bits - (5 if ext_l2 else 0)
    assert m.reserved == bytes(3)
    unit = 1 << m.unit_bits
    hw, gw, cw = m.widths
    if m.records:
        assert hw == min_width(max(m.gaps))
        assert gw == min_width(max(g for _, g, _ in m.records))
        assert cw == min_width(max(c for _, _, c in m.records))
    # records: host order, no overlap, at least one unit, maximal runs
    prev = None
    for rec in m.records:
        host, guest, count = rec
        assert count >= 1
        if prev is not None:
            ph, pg, pc = prev
            assert host >= ph + pc
            assert not (host == ph + pc and guest == pg + pc), (prev, rec)
        prev = rec
    got = {(host + k, guest + k) for host, guest, count in m.records for k in range(count)}
    want, want_comp = expected_from_qemu_map(path, unit, cs)
    assert got == want, (sorted(got - want)[:5], sorted(want - got)[:5])
    # compressed records: host order; each stream decompresses to the guest cluster's data
    hosts = [c[0] for c in m.comp]
    assert hosts == sorted(hosts)
    assert {gc * cs for _, gc, _ in m.comp} == want_comp
    for ho, gc, cl in m.comp:
        with open(path, "rb") as f:
            f.seek(ho)
            stream = f.read(cl)
        assert len(stream) == cl and cl > 0
        n = min(cs, len(raw) - gc * cs)
        assert decompress(h.compression_type, stream, cs)[:n] == raw[gc * cs:gc * cs + n]
    # the valid bit is set, and no other autoclear bit changed
    assert h.autoclear == autoclear_before | AUTOCLEAR_BIT
    return m


def host_order_bytes(img: Image, plan: HostOrderPlan | None = None) -> bytes:
    """The guest disk reassembled from read_host_order (zeros where nothing is read)."""
    buf = bytearray(img.size)
    seen = np.zeros(img.size, dtype=bool)
    last = (-1, -1)
    for item in read_host_order(img, plan=plan):
        key = (item.file, item.host)
        assert key >= last, "reads are not in host order"
        last = key
        for g, n, data in item.pieces:
            assert not seen[g:g + n].any(), f"guest {g:#x} read twice"
            seen[g:g + n] = True
            buf[g:g + n] = data
    return bytes(buf)


def plan_source(path: Path) -> tuple[str, str]:
    with Image.open(path) as img:
        plan = HostOrderPlan(img, use_rmap=True)
        return plan.source, plan.source_reason


def show(qk, path: Path) -> dict:
    rc, out, err = qk("rmap", "show", "--output=json", path)
    assert rc == 0, err
    return json.loads(out)["rmap"]


def verify(qk, path: Path) -> tuple[int, dict]:
    rc, out, err = qk("rmap", "verify", "--output=json", path)
    return rc, json.loads(out) if out.strip() else {"stderr": err}


def bench_planning(qk, path: Path) -> dict:
    rc, out, err = qk("bench", "order", "--output=json", "--no-measure", path)
    assert rc == 0, err
    return json.loads(out)["planning"]


def assert_same_image(path: Path, raw: bytes, info: dict) -> None:
    """QEMU and qcow2kit read what they read before; qemu-img check is clean."""
    assert_check_clean(path)
    assert qemu_raw(path) == raw
    assert info_without_size(qemu_img_info(path)) == info_without_size(info)
    with Image.open(path) as img:
        assert img.read(0, img.size) == raw


def assert_valid_and_matching(qk, path: Path) -> None:
    s = show(qk, path)
    assert s["present"] and s["valid"] and s["reason"] == "valid", s
    rc, v = verify(qk, path)
    assert rc == 0 and v["matches"] and v["differences"] == [], v


# --------------------------------------------------------------------------- 1. build


@pytest.mark.parametrize("name", BUILD_CASES)
def test_build_keeps_the_image_and_stores_the_right_map(name, tmp_path, qk):
    case = make_case(name, tmp_path)
    path = case.path
    size_before = path.stat().st_size
    info_before = qemu_img_info(path)
    raw = qemu_raw(path)
    end_before = assert_check_clean(path)["image-end-offset"]
    autoclear_before = header_autoclear(path)
    backing_before = read_header(path).backing_name

    rc, out, err = qk("rmap", "build", "--output=json", path)
    assert rc == 0, err
    assert json.loads(out)["rmap"]["valid"] is True

    # QEMU sees the same image
    res = assert_check_clean(path)
    assert res["image-end-offset"] == end_before
    assert qemu_raw(path) == raw
    info_after = qemu_img_info(path)
    assert info_without_size(info_after) == info_without_size(info_before)
    if case.backing is not None:
        assert info_after["backing-filename"] == case.backing.name
        assert info_after["backing-filename-format"] == "qcow2"
        assert read_header(path).backing_name == backing_before
    size = info_before["virtual-size"]
    for off, n in ((0, 4 * KiB), (size // 2 - 1000, 3000), (size - 2 * KiB, 2 * KiB)):
        assert qemu_io_read(path, off, n) == raw[off:off + n]

    # the map, decoded from the document, says what qemu-img map says
    m = assert_map_matches_spec(case, raw, size_before=size_before, end_before=end_before,
                                autoclear_before=autoclear_before)
    h = read_header(path)
    # the image is what its name says
    if name in ("zlib", "zstd", "convert-c"):
        assert m.nb_comp > 0
        assert h.compression_type == (1 if name == "zstd" else 0)
    else:
        assert m.nb_comp == 0
    assert (m.nb_data == 0) == (name == "empty")
    if "extl2" in name or name == "size-unaligned":
        assert m.unit_bits == 11
    if name == "snapshot-bitmap":
        assert autoclear_before & 1 and h.autoclear & 1
    if case.backing is not None:
        # the name lies after the (longer) extension list now
        last_t, last_off, last_data = h.exts[-1]
        assert last_t == RMAP_TYPE
        assert h.backing_file_offset >= last_off + align_up(len(last_data), 8) + 8

    # qcow2kit: valid, matching, used for host-order planning, same bytes
    assert_valid_and_matching(qk, path)
    source, reason = plan_source(path)
    if case.backing is None:
        assert (source, reason) == ("rmap", "valid reverse map")
        assert bench_planning(qk, path)["source"] == "rmap"
    else:
        assert source == "l2" and "backing" in reason
    with Image.open(path) as img:
        plan = HostOrderPlan(img, use_rmap=True)
        assert host_order_bytes(img, plan) == raw


def test_cli_entry_point_build_show_verify(tmp_path):
    """The installed command line, as a separate process, end to end."""
    case = make_case("cs4k", tmp_path)
    p = qk_proc("rmap", "build", case.path)
    assert p.returncode == 0 and "reverse map: valid" in p.stdout, p.stderr
    p = qk_proc("rmap", "show", case.path)
    assert p.returncode == 0 and p.stdout.startswith("reverse map: valid"), p.stdout
    p = qk_proc("rmap", "verify", case.path)
    assert p.returncode == 0 and "the map matches the L2 tables" in p.stdout, p.stdout


def test_build_with_little_memory_and_small_chunks(tmp_path, qk, monkeypatch):
    """More runs than a planning window and a record chunk hold: the joins between windows
    and chunks must neither lose, duplicate nor split records."""
    monkeypatch.setattr(rmap_format, "CHUNK_RECORDS", 97)   # records() and the builder
    case = make_case("many-runs", tmp_path)
    path = case.path
    size_before = path.stat().st_size
    raw = qemu_raw(path)
    end_before = assert_check_clean(path)["image-end-offset"]
    rc, out, err = qk("rmap", "build", "--memory=64K", path)
    assert rc == 0, err
    m = assert_map_matches_spec(case, raw, size_before=size_before, end_before=end_before,
                                autoclear_before=0)
    assert m.nb_data > 1024
    assert_check_clean(path)
    rc, out, err = qk("rmap", "verify", "--memory=64K", path)
    assert rc == 0, out
    with Image.open(path) as img:
        plan = HostOrderPlan(img, use_rmap=True, memory=64 * KiB)
        assert plan.source == "rmap"
        assert host_order_bytes(img, plan) == raw
        assert plan.stats.windows > 1
        l2plan = HostOrderPlan(img, use_rmap=False, memory=64 * KiB)
        assert host_order_bytes(img, l2plan) == raw
        assert l2plan.stats.windows > 1 or l2plan.stats.passes > 1


# --------------------------------------------------------------------------- 2. staleness


@pytest.mark.parametrize("case_name", ["plain64k", "datafile", "backing"])
@pytest.mark.parametrize("how", ["write", "rw-read"])
def test_qemu_read_write_open_makes_the_map_stale(case_name, how, tmp_path, qk):
    case = make_case(case_name, tmp_path)
    path = case.path
    assert qk("rmap", "build", path)[0] == 0
    before = read_map(path)
    ext_data = read_header(path).ext(RMAP_TYPE)[0][1]

    info = qemu_img_info(path)
    if how == "write":
        qemu_io(path, "write -P 5 0 64k")
    else:
        qemu_io(path, "read 0 512")          # read-write open (no -r), reads only
    raw = qemu_raw(path)
    if how == "write":
        assert raw[:64 * KiB] == b"\x05" * (64 * KiB)

    assert not header_autoclear(path) & AUTOCLEAR_BIT
    assert [d for _, d in read_header(path).ext(RMAP_TYPE)] == [ext_data]   # kept as it was
    assert info_without_size(qemu_img_info(path)) == info_without_size(info)
    s = show(qk, path)
    assert s["present"] and not s["valid"] and "stale" in s["reason"], s
    rc, v = verify(qk, path)
    assert rc == 1 and not v["matches"] and "stale" in " ".join(v["differences"]), v
    source, reason = plan_source(path)
    assert source == "l2" and "stale" in reason
    planning = bench_planning(qk, path)
    assert planning["source"] == "l2" and "stale" in planning["reason"], planning
    end = assert_check_clean(path)["image-end-offset"]
    if how == "write" and case_name == "plain64k":
        # the new cluster went where the (now stale) map data was: QEMU owns it now
        assert end > before.offset
    with Image.open(path) as img:
        assert img.read(0, img.size) == raw
        assert host_order_bytes(img) == raw

    rc, out, err = qk("rmap", "build", path)
    assert rc == 0, err
    assert_valid_and_matching(qk, path)
    assert len(read_header(path).ext(RMAP_TYPE)) == 1
    assert_check_clean(path)
    assert qemu_raw(path) == raw
    if case.backing is None:
        assert plan_source(path)[0] == "rmap"
    with Image.open(path) as img:
        assert host_order_bytes(img) == raw


def test_read_only_qemu_open_keeps_the_map_valid(tmp_path, qk):
    case = make_case("cs4k", tmp_path)
    assert qk("rmap", "build", case.path)[0] == 0
    digest = sha256_file(case.path)
    qemu_io(case.path, "read 0 64k", readonly=True)
    qemu_raw(case.path)
    qemu_img_check(case.path, ok=(0, 1, 2, 3))
    qemu_img_info(case.path)
    assert sha256_file(case.path) == digest
    assert_valid_and_matching(qk, case.path)


# --------------------------------------------------------------------------- 3. hand-edited maps


def _patch_guest_of_record(path: Path, i: int) -> tuple[int, int, int, int]:
    """Change record i's guest field in place; (host, old guest, new guest, unit)."""
    m = read_map(path)
    hw, gw, cw = m.widths
    with open(path, "rb") as f:
        f.seek(m.offset + 10)
        assert tuple(f.read(3)) == (hw, gw, cw)
    at = m.offset + 40 + i * (hw + gw + cw) + hw
    host, guest, _ = m.records[i]
    new = guest ^ 1
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(new.to_bytes(gw, "little"))
    return host, guest, new, 1 << m.unit_bits


def _fix_data_crc(path: Path) -> None:
    m = read_map(path)
    with open(path, "r+b") as f:
        f.seek(m.ext_offset + 44)
        f.write(struct.pack(">I", zlib.crc32(m.data)))


def test_verify_finds_a_hand_edited_record(tmp_path, qk):
    case = make_case("plain64k", tmp_path)
    path = case.path
    assert qk("rmap", "build", path)[0] == 0
    m = read_map(path)
    assert m.nb_data >= 3
    i = m.nb_data // 2
    host, old, new, unit = _patch_guest_of_record(path, i)
    _fix_data_crc(path)

    s = show(qk, path)
    assert s["valid"], s          # consistent, checksummed: only a comparison can tell
    rc, out, err = qk("rmap", "verify", path)
    assert rc == 1, out
    bad = [line for line in out.splitlines() if f"record {i}:" in line]
    assert len(bad) == 1, out
    assert f"host {host * unit:#x} -> guest {new * unit:#x}" in bad[0]
    assert f"host {host * unit:#x} -> guest {old * unit:#x}" in bad[0]
    rc, v = verify(qk, path)
    assert rc == 1 and not v["matches"] and len(v["differences"]) == 1, v
    assert_check_clean(path)
    # a rebuild repairs it
    assert qk("rmap", "build", path)[0] == 0
    assert_valid_and_matching(qk, path)


def test_verify_reports_a_checksum_mismatch(tmp_path, qk):
    case = make_case("plain64k", tmp_path)
    path = case.path
    assert qk("rmap", "build", path)[0] == 0
    _patch_guest_of_record(path, 0)
    s = show(qk, path)
    assert s["present"] and not s["valid"] and "checksum" in s["reason"], s
    rc, out, err = qk("rmap", "verify", path)
    assert rc == 1 and "checksum" in out, out
    source, reason = plan_source(path)
    assert source == "l2" and "checksum" in reason
    with Image.open(path) as img:
        assert host_order_bytes(img) == qemu_raw(path)


# --------------------------------------------------------------------------- 4. crash safety


def run_until_stopped(stop_at: int, *args) -> tuple[bool, str]:
    """Run the command line with QCOW2KIT_WRITER_STOP_AT; if it stops itself, SIGKILL it.
    (stopped?, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "qcow2kit", *map(os.fspath, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env(QCOW2KIT_WRITER_STOP_AT=str(stop_at)))
    watchdog = threading.Timer(120, lambda: os.kill(proc.pid, signal.SIGKILL))
    watchdog.start()
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        if os.WIFSTOPPED(status):
            os.kill(proc.pid, signal.SIGKILL)
            _, status = os.waitpid(proc.pid, 0)
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
            proc.returncode = -signal.SIGKILL
            err = proc.stderr.read()
            return True, err.decode(errors="replace")
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace")
        assert proc.returncode == 0, err
        return False, err
    finally:
        watchdog.cancel()
        proc.stderr.close()


@pytest.mark.parametrize("case_name", ["refbits1", "backing", "rebuild"])
def test_build_killed_after_any_step(case_name, tmp_path, qk):
    """``rmap build`` SIGKILLed after step N (then QEMU and a new build look at the image).

    "rebuild": the image has a valid map already; build drops it first (its own writer:
    steps 1-2 are drop's), then its steps 3-4 stop (its steps 1-2 are never reached)."""
    rebuild = case_name == "rebuild"
    case = make_case("cs4k" if rebuild else case_name, tmp_path)
    path = case.path
    raw = qemu_raw(path)
    info = qemu_img_info(path)
    if rebuild:
        assert qk("rmap", "build", path)[0] == 0
    pristine = tmp_path / "pristine.qcow2"
    shutil.copyfile(path, pristine)
    h0 = read_header(path)
    stops = 0
    for n in range(1, 9):
        shutil.copyfile(pristine, path)
        stopped, err = run_until_stopped(n, "rmap", "build", path)
        assert stopped == (n <= BUILD_STEPS), (n, err)
        assert_same_image(path, raw, info)
        h = read_header(path)
        assert h.backing_name == h0.backing_name
        s = show(qk, path)
        if s["valid"]:
            assert n >= BUILD_STEPS, (n, s)
            rc, v = verify(qk, path)
            assert rc == 0 and v["matches"], (n, v)
            if case.backing is None:
                assert plan_source(path)[0] == "rmap"
        else:
            assert n < BUILD_STEPS, (n, s)
            assert s["present"] == (n in (1, 3) if rebuild else n >= 3), (n, s)
            if s["present"]:
                assert "stale" in s["reason"], s
            assert not h.autoclear & AUTOCLEAR_BIT
            assert plan_source(path)[0] == "l2"
        if n == 1 and not rebuild:
            assert path.stat().st_size > pristine.stat().st_size    # the data is written
            assert h.raw == h0.raw                                   # the header is not
        if n == 2 and case.backing is not None:
            assert h.backing_file_offset != h0.backing_file_offset  # the name moved
        if n == 2 and case.backing is None and not rebuild:
            assert h.raw == h0.raw
        # whatever was left behind, a new build works
        assert qk("rmap", "build", path)[0] == 0
        assert_valid_and_matching(qk, path)
        assert_same_image(path, raw, info)
        if not stopped:
            break
        stops += 1
    assert stops == BUILD_STEPS


@pytest.mark.parametrize("case_name", ["zlib", "backing"])
def test_drop_killed_after_any_step(case_name, tmp_path, qk):
    case = make_case(case_name, tmp_path)
    path = case.path
    size0 = path.stat().st_size
    assert size0 % read_header(path).cluster_size == 0
    raw = qemu_raw(path)
    info = qemu_img_info(path)
    assert qk("rmap", "build", path)[0] == 0
    built = tmp_path / "built.qcow2"
    shutil.copyfile(path, built)
    stops = 0
    for n in range(1, 9):
        shutil.copyfile(built, path)
        stopped, err = run_until_stopped(n, "rmap", "drop", path)
        assert stopped == (n <= DROP_STEPS), (n, err)
        assert_same_image(path, raw, info)
        assert not header_autoclear(path) & AUTOCLEAR_BIT
        s = show(qk, path)
        assert not s["valid"], (n, s)
        assert plan_source(path)[0] == "l2"
        if n == 1:
            assert s["present"] and "stale" in s["reason"], s
        else:
            assert not s["present"], s
            assert read_header(path).ext(RMAP_TYPE) == []
        assert path.stat().st_size == (built.stat().st_size if stopped else size0)
        rc, v = verify(qk, path)
        assert rc == 1
        # and the next drop, and a build after it, are fine
        assert qk("rmap", "drop", path)[0] == 0
        assert path.stat().st_size in (size0, built.stat().st_size)
        assert_same_image(path, raw, info)
        assert qk("rmap", "build", path)[0] == 0
        assert_valid_and_matching(qk, path)
        assert_same_image(path, raw, info)
        if not stopped:
            break
        stops += 1
    assert stops == DROP_STEPS


# --------------------------------------------------------------------------- 5. locks


def _start_qemu_io(path: Path) -> subprocess.Popen:
    """An interactive qemu-io holding ``path`` read-write until its stdin closes."""
    proc = subprocess.Popen([QEMU_IO, "-f", "qcow2", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=path.parent)
    proc.stdin.write("read 0 512\n")
    proc.stdin.flush()
    line = proc.stdout.readline()          # once it answers, the image is open
    assert "read 512/512 bytes" in line, line
    return proc


def test_build_refuses_while_a_qemu_reader_holds_the_image(tmp_path):
    """A read-only QEMU user refuses to share 'write' (it wants consistent reads)."""
    case = make_case("cs4k", tmp_path)
    path = case.path
    digest = sha256_file(path)
    proc = subprocess.Popen([QEMU_IO, "-r", "-f", "qcow2", path], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=path.parent)
    try:
        proc.stdin.write("read 0 512\n")
        proc.stdin.flush()
        assert "read 512/512 bytes" in proc.stdout.readline()
        p = qk_proc("rmap", "build", path)
        assert p.returncode == 1
        assert "in use" in _one_error_line(p.stderr)
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()
    assert sha256_file(path) == digest


def _one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2kit: "), stderr
    return lines[0]


def test_build_and_drop_refuse_while_qemu_holds_the_image(tmp_path, qk):
    case = make_case("cs4k", tmp_path)
    path = case.path
    assert qk("rmap", "build", path)[0] == 0
    qio = _start_qemu_io(path)
    try:
        digest = sha256_file(path)
        for action in ("build", "drop"):
            p = qk_proc("rmap", action, path)
            assert p.returncode == 1, (action, p.stdout, p.stderr)
            line = _one_error_line(p.stderr)
            assert "in use" in line and str(path) in line, line
            assert sha256_file(path) == digest
        # the in-process API refuses too (the locks are per open file, not per process)
        rc, out, err = qk("rmap", "build", path)
        assert rc == 1 and "in use" in _one_error_line(err)
        assert sha256_file(path) == digest
    finally:
        qio.stdin.close()
        qio.wait(timeout=30)
        qio.stdout.close()
    assert qio.returncode == 0
    s = show(qk, path)                      # qemu-io had it read-write: stale
    assert s["present"] and not s["valid"] and "stale" in s["reason"]
    raw = qemu_raw(path)
    p = qk_proc("rmap", "build", path)
    assert p.returncode == 0, p.stderr
    assert_valid_and_matching(qk, path)
    assert qemu_raw(path) == raw
    assert_check_clean(path)


def test_qemu_cannot_write_while_our_writer_holds_the_image(tmp_path, qk):
    case = make_case("cs4k", tmp_path)
    path = case.path
    raw = qemu_raw(path)
    info = qemu_img_info(path)
    proc = subprocess.Popen([sys.executable, "-m", "qcow2kit", "rmap", "build", path],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=child_env(QCOW2KIT_WRITER_STOP_AT="1"))
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
        p = qemu_io(path, "write -P 7 0 4k", ok=(1,))
        assert 'Failed to get "write" lock' in p.stderr, p.stderr
        p = qemu_img("check", path, ok=(1,))
        assert "lock" in p.stderr
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        os.waitpid(proc.pid, 0)
        proc.returncode = -signal.SIGKILL
    assert_same_image(path, raw, info)
    assert not show(qk, path)["present"]
    qemu_io(path, "write -q -P 7 0 4k")     # free again
    assert qemu_raw(path)[:4 * KiB] == b"\x07" * (4 * KiB)
    assert_check_clean(path)


# --------------------------------------------------------------------------- 6. drop


@pytest.mark.parametrize("case_name", ["plain64k", "prealloc-metadata", "backing", "datafile"])
def test_drop_restores_the_image(case_name, tmp_path, qk):
    case = make_case(case_name, tmp_path)
    path = case.path
    size0 = path.stat().st_size
    digest0 = sha256_file(path)
    raw = qemu_raw(path)
    info = qemu_img_info(path)
    autoclear0 = header_autoclear(path)
    assert qk("rmap", "build", path)[0] == 0
    size1 = path.stat().st_size
    # a second build replaces the map: one extension, the same place
    assert qk("rmap", "build", path)[0] == 0
    assert path.stat().st_size == size1
    assert len(read_header(path).ext(RMAP_TYPE)) == 1
    assert_valid_and_matching(qk, path)

    rc, out, err = qk("rmap", "drop", path)
    assert rc == 0 and out == "reverse map removed\n", (out, err)
    assert path.stat().st_size == size0
    assert header_autoclear(path) == autoclear0
    assert read_header(path).ext(RMAP_TYPE) == []
    assert_same_image(path, raw, info)
    if case.backing is None:
        assert sha256_file(path) == digest0       # byte for byte the image it was
    assert not show(qk, path)["present"]
    assert plan_source(path) == ("l2", "no reverse map")

    digest1 = sha256_file(path)
    rc, out, err = qk("rmap", "drop", path)
    assert rc == 0 and out == "no reverse map to remove\n", (out, err)
    rc, out, err = qk("rmap", "drop", "--output=json", path)
    assert rc == 0 and json.loads(out)["dropped"] is False
    assert sha256_file(path) == digest1
    rc, v = verify(qk, path)
    assert rc == 1 and not v["matches"]


def test_drop_restores_an_unaligned_file_size(tmp_path, qk):
    src = tmp_path / "src.qcow2"
    qemu_create(src, 4 * MiB)
    qemu_io(src, "write -q -P 1 0 1M", "write -q -P 2 2M 300k")
    path = tmp_path / "compressed.qcow2"
    qemu_img("convert", "-c", "-O", "qcow2", src, path)
    size0 = path.stat().st_size
    assert size0 % (64 * KiB) != 0          # qemu-img convert -c leaves such files
    raw = qemu_raw(path)
    assert qk("rmap", "build", path)[0] == 0
    assert qk("rmap", "drop", path)[0] == 0
    assert_check_clean(path)
    assert qemu_raw(path) == raw
    assert path.stat().st_size == size0


def test_drop_after_qemu_wrote_keeps_qemu_clusters(tmp_path, qk):
    """QEMU allocated over the stale map: drop must not truncate QEMU's data away."""
    case = make_case("plain64k", tmp_path)
    path = case.path
    assert qk("rmap", "build", path)[0] == 0
    qemu_io(path, "write -q -P 5 0 64k")
    raw = qemu_raw(path)
    size = path.stat().st_size
    assert qk("rmap", "drop", path)[0] == 0
    assert path.stat().st_size == size
    assert_check_clean(path)
    assert qemu_raw(path) == raw


# --------------------------------------------------------------------------- 7. refusals


def test_build_refuses_a_v2_image(tmp_path, qk):
    path = tmp_path / "v2.qcow2"
    qemu_create(path, 4 * MiB, "compat=0.10")
    qemu_io(path, "write -q -P 3 0 128k")
    digest = sha256_file(path)
    p = qk_proc("rmap", "build", path)
    assert p.returncode == 1
    line = _one_error_line(p.stderr)
    assert "version 2" in line and "autoclear" in line, line
    assert sha256_file(path) == digest
    s = show(qk, path)
    assert not s["present"]
    assert verify(qk, path)[0] == 1


def _v2_with_stale_map(tmp_path: Path, qk) -> Case:
    """``qemu-img amend -o compat=0.10`` of an image carrying a map: QEMU keeps the unknown
    extension in the version 2 header (which has no autoclear field)."""
    case = make_case("backing", tmp_path)
    assert qk("rmap", "build", case.path)[0] == 0
    qemu_img("amend", "-f", "qcow2", "-o", "compat=0.10", case.path, cwd=tmp_path)
    h = read_header(case.path)
    assert h.version == 2 and len(h.ext(RMAP_TYPE)) == 1
    return case


def test_a_map_in_a_v2_image_is_stale_and_drop_removes_it(tmp_path, qk):
    case = _v2_with_stale_map(tmp_path, qk)
    path = case.path
    raw = qemu_raw(path)
    info = qemu_img_info(path)
    s = show(qk, path)
    assert s["present"] and not s["valid"] and "stale" in s["reason"], s
    assert verify(qk, path)[0] == 1
    assert plan_source(path)[0] == "l2"
    p = qk_proc("rmap", "build", path)
    assert p.returncode == 1 and "version 2" in _one_error_line(p.stderr)
    rc, out, err = qk("rmap", "drop", path)
    assert rc == 0 and out == "reverse map removed\n", (out, err)
    h = read_header(path)
    assert h.ext(RMAP_TYPE) == [] and h.version == 2
    assert_same_image(path, raw, info)


def test_drop_does_not_write_offset_88_of_a_v2_header(tmp_path, qk):
    case = _v2_with_stale_map(tmp_path, qk)
    path = case.path
    exts = read_header(path).exts
    stopped, err = run_until_stopped(1, "rmap", "drop", path)   # after "clear the bit"
    assert stopped, err
    # a version 2 image has no bit to clear: nothing in the header may have changed
    assert read_header(path).exts == exts


def _create_luks(path: Path) -> None:
    if not create_encrypted(path, "4M", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                            secret="hunter2", attempts=10):
        pytest.fail("qemu-img could not create a LUKS image")


def test_build_refuses_an_encrypted_image(tmp_path, qk):
    path = tmp_path / "luks.qcow2"
    _create_luks(path)
    digest = sha256_file(path)
    p = qk_proc("rmap", "build", path)
    assert p.returncode == 1
    line = _one_error_line(p.stderr)
    assert "encrypted" in line, line
    assert sha256_file(path) == digest
