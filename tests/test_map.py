"""The extent map (``qcow2kit.mapping``, ``qcow2kit map``) against ``qemu-img map`` 7.2.

1. Every factory image: the library's extents (``Extent.as_qemu()``) equal qemu-img's JSON;
   the CLI's JSON is qemu-img's stdout byte for byte; the human form too, or, where qemu-img
   refuses (compressed or encrypted data), the same lines before the same one-line error.
2. Windows: ``--start-offset`` / ``--max-length`` pairs (cluster-, sector- and byte-aligned,
   empty, past the end, longer than the disk) on a selection of images, against qemu-img run
   with the same options.
3. Budgets: every window under ``memory`` = 64 KiB (the minimum), 1 MiB and the default gives
   the same array (and qemu-img's extents); a small budget really cuts the scan into batches.
4. Memory and I/O: tracemalloc peaks of a scan of a 1 GiB two-layer image with 4 KiB clusters
   and one extent per cluster stay within the budget plus 512 KiB; the preads are exactly
   what the layout justifies: one per run of back-to-back L2 tables inside a window (or one
   per window's slice of a table when a window is smaller than an L2 span), each table byte
   once, nothing for unallocated L1 ranges, plus the L1 table and the refcount reads of the
   metadata-preallocation heuristic.
5. Property tests: a slow per-cluster reference of QEMU's L2 decoding and block status
   (written here from docs/interop/qcow2.rst and block/qcow2-cluster.c, plain Python ints) is
   checked against qemu-img itself on random L2 tables, then ``tables.classify``,
   ``mapping.merge`` and ``map_extents`` (on real files whose L2 table was overwritten with
   random entries) are checked against it.

Regression tests of library bugs found here are at the end of the file.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import tracemalloc
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factory  # tests/ is on sys.path (conftest.py)
from qemu import qemu_img
from qemu import qemu_io as run_qemu_io
import qcow2kit
from qcow2kit import mapping as M
from qcow2kit import tables as T
from qcow2kit.cli.main import main as cli_main
from qcow2kit.errors import CorruptImageError
from qcow2kit.mapping import Extent

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

BUDGETS = (64 * KiB, 1 * MiB, M.DEFAULT_MEMORY)
#: What a scan may use beyond its budget (Python objects, the L1 table of a small image, ...).
SLACK = 512 * KiB

HUMAN_REFUSAL = b"File contains external, encrypted or compressed clusters."

qemu = pytest.mark.qemu


# =========================================================================== helpers


@lru_cache(maxsize=None)
def _qemu_map(path: str, secret: str | None, args: tuple[str, ...], human: bool
              ) -> tuple[int, bytes, bytes]:
    p = Path(path)
    argv = [factory.QEMU_IMG, "map", *([] if human else ["--output=json"]), *args,
            *factory.open_args(p, secret=secret)]
    # cwd = the image's directory: relative data-file names resolve against the CWD in QEMU
    proc = subprocess.run(argv, cwd=p.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return proc.returncode, proc.stdout, proc.stderr


_HOLE_SENSITIVE: dict[str, bool] = {}


def _hole_sensitive(case: factory.ImageCase) -> bool:
    """Does the map of this image depend on the holes of a file (a metadata-preallocated
    qcow2 layer or a raw layer, as QEMU's block status and qcow2kit see it)?"""
    key = str(case.path)
    if key not in _HOLE_SENSITIVE:
        with qcow2kit.open(case.path) as img:
            _HOLE_SENSITIVE[key] = any(
                not isinstance(layer, qcow2kit.Image) or
                (not layer.encrypted and M.detect_metadata_preallocation(layer))
                for layer in img.chain())
    return _HOLE_SENSITIVE[key]


def settle(case: factory.ImageCase) -> None:
    """Bring the files of an image whose map depends on file holes into the page cache.

    On ext4, SEEK_DATA reports the *cached* pages over unwritten extents (which QEMU's
    fallocate leaves in extended-L2 and COW'd clusters) as data, and the others as holes.
    Both tools read metadata next to such extents, and the kernel's (here 8 MiB) readahead
    caches them asynchronously: what either tool sees would depend on timing and on what ran
    before.  With every page cached, both see the same, stable holes (true holes stay holes).
    Files above 256 MiB (the sparse 64 GiB images made here) have no unwritten extents.
    """
    if not _hole_sensitive(case):
        return
    root = case.root or case.path.parent
    files = {p for p in Path(root).rglob("*") if p.is_file()}
    files |= {Path(p) for p in (case.path, case.data_file, *case.backing_chain) if p}
    for f in files:
        if f.stat().st_size <= 256 * MiB:
            with open(f, "rb", buffering=0) as fh:
                while fh.read(4 * MiB):
                    pass


def qemu_map(case: factory.ImageCase, args=(), human: bool = False) -> tuple[int, bytes, bytes]:
    """(exit status, stdout, stderr) of qemu-img map on the case (cached per session)."""
    settle(case)
    return _qemu_map(str(case.path), case.secret if case.encrypted else None, tuple(args), human)


def qemu_map_uncached(case: factory.ImageCase, args=()) -> tuple[int, bytes, bytes]:
    """qemu-img map --output=json of an image that tests rewrite (no caching)."""
    settle(case)
    return _qemu_map.__wrapped__(str(case.path), case.secret if case.encrypted else None,
                                 tuple(args), False)


def qemu_json(case: factory.ImageCase, args=()) -> list[dict]:
    rc, out, err = qemu_map(case, args)
    if rc:  # not an assert: never the library's fault (and never an xfail's expected failure)
        raise factory.FactoryError(f"qemu-img map failed: {err.decode(errors='replace')}")
    return json.loads(out)


def qemu_extents(case: factory.ImageCase, args=()) -> list[dict]:
    """qemu-img's JSON extents without the zero-length placeholder it prints for an empty range
    (the library yields nothing there; the CLI prints the placeholder itself)."""
    q = qemu_json(case, args)
    if len(q) == 1 and q[0]["length"] == 0:
        return []
    if not all(e["length"] > 0 for e in q):
        raise factory.FactoryError(f"qemu-img map printed an empty extent: {q}")
    return q


def window_args(start: int, length: int | None) -> list[str]:
    return [f"--start-offset={start}"] + ([] if length is None else [f"--max-length={length}"])


def as_qemu(ext: np.ndarray) -> list[dict]:
    return [Extent.from_row(row).as_qemu() for row in ext]


def canonical(ext: np.ndarray) -> np.ndarray:
    """The extents with ``offset`` zeroed where FLAG_OFFSET says it means nothing."""
    out = ext.copy()
    out["offset"][(out["flags"] & M.FLAG_OFFSET) == 0] = 0
    return out


def lib_map(case: factory.ImageCase, start: int = 0, length: int | None = None,
            memory: int = M.DEFAULT_MEMORY) -> list[dict]:
    settle(case)
    with qcow2kit.open(case.path) as img:
        return [e.as_qemu() for e in M.iter_extents(img, start, length, memory=memory)]


def run_cli(capsysbinary, case: factory.ImageCase, *argv: str) -> tuple[int, bytes, bytes]:
    """``qcow2kit map ARGV... IMAGE`` in process: (exit status, stdout, stderr)."""
    settle(case)
    argv = (*argv, str(case.path))
    capsysbinary.readouterr()
    rc = cli_main(["map", *argv])
    out, err = capsysbinary.readouterr()
    return rc, out, err


def first_difference(a, b) -> str:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at #{i}:\n  qcow2kit {x!r}\n  qemu-img {y!r}"
    return f"lengths differ: qcow2kit {len(a)}, qemu-img {len(b)}"


def image_case(name: str, path: Path, cluster_size: int, **kw) -> factory.ImageCase:
    """An ImageCase for an image made by a test (so the qemu helpers take it too)."""
    info = factory.qemu_img_info(path)
    return factory.ImageCase(name=name, path=Path(path).absolute(),
                             virtual_size=info["virtual-size"], cluster_size=cluster_size,
                             root=Path(path).parent, **kw)


def qemu_io(path: Path, *cmds: str) -> None:
    """qemu-io (see qemu.qemu_io) that also fails when qemu-io says a command failed."""
    run_qemu_io(path, *cmds, refuse=("failed",))


# =========================================================================== 1. every image


@qemu
def test_library_extents_equal_qemu_img_json_for_every_factory_image(factory_images):
    tags = set().union(*(c.tags for c in factory_images.values()))
    assert {"encrypted", "compressed", "extended_l2", "data_file", "backing", "prealloc",
            "v2", "zero", "discard"} <= tags
    bad = []
    for name, case in sorted(factory_images.items()):
        want = qemu_extents(case)
        got = lib_map(case)
        if got != want:
            bad.append(f"{name}: {first_difference(got, want)}")
        if case.encrypted:  # QEMU reports no host offsets for encrypted images
            assert got and not any("offset" in e for e in got), name
    assert not bad, "\n".join(bad)


@qemu
def test_cli_json_is_qemu_img_stdout_for_every_factory_image(factory_images, capsysbinary):
    bad = []
    for name, case in sorted(factory_images.items()):
        qrc, qout, qerr = qemu_map(case)
        assert qrc == 0, qerr
        rc, out, err = run_cli(capsysbinary, case, "--output=json")
        if (rc, out, err) != (0, qout, b""):
            bad.append(f"{name}: exit {rc}, stderr {err!r}, "
                       f"{first_difference(out.splitlines(), qout.splitlines())}")
    assert not bad, "\n".join(bad)


@qemu
def test_cli_human_is_qemu_img_stdout_for_every_factory_image(factory_images, capsysbinary):
    bad = []
    refused = printed = 0
    for name, case in sorted(factory_images.items()):
        qrc, qout, qerr = qemu_map(case, human=True)
        rc, out, err = run_cli(capsysbinary, case)
        if qrc == 0:
            printed += 1
            want = (0, qout, b"")
        else:
            # qemu-img prints the lines before the first extent it cannot show, then
            # fails; qcow2kit fails the same way but leaves stdout empty (issue 13: a
            # script must never take a truncated map for a whole one)
            assert (qrc, qerr) == (1, b"qemu-img: " + HUMAN_REFUSAL + b"\n"), (name, qerr)
            refused += 1
            want = (1, b"", b"qcow2kit: " + HUMAN_REFUSAL + b"\n")
        if (rc, out, err) != want:
            bad.append(f"{name}: exit {rc} (want {want[0]}), stderr {err!r}, "
                       f"{first_difference(out.splitlines(), qout.splitlines())}")
    assert refused and printed
    assert not bad, "\n".join(bad)


# =========================================================================== 2+3. windows


@pytest.fixture(scope="module")
def mixed_chain(tmp_path_factory) -> factory.ImageCase:
    """raw (3 MiB + 4 KiB) <- extended L2 16k (4 MiB) <- 4k clusters (6 MiB) <- 512-byte clusters.

    Four layers with four geometries: the windows of the top image (32 KiB L2 spans) cut
    the lower layers anywhere, and the budget is shared between four unit densities.
    """
    d = tmp_path_factory.mktemp("map-mixed-chain")
    # a raw base shorter than the layer above (its holes: see test_raw_backing_file_holes)
    (d / "base.raw").write_bytes(random.Random(7).randbytes(3 * MiB + 4096))
    rng = random.Random(4242)
    layers = [("ext.qcow2", "cluster_size=16k,extended_l2=on", 4 * MiB, "base.raw", "raw"),
              ("mid.qcow2", "cluster_size=4k", 6 * MiB, "ext.qcow2", "qcow2"),
              ("top.qcow2", "cluster_size=512", 5 * MiB + 1536, "mid.qcow2", "qcow2")]
    for name, opts, size, back, fmt in layers:
        qemu_img("create", "-q", "-f", "qcow2", "-o", opts, "-b", back, "-F", fmt, name,
                 str(size), cwd=d)
        cmds = []
        for _ in range(40):
            align = rng.choice((1, 512, 4096))
            off = rng.randrange(0, size - 1) // align * align
            n = min(rng.choice((512, 1000, 4096, 20000, 65536, 300000)), size - off)
            r = rng.random()
            if r < 0.15:
                cmds.append(f"write -z {off} {n}")
            elif r < 0.25:
                cmds.append(f"write -z -u {off} {n}")
            elif r < 0.35:
                cmds.append(f"discard {off} {n}")
            else:
                cmds.append(f"write -P {rng.randrange(1, 256)} {off} {n}")
        qemu_io(d / name, *cmds)
    return image_case("mixed_chain", d / "top.qcow2", 512, has_backing=True)


def make_windows(case: factory.ImageCase) -> list[tuple[int, int | None]]:
    """Deterministic (start, length) pairs; length None means "to the end"."""
    size, cs = case.virtual_size, case.cluster_size
    rng = random.Random(f"qcow2kit-map-windows-{case.name}")
    out: list[tuple[int, int | None]] = [
        (0, 0), (size, None), (size, 1), (size + 3 * cs + 7, 4096), (max(size - 1, 0), 1),
        (0, size + (1 << 40)), (min(cs, size), cs), (size // 2, None), (1, None)]
    nclusters = max(1, size // cs)
    for _ in range(3):  # cluster aligned
        a = rng.randrange(nclusters) * cs
        out.append((a, rng.randrange(1, nclusters + 1) * cs))
    for _ in range(2):  # sector aligned
        a = rng.randrange(max(1, size // 512)) * 512
        out.append((a, rng.randrange(1, max(2, size // 512)) * 512))
    for _ in range(4):  # anywhere
        a = rng.randrange(max(1, size))
        out.append((a, rng.choice((rng.randrange(1, 3 * cs), rng.randrange(1, size + 2)))))
    # windows that start just after, or end just before, an extent boundary inside a cluster
    # (of the extended-L2 layer for the mixed chain): runs of that cluster lie outside them
    align = 16 * KiB if case.name == "mixed_chain" else cs
    inner = [e["start"] for e in qemu_extents(case) if e["start"] % align]
    for b in rng.sample(inner, min(3, len(inner))):
        out += [(b + 1, None), (max(0, b - 1 - align), align)]
    return out


WINDOW_IMAGES = ["chain3", "backing_larger", "backing_smaller", "backing_raw", "extl2_backing",
                 "extl2_16k", "extl2_2M", "compressed_zlib", "cs512", "size_unaligned",
                 "prealloc_metadata", "datafile", "luks", "discard_zero", "mixed_chain"]


def _case(factory_images, mixed_chain, name) -> factory.ImageCase:
    return mixed_chain if name == "mixed_chain" else factory_images[name]


@qemu
@pytest.mark.parametrize("name", WINDOW_IMAGES)
def test_windows_and_budgets_match_qemu_img(factory_images, mixed_chain, name):
    case = _case(factory_images, mixed_chain, name)
    bad = []
    with qcow2kit.open(case.path) as img:
        for a, n in make_windows(case):
            want = qemu_extents(case, window_args(a, n))
            settle(case)
            arrays = [canonical(M.map_extents(img, a, n, memory=m)) for m in BUDGETS]
            for m, arr in zip(BUDGETS, arrays):
                if arr.tobytes() != arrays[-1].tobytes():
                    bad.append(f"window ({a}, {n}): memory={m} differs from the default budget")
            got = as_qemu(arrays[-1])
            if got != want:
                bad.append(f"window ({a}, {n}): {first_difference(got, want)}")
    assert not bad, "\n".join(bad)


@qemu
@pytest.mark.parametrize("name", WINDOW_IMAGES)
def test_cli_windows_json_is_qemu_img_stdout(factory_images, mixed_chain, capsysbinary, name):
    case = _case(factory_images, mixed_chain, name)
    bad = []
    for i, (a, n) in enumerate(make_windows(case)):
        qrc, qout, qerr = qemu_map(case, window_args(a, n))
        assert qrc == 0, qerr
        memory = [["--memory=64k"], ["--memory=1M"], []][i % 3]
        rc, out, err = run_cli(capsysbinary, case, "--output=json", *window_args(a, n), *memory)
        if (rc, out, err) != (0, qout, b""):
            bad.append(f"window ({a}, {n}) {memory}: exit {rc}, stderr {err!r}, "
                       f"{first_difference(out.splitlines(), qout.splitlines())}")
    assert not bad, "\n".join(bad)


@qemu
def test_small_budget_really_scans_in_batches(factory_images, mixed_chain):
    """The budgets above are only a test if they change the batching: they do."""
    for case in (factory_images["cs512"], factory_images["bitmaps_cs4k"], mixed_chain):
        settle(case)
        with qcow2kit.open(case.path) as img:
            small = list(M.map_batches(img, memory=64 * KiB))
            default = list(M.map_batches(img))
        assert len(small) > len(default) and len(small) > 4, case.name
        assert canonical(np.concatenate(small)).tobytes() == \
            canonical(np.concatenate(default)).tobytes()
        # batches are already merged with each other: no two neighbours could join
        whole = np.concatenate(small)
        assert M.merge(whole).tobytes() == whole.tobytes()


def test_budget_below_the_minimum_is_refused(tmp_path):
    img_path = tmp_path / "small.qcow2"
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    qemu_img("create", "-q", "-f", "qcow2", str(img_path), "1M", cwd=tmp_path)
    with qcow2kit.open(img_path) as img:
        with pytest.raises(ValueError, match="at least 64 KiB"):
            list(M.map_batches(img, memory=64 * KiB - 1))
        assert len(list(M.map_batches(img, memory=64 * KiB))) == 1


# =========================================================================== 4. memory and I/O


class Layout(NamedTuple):
    """The metadata layout of a qcow2 file, parsed here with struct (independently of qcow2kit)."""

    cluster_size: int
    l1_offset: int
    l2_offsets: list[int]            # by L1 index, 0 = unallocated
    reftable_offset: int
    reftable_bytes: int
    refblocks: list[int]             # refcount block offsets by refcount-table index, 0 = none
    refcount_bits: int
    file_size: int


def parse_layout(path: Path) -> Layout:
    with open(path, "rb") as f:
        h = f.read(104)
        cluster_bits = struct.unpack(">I", h[20:24])[0]
        l1_size, l1_offset, rt_offset, rt_clusters = struct.unpack(">IQQI", h[36:60])
        version = struct.unpack(">I", h[4:8])[0]
        order = struct.unpack(">I", h[96:100])[0] if version >= 3 else 4
        cs = 1 << cluster_bits
        f.seek(l1_offset)
        l1 = struct.unpack(f">{l1_size}Q", f.read(8 * l1_size))
        f.seek(rt_offset)
        rt = struct.unpack(f">{rt_clusters * cs // 8}Q", f.read(rt_clusters * cs))
    mask = 0x00FF_FFFF_FFFF_FE00
    return Layout(cs, l1_offset, [e & mask for e in l1], rt_offset, rt_clusters * cs,
                  [e & ~0x1FF for e in rt], 1 << order, os.path.getsize(path))


class ReadLog:
    """Records every pread of a PreadSource as (offset, length)."""

    def __init__(self, src) -> None:
        self.src = src
        self.calls: list[tuple[int, int]] = []
        read, readinto = src._read, src._readinto

        def _read(offset, length):
            self.calls.append((offset, length))
            return read(offset, length)

        def _readinto(offset, buf):
            self.calls.append((offset, len(buf)))
            return readinto(offset, buf)

        src._read, src._readinto = _read, _readinto
        self.start = src.reads

    @property
    def reads(self) -> int:
        return self.src.reads - self.start


def scan_window(memory: int, layers: list[tuple[int, int]]) -> int:
    """The guest bytes one window of a scan covers (the rule of ``resolved_batches``).

    ``layers``: (cluster size, units per cluster) per layer, top first.  The budget buys
    ``memory // BYTES_PER_UNIT`` units, shared by every layer at its own unit density.  A
    window is a whole number of the top image's L2 spans when at least one fits, else a power
    of two (at least one cluster), so that it never straddles two L2 tables.
    """
    cs, upc = layers[0]
    span = l2_span(cs, upc)
    window = int(max(1, memory // M.BYTES_PER_UNIT) / sum(u / c for c, u in layers))
    if window >= span:
        return window // span * span
    return max(cs, 1 << (max(window, 1).bit_length() - 1))


def l2_span(cs: int, upc: int = 1) -> int:
    return cs * (cs // (8 if upc == 1 else 16))


def expected_l2_reads(lay: Layout, window: int, span: int) -> list[tuple[int, int]]:
    """The L2 preads of a scan of the whole disk (a multiple of ``window``).

    Windows of whole L2 spans: one pread per run of tables that lie back to back in the file
    for consecutive L1 entries of one window.  Smaller windows: each reads its own slice of
    the table (``window / span`` of it).  Unallocated L1 entries: nothing.
    """
    tables = [(i, off) for i, off in enumerate(lay.l2_offsets) if off]
    if window < span:
        piece = lay.cluster_size * window // span
        return sorted((off + k * piece, piece) for _, off in tables
                      for k in range(span // window))
    per_window = window // span
    runs: list[list[int]] = []
    prev = None
    for i, off in tables:
        if (runs and prev == i - 1 and runs[-1][0] + runs[-1][1] == off
                and i // per_window == prev // per_window):
            runs[-1][1] += lay.cluster_size
        else:
            runs.append([off, lay.cluster_size])
        prev = i
    return sorted((a, b) for a, b in runs)


def expected_refcount_reads(lay: Layout) -> list[tuple[int, int]]:
    """QEMU's metadata-preallocation heuristic counts the refcounts of the clusters below the
    end of the file (when it does not stop early): qcow2kit reads just the refcount table
    entries and the refcount entries that cover them."""
    per_block = lay.cluster_size * 8 // lay.refcount_bits
    end_cluster = -(-lay.file_size // lay.cluster_size)
    n_entries = min(lay.reftable_bytes // 8, -(-end_cluster // per_block))
    blocks = [(b, -(-min(per_block, end_cluster - i * per_block) * lay.refcount_bits // 8))
              for i, b in enumerate(lay.refblocks) if b and i * per_block < end_cluster]
    return sorted([(lay.reftable_offset, n_entries * 8)] + blocks)


def check_reads(log: ReadLog, lay: Layout, window: int, span: int, *,
                refcounts: bool = True) -> None:
    """The preads of one scan of a layer: the L1 table once, the refcount structures of the
    preallocation heuristic, and every byte of every allocated L2 table exactly once, in the
    preads :func:`expected_l2_reads` justifies."""
    assert log.reads == len(log.calls)  # the counter counts preads, one per read here
    tables = [o for o in lay.l2_offsets if o]

    def in_l2(c):
        return any(o <= c[0] < o + lay.cluster_size for o in tables)

    ref_set = {lay.reftable_offset} | {b for b in lay.refblocks if b}
    l1 = [c for c in log.calls if c[0] == lay.l1_offset]
    l2 = sorted(c for c in log.calls if in_l2(c))
    ref = sorted(c for c in log.calls if c[0] in ref_set)
    other = [c for c in log.calls if c not in l1 and c not in l2 and c not in ref]
    assert not other, f"unexpected reads {other}"
    assert len(l1) == 1, l1
    covered = [(a, a + n) for a, n in l2]
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(covered, covered[1:])), "read twice"
    assert sum(n for _, n in l2) == len(tables) * lay.cluster_size
    assert l2 == expected_l2_reads(lay, window, span)
    if refcounts:
        assert ref == expected_refcount_reads(lay)


def traced_peak(fn) -> int:
    """Peak traced memory (bytes above what was allocated before) while ``fn`` runs."""
    import numpy.ma  # noqa: F401  np.unique imports it lazily on first use: not the scan's memory

    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def write_alternating_l2(path: Path, parity: int) -> None:
    """Rewrite every allocated L2 table: guest cluster j is a data cluster when j % 2 == parity
    (host offsets descending, so no two are contiguous), unallocated otherwise."""
    lay = parse_layout(path)
    cs = lay.cluster_size
    per = cs // 8
    total = len(lay.l2_offsets) * per
    with open(path, "r+b") as f:
        for i, off in enumerate(lay.l2_offsets):
            assert off, "every L2 table must be allocated"
            j = np.arange(i * per, (i + 1) * per, dtype=np.uint64)
            host = np.uint64(1 << 32) + (np.uint64(total) - j) * np.uint64(2 * cs)
            words = np.where(j % 2 == parity, host | np.uint64(1 << 63), np.uint64(0))
            f.seek(off)
            f.write(words.astype(">u8").tobytes())


@pytest.fixture(scope="module")
def worst_case_chain(tmp_path_factory) -> factory.ImageCase:
    """1 GiB, 4 KiB clusters, two layers, one extent per guest cluster: the top holds the even
    clusters, its backing file the odd ones (every unit of the top falls through to the
    backing file and back).  Made with qemu-img/qemu-io (write -z allocates every L2 table
    back to back), then the L2 entries are rewritten."""
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    d = tmp_path_factory.mktemp("map-worst")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "base.qcow2", "1G", cwd=d)
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "base.qcow2",
             "-F", "qcow2", "top.qcow2", "1G", cwd=d)
    for name, parity in (("base.qcow2", 1), ("top.qcow2", 0)):
        qemu_io(d / name, "write -z -n 0 1G")
        write_alternating_l2(d / name, parity)
    return image_case("worst_case_chain", d / "top.qcow2", 4096, has_backing=True)


def _qemu_rows(case) -> list[tuple]:
    return [(e["start"], e["length"], e["depth"], e["present"], e["zero"], e["data"],
             e.get("offset")) for e in qemu_json(case)]


def _lib_rows(arr: np.ndarray) -> list[tuple]:
    f = arr["flags"]
    off = np.where(f & M.FLAG_OFFSET, arr["offset"], 0).tolist()
    has = (f & M.FLAG_OFFSET != 0).tolist()
    return list(zip(arr["start"].tolist(), arr["length"].tolist(), arr["depth"].tolist(),
                    (f & M.FLAG_PRESENT != 0).tolist(), (f & M.FLAG_ZERO != 0).tolist(),
                    (f & M.FLAG_DATA != 0).tolist(),
                    [o if h else None for o, h in zip(off, has)]))


@qemu
def test_memory_stays_within_the_budget_on_a_worst_case_chain(worst_case_chain):
    case = worst_case_chain
    want = _qemu_rows(case)
    assert len(want) == 262144  # one extent per 4 KiB cluster of 1 GiB

    def scan(memory):
        def run():
            with qcow2kit.open(case.path) as img:
                n = 0
                for batch in M.map_batches(img, memory=memory):
                    n += batch.shape[0]
                assert n == len(want)
        return run

    scan(1 * MiB)()  # warm up (lazy imports, first-call caches)
    # (64 KiB is left out: thousands of tiny windows are slow under tracemalloc)
    peaks = {m: traced_peak(scan(m)) for m in (1 * MiB, M.DEFAULT_MEMORY)}
    for m, peak in peaks.items():
        assert peak <= m + SLACK, f"memory={m}: peak {peak} bytes"
    # the budget is what bounds the scan: at the default it takes far more
    assert peaks[M.DEFAULT_MEMORY] > 8 * peaks[1 * MiB], peaks
    with qcow2kit.open(case.path) as img:
        assert _lib_rows(M.map_extents(img, memory=1 * MiB)) == want


@qemu
@pytest.mark.parametrize("memory", BUDGETS)
def test_preads_of_a_two_layer_scan(worst_case_chain, memory):
    case = worst_case_chain
    top_lay, base_lay = parse_layout(case.path), parse_layout(case.path.parent / "base.qcow2")
    # qemu-io's write -z put the L2 tables back to back, except where a refcount block went
    assert 1 <= len(expected_l2_reads(top_lay, 1 << 40, l2_span(4096))) <= 4
    window = scan_window(memory, [(4096, 1), (4096, 1)])
    with qcow2kit.open(case.path) as img:
        back = img.backing
        logs = ReadLog(img.src), ReadLog(back.src)
        for _ in M.map_batches(img, memory=memory):
            pass
    check_reads(logs[0], top_lay, window, l2_span(4096))
    check_reads(logs[1], base_lay, window, l2_span(4096))


@pytest.fixture(scope="module")
def first_and_last_gib(tmp_path_factory) -> factory.ImageCase:
    """64 GiB, 64 KiB clusters: data only in the first and the last GiB (L1 entries 0, 1, 126,
    127).  write -z allocates each pair of L2 tables back to back before its data clusters."""
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    d = tmp_path_factory.mktemp("map-ends")
    qemu_img("create", "-q", "-f", "qcow2", "ends.qcow2", "64G", cwd=d)
    qemu_io(d / "ends.qcow2", "write -z 0 1G", "write -P 0x11 0 1M", "write -P 0x12 1023M 1M",
            "write -z 63G 1G", "write -P 0x13 63G 1M", "write -P 0x14 65535M 1M")
    return image_case("first_and_last_gib", d / "ends.qcow2", 65536)


@qemu
@pytest.mark.parametrize("memory", BUDGETS)
def test_preads_skip_unallocated_l1_ranges(first_and_last_gib, memory):
    case = first_and_last_gib
    lay = parse_layout(case.path)
    assert [i for i, o in enumerate(lay.l2_offsets) if o] == [0, 1, 126, 127]
    assert lay.l2_offsets[1] == lay.l2_offsets[0] + 65536
    assert lay.l2_offsets[127] == lay.l2_offsets[126] + 65536
    window = scan_window(memory, [(65536, 1)])
    with qcow2kit.open(case.path) as img:
        log = ReadLog(img.src)
        got = [e.as_qemu() for e in M.iter_extents(img, memory=memory)]
    assert got == qemu_extents(case)
    check_reads(log, lay, window, l2_span(65536))
    l2_reads = len(expected_l2_reads(lay, window, l2_span(65536)))
    assert log.reads == 3 + l2_reads  # L1, refcount table, one refcount block, L2
    if memory == M.DEFAULT_MEMORY:
        # a window holds both L1 entries of each pair: one pread per pair of tables
        assert window >= 2 * l2_span(65536) and l2_reads == 2


@qemu
def test_metadata_preallocated_64g(tmp_path):
    """preallocation=metadata: every L2 table sits before its 512 MiB of (sparse) data, so each
    is its own pread; the file's holes make the extents zero (QEMU's heuristic)."""
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,preallocation=metadata",
             "pm.qcow2", "64G", cwd=tmp_path)
    case = image_case("pm64", tmp_path / "pm.qcow2", 65536, tags=frozenset({"prealloc"}))
    lay = parse_layout(case.path)
    assert len(expected_l2_reads(lay, 1 << 40, l2_span(65536))) == 128
    settle(case)
    with qcow2kit.open(case.path) as img:
        assert M.detect_metadata_preallocation(img)
        log = ReadLog(img.src)
        got = M.map_extents(img)
    # the heuristic stops reading refcounts as soon as it has its answer: not checked here
    window = scan_window(M.DEFAULT_MEMORY, [(65536, 1)])
    assert window >= l2_span(65536)
    check_reads(log, lay, window, l2_span(65536), refcounts=False)
    assert as_qemu(got) == qemu_extents(case)
    with qcow2kit.open(case.path) as img:
        assert canonical(M.map_extents(img, memory=1 * MiB)).tobytes() == canonical(got).tobytes()

    def scan():
        with qcow2kit.open(case.path) as img:
            for _ in M.map_batches(img, memory=1 * MiB):
                pass
    assert traced_peak(scan) <= 1 * MiB + SLACK


# =========================================================================== 5. reference model

L2E_OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1


@dataclass(frozen=True)
class Geo:
    """What the reference needs to know about an image to decode its L2 entries."""

    cluster_bits: int
    extended: bool = False
    data_file: bool = False
    version: int = 3
    encrypted: bool = False

    @property
    def cs(self) -> int:
        return 1 << self.cluster_bits

    @property
    def nsub(self) -> int:
        return 32 if self.extended else 1

    @property
    def sub_size(self) -> int:
        return self.cs // self.nsub


class Unit(NamedTuple):
    start: int
    length: int
    depth: int
    present: bool
    zero: bool
    data: bool
    offset: int | None
    compressed: bool


class QemuCorrupt(Exception):
    """QEMU's qcow2_get_host_offset fails (-EIO, "Image is corrupt"): so does qemu-img map."""


def ref_cluster_type(word: int, g: Geo) -> str:
    """qcow2_get_cluster_type (block/qcow2.h)."""
    if word & OFLAG_COMPRESSED:
        return "compressed"
    if word & OFLAG_ZERO and not g.extended:  # bit 0 means nothing with extended L2
        return "zero_alloc" if word & L2E_OFFSET_MASK else "zero_plain"
    if not word & L2E_OFFSET_MASK:
        # offset 0 is a valid data-file offset; COPIED disambiguates
        return "normal" if g.data_file and word & OFLAG_COPIED else "unallocated"
    return "normal"


def ref_subcluster_types(word: int, bitmap: int, g: Geo) -> list[str]:
    """qcow2_get_subcluster_type for every subcluster of the cluster."""
    t = ref_cluster_type(word, g)
    if not g.extended:
        return ["unalloc_plain" if t == "unallocated" else t]
    if t == "compressed":
        return ["compressed"] * 32
    alloc, zero = bitmap & 0xFFFF_FFFF, bitmap >> 32
    if t == "normal":
        if alloc & zero:
            return ["invalid"] * 32
        return ["zero_alloc" if zero >> i & 1 else "normal" if alloc >> i & 1
                else "unalloc_alloc" for i in range(32)]
    if alloc:  # allocated subclusters in a cluster without a host offset
        return ["invalid"] * 32
    return ["zero_plain" if zero >> i & 1 else "unalloc_plain" for i in range(32)]


def ref_check(word: int, types: list[str], guest: int, g: Geo) -> None:
    """The corruption checks of qcow2_get_host_offset / count_contiguous_subclusters."""
    t = ref_cluster_type(word, g)
    if "invalid" in types:
        raise QemuCorrupt("invalid subcluster bitmap")
    if g.version < 3 and t in ("zero_plain", "zero_alloc"):
        raise QemuCorrupt("zero cluster in a version 2 image")
    if t == "compressed" and g.data_file:
        raise QemuCorrupt("compressed cluster with an external data file")
    if t in ("normal", "zero_alloc"):
        host = word & L2E_OFFSET_MASK
        if host % g.cs:
            raise QemuCorrupt("host cluster offset not cluster aligned")
        if g.data_file and host != guest:
            raise QemuCorrupt("data-file host offset differs from the guest offset")


#: QEMU block status per subcluster type: present (allocated), zero, data, offset valid.
REF_STATUS = {
    "normal": (True, False, True, True),
    "zero_alloc": (True, True, False, True),
    "zero_plain": (True, True, False, False),
    "unalloc_plain": (False, True, False, False),   # no backing file: reads as zero
    "unalloc_alloc": (False, True, False, True),
    "compressed": (True, False, True, False),
}


def ref_units(words, bitmaps, g: Geo, size: int, start: int, end: int) -> list[Unit]:
    """Per-(sub)cluster status of [start, end) (end <= size), clipped, not merged."""
    out = []
    cs, sub = g.cs, g.sub_size
    for c in range(start // cs, -(-end // cs)):
        word = words[c]
        bitmap = bitmaps[c] if g.extended else 0
        types = ref_subcluster_types(word, bitmap, g)
        ref_check(word, types, c * cs, g)
        if types[0] == "compressed":
            pieces = [(c * cs, cs, "compressed", None)]
        else:
            pieces = [(c * cs + i * sub, sub, t, (word & L2E_OFFSET_MASK) + i * sub)
                      for i, t in enumerate(types)]
        for g0, n, t, host in pieces:
            a, b = max(g0, start), min(g0 + n, end)
            if a >= b:
                continue
            present, zero, data, has_off = REF_STATUS[t]
            off = host + (a - g0) if has_off and not g.encrypted else None
            out.append(Unit(a, b - a, 0, present, zero, data, off, t == "compressed"))
    return out


def ref_merge(units: list[Unit]) -> list[Unit]:
    """qemu-img map's merge (7.2, entry_mergeable): same depth, present, zero, data, and
    offsets either absent or continuing.  7.2 has no "compressed" in its map entries, so a
    compressed cluster merges with data that has no offset (encrypted); the merged unit is
    compressed only if all of it is."""
    out: list[Unit] = []
    for u in units:
        if out:
            p = out[-1]
            same = (p.depth, p.present, p.zero, p.data, p.offset is None) == \
                (u.depth, u.present, u.zero, u.data, u.offset is None)
            if same and (u.offset is None or p.offset + p.length == u.offset):
                out[-1] = p._replace(length=p.length + u.length,
                                     compressed=p.compressed and u.compressed)
                continue
        out.append(u)
    return out


def ref_map(words, bitmaps, g: Geo, size: int, start: int = 0, length: int | None = None
            ) -> list[Unit]:
    end = size if length is None else min(size, start + length)
    if start >= end:
        return []
    return ref_merge(ref_units(words, bitmaps, g, size, start, end))


def lib_units(arr: np.ndarray) -> list[Unit]:
    out = []
    for row in arr:
        e = Extent.from_row(row)
        out.append(Unit(e.start, e.length, e.depth, e.present, e.zero, e.data, e.offset,
                        e.compressed))
    return out


def unit_as_qemu(u: Unit) -> dict:
    d = {"start": u.start, "length": u.length, "depth": u.depth, "present": u.present,
         "zero": u.zero, "data": u.data}
    if u.offset is not None:
        d["offset"] = u.offset
    return d


# --------------------------------------------------------------------------- random L2 tables

BITS32 = st.one_of(st.just(0), st.just(0xFFFF_FFFF), st.integers(0, 0xFFFF_FFFF),
                   st.integers(0, 31).map(lambda i: 1 << i),
                   st.tuples(st.integers(0, 32), st.integers(0, 32)).map(
                       lambda t: ((1 << max(t)) - 1) & ~((1 << min(t)) - 1)))


@st.composite
def l2_words(draw, g: Geo, n: int, enc_compressed: bool = True):
    """n random L2 entries (and bitmaps) for ``g``: unallocated (with stray COPIED and reserved
    bits), normal (contiguous or scattered host offsets, any subcluster bitmap), zero (with or
    without a kept offset), compressed (any descriptor, any bitmap).

    One table in four may also hold, now and then, what QEMU refuses: invalid subcluster
    bitmaps, cluster offsets that are not cluster aligned (data, zero, extended-L2 clusters),
    data-file offsets off the guest offset, compressed clusters with a data file, zero flags
    in version 2 images.  ``enc_compressed`` allows compressed clusters in encrypted images
    (see test_encrypted_compressed_cluster_next_to_data).
    """
    cs = g.cs
    trouble = draw(st.integers(0, 3)) == 0
    words, bitmaps = [], []
    prev = None
    kinds = ["unallocated", "normal", "normal", "zero", "compressed"]
    for c in range(n):
        kind = draw(st.sampled_from(kinds))
        if kind == "compressed" and ((g.data_file and not trouble) or
                                     (g.encrypted and not enc_compressed)):
            kind = "normal"
        if kind == "zero" and g.version < 3 and not trouble:
            kind = "unallocated"
        copied = OFLAG_COPIED if draw(st.booleans()) else 0
        junk = draw(st.sampled_from([0, 0, 0, 0x1FE, 0x3F << 56, 0x02, 1 << 61]))
        if g.extended:
            junk |= draw(st.sampled_from([0, 0, 1]))  # bit 0 means nothing there
        bitmap = 0
        if kind == "compressed":
            word = OFLAG_COMPRESSED | draw(st.integers(0, OFLAG_COMPRESSED - 1)) | copied
            bitmap = draw(st.integers(0, (1 << 64) - 1)) if g.extended else 0
        else:
            how = draw(st.integers(0, 9))
            if g.data_file and not (trouble and how == 0):
                host = c * cs
                if host == 0:
                    copied = OFLAG_COPIED
            elif prev is not None and how <= 4:
                host = prev + cs
            else:
                host = draw(st.integers(1, 1 << 24)) * cs
            misalign = 0
            if cs > 512 and how == 9 and trouble:
                misalign = draw(st.integers(1, cs // 512 - 1)) * 512
            if kind == "unallocated":
                if g.data_file and c and not trouble:
                    copied = 0  # offset 0 + COPIED is a data cluster at data-file offset 0
                word = copied | (junk & ~1)
                if g.extended:
                    zero = draw(BITS32)
                    alloc = draw(BITS32) if trouble and draw(st.integers(0, 9)) == 0 else 0
                    bitmap = zero << 32 | alloc
            elif kind == "zero" and not g.extended:
                word = OFLAG_ZERO | copied | (junk & ~OFLAG_ZERO)
                if draw(st.booleans()):
                    word |= host + misalign
            else:  # normal (with extended L2: any mix of subcluster states)
                word = copied | junk | (host + misalign)
                if not g.extended:
                    word &= ~OFLAG_ZERO
                else:
                    alloc = draw(BITS32)
                    zero = draw(BITS32)
                    if not (trouble and draw(st.integers(0, 9)) == 0):
                        zero &= ~alloc
                    bitmap = zero << 32 | alloc
                prev = host
        words.append(word)
        bitmaps.append(bitmap)
    return words, bitmaps


@dataclass(frozen=True)
class BaseImage:
    name: str
    geo: Geo
    opts: str
    size: int


BASE_IMAGES = [
    BaseImage("std512", Geo(9), "cluster_size=512", 24 * 512),
    BaseImage("std4k", Geo(12), "cluster_size=4096", 20 * 4096 + 1536),
    BaseImage("std64k", Geo(16), "cluster_size=65536", 6 * 65536 + 4608),
    BaseImage("ext16k", Geo(14, extended=True), "cluster_size=16384,extended_l2=on", 8 * 16384),
    BaseImage("ext64k", Geo(16, extended=True), "cluster_size=65536,extended_l2=on", 4 * 65536),
    BaseImage("df4k", Geo(12, data_file=True), "cluster_size=4096,data_file=df4k.data",
              20 * 4096 + 1536),
    BaseImage("dfext16k", Geo(14, extended=True, data_file=True),
              "cluster_size=16384,extended_l2=on,data_file=dfext16k.data", 8 * 16384),
    BaseImage("v2_4k", Geo(12, version=2), "cluster_size=4096,compat=0.10", 20 * 4096),
    BaseImage("aes4k", Geo(12, encrypted=True),
              f"cluster_size=4096,encrypt.format=aes,encrypt.key-secret={factory.SECRET_ID}",
              20 * 4096 + 1536),
    # an extended-L2 image whose last cluster is partial: subclusters past the end
    BaseImage("ext16k_tail", Geo(14, extended=True), "cluster_size=16384,extended_l2=on",
              8 * 16384 + 2560),
]
BASES = {b.name: b for b in BASE_IMAGES}


class PatchableImage:
    """A qemu-made image with one allocated L2 table (L1 entry 0) whose content tests replace."""

    def __init__(self, base: BaseImage, d: Path) -> None:
        self.base, self.geo = base, base.geo
        self.path = d / f"{base.name}.qcow2"
        cmd = ["create", "-q", "-f", "qcow2"]
        if base.geo.encrypted:
            cmd += ["--object", f"secret,id={factory.SECRET_ID},data={factory.SECRET}"]
        qemu_img(*cmd, "-o", base.opts, str(self.path), str(base.size), cwd=d)
        secret = factory.SECRET if base.geo.encrypted else None
        factory.run([factory.QEMU_IO, *factory.open_args(self.path, secret=secret),
                     "-c", f"write -P 0x5a 0 {base.geo.cs}"], cwd=d)
        lay = parse_layout(self.path)
        assert lay.l2_offsets[0] and not any(lay.l2_offsets[1:])
        self.l2_offset = lay.l2_offsets[0]
        self.size = factory.qemu_img_info(self.path)["virtual-size"] if not secret else base.size
        assert self.size == base.size
        self.case = factory.ImageCase(name=base.name, path=self.path, virtual_size=self.size,
                                      cluster_size=base.geo.cs, encrypted=bool(secret),
                                      secret=secret)

    def write_l2(self, words, bitmaps) -> None:
        g = self.geo
        table = np.zeros(g.cs // 8, dtype=np.uint64)
        if g.extended:
            table[0:2 * len(words):2] = words
            table[1:2 * len(words):2] = bitmaps
        else:
            table[:len(words)] = words
        with open(self.path, "r+b") as f:
            f.seek(self.l2_offset)
            f.write(table.astype(">u8").tobytes())


@pytest.fixture(scope="module")
def patchable(tmp_path_factory) -> dict[str, PatchableImage]:
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    d = tmp_path_factory.mktemp("map-l2")
    return {b.name: PatchableImage(b, d) for b in BASE_IMAGES}


@st.composite
def l2_scenario(draw, enc_compressed: bool):
    """(base image name, words, bitmaps, start, length) for an image and a window on it."""
    name = draw(st.sampled_from([b.name for b in BASE_IMAGES]))
    base = BASES[name]
    g = base.geo
    n = -(-base.size // g.cs)
    extra = draw(st.integers(0, 2))  # entries past the end of the disk: never looked at
    words, bitmaps = draw(l2_words(g, n + extra, enc_compressed=enc_compressed))
    size, cs = base.size, g.cs
    start = draw(st.one_of(st.just(0), st.integers(0, n).map(lambda k: k * cs),
                           st.integers(0, n * g.nsub).map(lambda k: k * g.sub_size + 512),
                           st.integers(0, size + cs)))
    length = draw(st.one_of(st.none(), st.integers(0, 2 * cs).map(lambda k: k * 512),
                            st.integers(0, size + cs)))
    return name, words, bitmaps, start, length


def reference_or_error(image: PatchableImage, words, bitmaps, start, length):
    try:
        return ref_map(words, bitmaps, image.geo, image.size, start, length)
    except QemuCorrupt as exc:
        return exc


@qemu
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=l2_scenario(enc_compressed=True))
def test_reference_model_agrees_with_qemu_img(patchable, scenario):
    """The reference above is what qemu-img map does, on random L2 tables."""
    name, words, bitmaps, start, length = scenario
    image = patchable[name]
    image.write_l2(words, bitmaps)
    want = reference_or_error(image, words, bitmaps, start, length)
    rc, out, err = qemu_map_uncached(image.case, window_args(start, length))
    if isinstance(want, QemuCorrupt):
        assert rc == 1 and b"Image is corrupt" in err, (want, rc, err)
    else:
        assert rc == 0, err
        q = json.loads(out)
        if len(q) == 1 and q[0]["length"] == 0:
            q = []
        assert [unit_as_qemu(u) for u in want] == q


@qemu
@settings(max_examples=250, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scenario=l2_scenario(enc_compressed=False), memory=st.sampled_from(BUDGETS))
def test_map_extents_matches_the_reference_on_random_l2_tables(patchable, scenario, memory):
    name, words, bitmaps, start, length = scenario
    image = patchable[name]
    image.write_l2(words, bitmaps)
    want = reference_or_error(image, words, bitmaps, start, length)
    with qcow2kit.open(image.path) as img:
        if isinstance(want, QemuCorrupt):
            with pytest.raises(CorruptImageError):
                M.map_extents(img, start, length, memory=memory)
        else:
            assert lib_units(M.map_extents(img, start, length, memory=memory)) == want


# --------------------------------------------------------------------------- tables.classify

KIND_OF = {"normal": T.DATA, "zero_alloc": T.ZERO, "zero_plain": T.ZERO,
           "unalloc_plain": T.UNALLOCATED, "unalloc_alloc": T.UNALLOCATED,
           "compressed": T.COMPRESSED, "invalid": T.INVALID}


@st.composite
def classify_case(draw):
    extended = draw(st.booleans())
    cb = draw(st.sampled_from([14, 16, 21] if extended else [9, 12, 16, 21]))
    g = Geo(cb, extended=extended, data_file=draw(st.booleans()))
    words, bitmaps = draw(l2_words(g, draw(st.integers(0, 24))))
    return g, words, bitmaps


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(classify_case())
def test_classify_matches_the_reference(case):
    g, words, bitmaps = case
    geo = T.L2Geometry(g.cluster_bits, g.extended, g.data_file)
    u = T.classify(np.array(words, dtype=np.uint64),
                   np.array(bitmaps, dtype=np.uint64) if g.extended else None, geo)
    kinds, valid, host, csize = [], [], [], []
    x = 62 - (g.cluster_bits - 8)  # compressed descriptor: offset bits 0..x-1, sectors x..61
    for word, bitmap in zip(words, bitmaps):
        for i, t in enumerate(ref_subcluster_types(word, bitmap, g)):
            kinds.append(KIND_OF[t])
            valid.append(t in ("normal", "zero_alloc", "unalloc_alloc"))
            if t == "compressed":
                coff = word & ((1 << x) - 1)
                nsect = ((word >> x) & ((1 << (g.cluster_bits - 8)) - 1)) + 1
                host.append(coff)
                csize.append(nsect * 512 - (coff & 511))
            else:
                host.append((word & L2E_OFFSET_MASK) + i * g.sub_size)
                csize.append(0)
    assert u.kind.tolist() == kinds
    assert u.offset_valid.tolist() == valid
    for k, (v, h, c) in enumerate(zip(valid, host, csize)):
        if v:
            assert int(u.host[k]) == h, k
        if kinds[k] == T.COMPRESSED:
            assert (int(u.host[k]), int(u.csize[k])) == (h, c), k


# --------------------------------------------------------------------------- mapping.merge


@st.composite
def extent_arrays(draw):
    n = draw(st.integers(0, 40))
    ext = np.zeros(n, dtype=M.EXTENT_DTYPE)
    pos = draw(st.integers(0, 1 << 40))
    prev_end_off = draw(st.integers(0, 1 << 40))
    for i in range(n):
        length = draw(st.integers(1, 1 << 20))
        flags = draw(st.sampled_from([
            M.FLAG_PRESENT | M.FLAG_DATA | M.FLAG_OFFSET, M.FLAG_ZERO, M.FLAG_ZERO | M.FLAG_OFFSET,
            M.FLAG_PRESENT | M.FLAG_ZERO, M.FLAG_PRESENT | M.FLAG_ZERO | M.FLAG_OFFSET,
            M.FLAG_PRESENT | M.FLAG_DATA | M.FLAG_COMPRESSED, M.FLAG_PRESENT | M.FLAG_DATA,
            M.FLAG_PRESENT | M.FLAG_ZERO | M.FLAG_DATA | M.FLAG_OFFSET]))
        flags |= draw(st.sampled_from([0, 0, 0, 0x20, 0x40]))  # bits merge must ignore
        offset = prev_end_off if draw(st.booleans()) else draw(st.integers(0, 1 << 40))
        ext[i] = (pos, length, offset, draw(st.sampled_from([0, 0, 0, 1, 2])),
                  draw(st.integers(0, 4)), flags)
        pos += length
        prev_end_off = offset + length
    return ext


@settings(max_examples=200, deadline=None)
@given(extent_arrays())
def test_merge_matches_a_loop(ext):
    want: list[list[int]] = []
    for start, length, offset, depth, kind, flags in ext.tolist():
        if want:
            p = want[-1]
            if (p[5] & M.MERGE_FLAGS) == (flags & M.MERGE_FLAGS) and p[3] == depth and (
                    not flags & M.FLAG_OFFSET or p[2] + p[1] == offset):
                p[1] += length
                continue
        want.append([start, length, offset, depth, kind, flags])
    got = M.merge(ext.copy())
    # what merge promises: ranges, depth, the flags that decide merging, offsets where valid
    # (other flag bits and ``kind`` of a merged extent are the merge's own business)
    assert [(r[0], r[1], r[2] if r[5] & M.FLAG_OFFSET else None, r[3], r[5] & M.MERGE_FLAGS)
            for r in got.tolist()] == \
        [(r[0], r[1], r[2] if r[5] & M.FLAG_OFFSET else None, r[3], r[5] & M.MERGE_FLAGS)
         for r in want]


# =========================================================================== regressions

C = OFLAG_COPIED
ALL = 0xFFFF_FFFF

#: (id, base image, L2 entries, bitmaps): QEMU 7.2 refuses each of these in block status
#: ("qcow2: Image is corrupt: ..."), so qemu-img map fails; so must qcow2kit (it mapped them
#: silently before Image.check_units).
QEMU_CHECKS = [
    ("zero-cluster-offset-unaligned", "std64k", [0x50000 | C, 0x58000 | OFLAG_ZERO], None),
    ("extended-offset-subcluster-aligned-only", "ext64k", [0x50000 | C, 0x60800 | C], [ALL, ALL]),
    ("extended-unallocated-subclusters-offset-unaligned", "ext64k", [0x50000 | C, 0x60800 | C],
     [ALL, 0]),
    ("version-2-zero-flag", "v2_4k", [0x5000 | C, OFLAG_ZERO], None),
    ("data-file-offset-is-not-the-guest-offset", "df4k", [C, 0x3000 | C], None),
    ("data-file-zero-cluster-offset-is-not-the-guest-offset", "df4k", [C, 0x3000 | OFLAG_ZERO],
     None),
    ("data-file-compressed-cluster", "df4k", [C, OFLAG_COMPRESSED | 0x1000], None),
]


@qemu
@pytest.mark.parametrize("base,words,bitmaps", [pytest.param(*c[1:], id=c[0])
                                                for c in QEMU_CHECKS])
def test_qemu_img_refuses_these_l2_entries(patchable, base, words, bitmaps):
    image = patchable[base]
    bitmaps = bitmaps or [0] * len(words)
    image.write_l2(words, bitmaps)
    rc, out, err = qemu_map_uncached(image.case)
    assert rc == 1 and b"Image is corrupt" in err, err
    with pytest.raises(QemuCorrupt):
        ref_map(words, bitmaps, image.geo, image.size)


@qemu
@pytest.mark.parametrize("base,words,bitmaps", [pytest.param(*c[1:], id=c[0])
                                                for c in QEMU_CHECKS])
def test_library_refuses_what_qemu_refuses(patchable, base, words, bitmaps):
    image = patchable[base]
    image.write_l2(words, bitmaps or [0] * len(words))
    with qcow2kit.open(image.path) as img:
        with pytest.raises(CorruptImageError):
            M.map_extents(img)


@qemu
def test_extended_l2_window_inside_a_cluster(factory_images):
    """extl2_2M: cluster 0 holds a data subcluster at 64 KiB; a window starting in subcluster
    27 leaves the runs [0, 64K) and [64K, 128K) of cluster 0 outside it (they used to be
    'clipped' to negative lengths: wrong flags, lengths near 2**64)."""
    case = factory_images["extl2_2M"]
    assert lib_map(case, 1797928) == qemu_extents(case, window_args(1797928, None))


@pytest.fixture
def shrunk_extended_image(tmp_path) -> factory.ImageCase:
    """Extended L2, 64 KiB clusters, shrunk to 1000448 bytes: the last cluster keeps its
    subcluster bits past the end (data up to 32 KiB into it, zero subclusters after)."""
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "x.qcow2", "1M", cwd=tmp_path)
    qemu_io(tmp_path / "x.qcow2", "write -P 1 983040 65536", "write -z 1015808 10240")
    qemu_img("resize", "-q", "--shrink", "x.qcow2", "1000448", cwd=tmp_path)
    case = image_case("shrunk", tmp_path / "x.qcow2", 65536)
    assert qemu_extents(case)[-1] == {"start": 983040, "length": 17408, "depth": 0,
                                      "present": True, "zero": False, "data": True,
                                      "offset": 327680}
    return case


@qemu
def test_extended_l2_partial_last_cluster(shrunk_extended_image):
    """The same at the end of the disk, with no window at all."""
    case = shrunk_extended_image
    assert lib_map(case) == qemu_extents(case)


@pytest.fixture
def raw_with_holes(tmp_path) -> factory.ImageCase:
    """qcow2 over a raw backing file that has holes (the factory's raw base has none)."""
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    with open(tmp_path / "base.raw", "wb") as f:
        f.truncate(4 * MiB)
        f.write(b"\x11" * 64 * KiB)
        f.seek(MiB + 512)
        f.write(b"\x12" * 4096)
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "top.qcow2", "4M",
             cwd=tmp_path)
    qemu_io(tmp_path / "top.qcow2", "write -P 0x13 2M 64k")
    case = image_case("raw_holes", tmp_path / "top.qcow2", 65536, has_backing=True)
    # QEMU: a hole of the raw file reads as zero and holds no data
    assert {"start": 64 * KiB, "length": MiB - 64 * KiB, "depth": 1, "present": True,
            "zero": True, "data": False, "offset": 64 * KiB} in qemu_extents(case)
    return case


@qemu
def test_raw_backing_file_holes(raw_with_holes):
    """A hole of a raw layer is zero without data (its status is the file's own), unlike the
    hole of a preallocated qcow2 cluster (zero *and* data)."""
    case = raw_with_holes
    assert lib_map(case) == qemu_extents(case)


# =========================================================================== known bugs
#
# The fixtures below check their preconditions with require(), not assert: a failed assert
# in a fixture would count as the expected failure of an xfail(raises=AssertionError) test.


def require(cond: bool, what: str) -> None:
    if not cond:
        raise RuntimeError(f"precondition failed: {what}")


@pytest.fixture
def encrypted_with_compressed_cluster(tmp_path) -> factory.ImageCase:
    """Encrypted, 64 KiB clusters: cluster 0 written normally, cluster 1 compressed (QEMU 7.2
    writes compressed clusters into encrypted images, LUKS or AES, e.g. qemu-img convert -c).
    AES here: LUKS' key-derivation benchmark fails now and then under load."""
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    path = tmp_path / "lc.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "--object",
             f"secret,id={factory.SECRET_ID},data={factory.SECRET}", "-o",
             f"encrypt.format=aes,encrypt.key-secret={factory.SECRET_ID}",
             str(path), "1M", cwd=tmp_path)
    factory.run([factory.QEMU_IO, *factory.open_args(path, secret=factory.SECRET),
                 "-c", "write -P 1 0 64k", "-c", "write -c -P 2 64k 64k"], cwd=tmp_path)
    case = image_case("aes_compressed", path, 65536, encrypted=True, secret=factory.SECRET)
    with open(path, "rb") as f:  # L2 entries: a normal cluster, then a compressed one
        f.seek(parse_layout(path).l2_offsets[0])
        e0, e1 = struct.unpack(">QQ", f.read(16))
    require((e0 >> 62, e1 >> 62 & 1) == (2, 1), "a normal cluster, then a compressed one")
    require(qemu_extents(case)[0] == {"start": 0, "length": 128 * KiB, "depth": 0,
                                      "present": True, "zero": False, "data": True},
            "qemu-img 7.2 lists both clusters as one extent")
    return case


@qemu
def test_encrypted_compressed_cluster_next_to_data(encrypted_with_compressed_cluster,
                                                   capsysbinary):
    case = encrypted_with_compressed_cluster
    assert lib_map(case) == qemu_extents(case)
    assert run_cli(capsysbinary, case, "--output=json") == (0, qemu_map(case)[1], b"")


@qemu
@pytest.mark.parametrize("offset", ["9007199254740993", "9223372036854775807",
                                    "100000000000000000000"])
def test_cli_start_offset_is_parsed_exactly(factory_images, capsysbinary, offset):
    case = factory_images["cs64k"]
    qrc, qout, qerr = qemu_map(case, [f"--start-offset={offset}"])
    rc, out, err = run_cli(capsysbinary, case, "--output=json", f"--start-offset={offset}")
    if qrc == 0:
        assert (rc, out, err) == (0, qout, b"")
    else:
        assert rc == 1 and out == b"" and err.startswith(b"qcow2kit: ") and err.count(b"\n") == 1


@pytest.fixture
def extended_2m_256g(tmp_path) -> Path:
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M,extended_l2=on", "big.qcow2",
             "256G", cwd=tmp_path)
    qemu_io(tmp_path / "big.qcow2", "write -P 1 0 64k", "write -P 2 100G 64k")
    case = image_case("ext2m", tmp_path / "big.qcow2", 2 * MiB)
    require(lib_map(case) == qemu_extents(case), "qcow2kit maps the image as qemu-img does")
    return case.path


@qemu
def test_memory_budget_with_2m_extended_clusters(extended_2m_256g):
    def scan():
        with qcow2kit.open(extended_2m_256g) as img:
            for _ in M.map_batches(img, memory=1 * MiB):
                pass
    assert traced_peak(scan) <= 1 * MiB + SLACK


@pytest.fixture
def fragmented_prealloc(tmp_path) -> Path:
    """preallocation=metadata, 64 GiB, 64 KiB clusters; then 4 KiB of guest data written
    straight into every MiB of the first 32 GiB: 32768 data regions in the host file."""
    if not factory.have_qemu():
        pytest.skip("needs qemu-img")
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,preallocation=metadata",
             "pm.qcow2", "64G", cwd=tmp_path)
    path = tmp_path / "pm.qcow2"
    lay = parse_layout(path)
    with open(path, "rb") as f:  # each L2 table lies just before its 512 MiB of data
        for i in range(64):
            f.seek(lay.l2_offsets[i])
            first = struct.unpack(">Q", f.read(8))[0] & L2E_OFFSET_MASK
            f.seek(lay.l2_offsets[i] + 8 * 8191)
            last = struct.unpack(">Q", f.read(8))[0] & L2E_OFFSET_MASK
            require((first, last) == (lay.l2_offsets[i] + 65536, lay.l2_offsets[i] + 8192 * 65536),
                    "each L2 table lies just before its data clusters")
    fd = os.open(path, os.O_WRONLY)
    try:
        for g in range(0, 32 * GiB, MiB):
            os.pwrite(fd, b"\x01" * 4096, lay.l2_offsets[g >> 29] + 65536 + (g & (512 * MiB - 1)))
    finally:
        os.close(fd)
    with qcow2kit.open(path) as img:
        require(M.detect_metadata_preallocation(img), "looks metadata-preallocated")
        require(M.map_extents(img, 0, 4 * MiB).shape[0] == 8, "data, hole, data, ... in 4 MiB")
    return path


@qemu
def test_memory_budget_with_a_fragmented_preallocated_file(fragmented_prealloc):
    def scan():
        with qcow2kit.open(fragmented_prealloc) as img:
            for _ in M.map_batches(img, memory=1 * MiB):
                pass
    assert traced_peak(scan) <= 1 * MiB + SLACK
    # ... and the regions looked up per window still give qemu-img's map.
    with qcow2kit.open(fragmented_prealloc) as img:
        mine = [M.Extent.from_row(r).as_qemu()
                for r in M.map_extents(img, memory=1 * MiB)]
    assert mine == factory.qemu_img_map(fragmented_prealloc)
