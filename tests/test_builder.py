"""qcow2kit.builder: images written cluster by cluster, judged by qemu-img check and compare."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qcow2kit.builder import BuilderError, ImageBuilder
from qcow2kit.layout import header as H
from qemu import qemu_img

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="needs qemu-img (qemu-utils)")

KiB, MiB = 1 << 10, 1 << 20
ROOT = Path(__file__).resolve().parent.parent

# What the crash test's child and the tests share: the content and kind of every guest cluster.
HELPERS = '''
import numpy as np

def cluster_data(gc, cs, seed):
    """Cluster gc: a first half that does not compress, a second half that does."""
    words = np.arange(cs // 8, dtype=np.uint64) + np.uint64(gc * 7919 + seed)
    with np.errstate(over="ignore"):
        words *= np.uint64(0x9E3779B97F4A7C15)
        words ^= words >> np.uint64(29)
    words[cs // 16:] = np.uint64((gc + 1) * 0x0101010101010101 % (1 << 64))
    return words.tobytes()

KIND_OF = (0, 0, 0, 1, 2, 3)

def cluster_kind(gc, seed, kinds):
    """0 data, 1 compressed, 2 zero, 3 left unallocated (kinds < 4 drops the last ones)."""
    k = KIND_OF[(gc * 2654435761 + seed * 40503) % 6 % 6]
    return k if k < kinds else 0

def build(b, size, order, seed, kinds, zero_ok=True, compress_ok=True):
    """Write every cluster of ``order`` with ImageBuilder ``b``; return the expected content."""
    cs = b.cluster_size
    exp = bytearray(size)
    for gc in order:
        off = gc * cs
        n = min(cs, size - off)
        kind = cluster_kind(gc, seed, kinds)
        if kind == 3 or (kind == 2 and not zero_ok):
            continue
        if kind == 2:
            b.write_zero(off, n)
            continue
        data = cluster_data(gc, cs, seed)[:n]
        if kind == 1 and compress_ok:
            b.write_compressed(off, data)
        else:
            b.write(off, data)
        exp[off:off + n] = data
    return exp
'''
_h: dict = {}
exec(HELPERS, _h)
build = _h["build"]


def qemu_check(path) -> subprocess.CompletedProcess:
    return qemu_img("check", path, ok=None)


def qemu_compare(path, raw) -> subprocess.CompletedProcess:
    return qemu_img("compare", "-f", "qcow2", "-F", "raw", path, raw, ok=None)


def assert_valid_and_equal(path: Path, expected: bytes) -> str:
    raw = path.with_suffix(".raw")
    raw.write_bytes(expected)
    chk = qemu_check(path)
    assert chk.returncode == 0, chk.stdout + chk.stderr
    cmp = qemu_compare(path, raw)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    return chk.stdout


def header_of(path: Path) -> dict:
    with open(path, "rb") as f:
        return H.decode_header(f.read(4096))


CASES = {
    # name: (size, builder options, host order, kinds, batch bytes)
    "guest-order-64k": (24 * MiB, {}, "guest", 1, 4 * MiB),
    "guest-order-4k-sparse": (8 * MiB + 4096, {"cluster_size": 4096}, "guest", 4, 1 * MiB),
    "shuffled-64k-mixed": (16 * MiB, {}, "shuffled", 4, 2 * MiB),
    "shuffled-zstd": (8 * MiB, {"compression_type": "zstd", "cluster_size": 4096},
                      "shuffled", 4, 1 * MiB),
    "reverse-zlib": (8 * MiB, {"cluster_size": 8192}, "reverse", 3, 1 * MiB),
    "extended-l2": (16 * MiB, {"extended_l2": True, "cluster_size": 32768}, "shuffled", 4, MiB),
    "extended-l2-zstd": (8 * MiB, {"extended_l2": True, "compression_type": "zstd",
                                   "cluster_size": 16384}, "guest", 4, MiB),
    "cs512-odd-size": (2 * MiB + 1536, {"cluster_size": 512}, "shuffled", 4, 256 * KiB),
    "cs2M": (40 * MiB + 4096, {"cluster_size": 2 * MiB}, "shuffled", 4, 8 * MiB),
    "refcount-bits-1": (2 * MiB, {"cluster_size": 512, "refcount_bits": 1}, "shuffled", 4, MiB),
    "refcount-bits-64": (4 * MiB, {"cluster_size": 512, "refcount_bits": 64}, "shuffled", 4,
                         MiB),
    "compat-0.10": (4 * MiB, {"compat": "0.10", "cluster_size": 4096}, "shuffled", 4, MiB),
    "lazy-refcounts": (4 * MiB, {"lazy_refcounts": True, "cluster_size": 4096}, "guest", 4, MiB),
}


def _order(kind: str, n: int, seed: int) -> list[int]:
    if kind == "guest":
        return list(range(n))
    if kind == "reverse":
        return list(range(n - 1, -1, -1))
    return np.random.default_rng(seed).permutation(n).tolist()


@pytest.mark.parametrize("name", sorted(CASES))
def test_built_image_is_clean_and_holds_the_data(tmp_path, name):
    size, opts, order, kinds, batch = CASES[name]
    path = tmp_path / f"{name}.qcow2"
    with ImageBuilder(path, size, batch_bytes=batch, **opts) as b:
        n = b.guest_clusters
        expected = build(b, size, _order(order, n, 11), 5, kinds,
                         zero_ok=opts.get("compat") != "0.10")
    out = assert_valid_and_equal(path, bytes(expected))
    if order == "guest" and kinds == 1:
        assert "0.00% fragmented" in out, out
    if kinds >= 2 and opts.get("refcount_bits", 16) > 1:
        assert "compressed clusters" in out and " 0.00% compressed" not in out, out


def test_guest_order_is_unfragmented_across_l2_tables(tmp_path):
    """Many L2 tables (4 KiB clusters: 2 MiB per table), all data, guest order."""
    path = tmp_path / "many-l2.qcow2"
    size = 24 * MiB
    with ImageBuilder(path, size, cluster_size=4096, batch_bytes=MiB) as b:
        expected = build(b, size, range(b.guest_clusters), 3, 1)
    out = assert_valid_and_equal(path, bytes(expected))
    # host contiguity breaks once per group of 8 L2 tables (16 MiB here) and once per new
    # refcount block (placed where the next cluster goes, every 8 MiB of file here): 3 of 6144
    frag = float(out.split("% fragmented")[0].rsplit(" ", 1)[1])
    assert frag <= 0.05, out


def test_refcount_table_grows(tmp_path):
    """512-byte clusters: a one-cluster refcount table covers 64 refcount blocks of 256
    clusters, 8 MiB of file; a 12 MiB file needs a new, larger table."""
    path = tmp_path / "grow.qcow2"
    size = 12 * MiB
    with ImageBuilder(path, size, cluster_size=512, batch_bytes=2 * MiB) as b:
        first = header_of(path)
        expected = build(b, size, range(b.guest_clusters), 9, 1)
    h = header_of(path)
    assert (first["refcount_table_offset"], first["refcount_table_clusters"]) == (512, 1)
    assert h["refcount_table_clusters"] > 1
    assert h["refcount_table_offset"] != first["refcount_table_offset"]
    assert_valid_and_equal(path, bytes(expected))


def test_refcount_table_grows_shuffled_64bit(tmp_path):
    path = tmp_path / "grow64.qcow2"
    size = 6 * MiB
    with ImageBuilder(path, size, cluster_size=512, refcount_bits=64,
                      batch_bytes=512 * KiB) as b:
        expected = build(b, size, _order("shuffled", b.guest_clusters, 2), 4, 3)
    assert header_of(path)["refcount_table_clusters"] > 1
    assert_valid_and_equal(path, bytes(expected))


def test_backing_file(tmp_path):
    """The builder writes some clusters; the rest reads from the backing file; zero
    clusters hide it."""
    backing = tmp_path / "base.qcow2"
    size = 8 * MiB
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(backing), str(size)],
                   check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P 0x5a 0 {size}", str(backing)],
                   check=True, capture_output=True)
    path = tmp_path / "top.qcow2"
    cs = 65536
    expected = bytearray(b"\x5a" * size)
    with ImageBuilder(path, size, backing_file=str(backing), backing_fmt="qcow2") as b:
        for gc in range(0, size // cs, 3):
            data = bytes([gc % 256]) * cs
            if gc % 2:
                b.write_compressed(gc * cs, data)
            else:
                b.write(gc * cs, data)
            expected[gc * cs:(gc + 1) * cs] = data
        for gc in range(1, size // cs, 7):
            if gc % 3:
                b.write_zero(gc * cs, cs)
                expected[gc * cs:(gc + 1) * cs] = bytes(cs)
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                          capture_output=True, text=True).stdout
    assert '"backing-filename-format": "qcow2"' in info
    assert_valid_and_equal(path, bytes(expected))


@pytest.mark.parametrize("extended", [False, True])
def test_external_data_file(tmp_path, extended):
    """Data in the data file at its guest offset; zero clusters; qemu-img finds the data file
    through the header extension."""
    path, data_file = tmp_path / "meta.qcow2", tmp_path / "data.raw"
    size, cs = 8 * MiB, 65536
    with ImageBuilder(path, size, data_file=str(data_file), extended_l2=extended,
                      batch_bytes=MiB) as b:
        expected = build(b, size, _order("shuffled", b.guest_clusters, 4), 6, 4,
                         compress_ok=False)
        with pytest.raises(BuilderError):   # QEMU cannot compress into a data file either
            b.write_compressed(0, bytes(cs))
    assert_valid_and_equal(path, bytes(expected))
    assert data_file.stat().st_size == size


def test_incompressible_cluster_falls_back_to_normal(tmp_path):
    path = tmp_path / "incompressible.qcow2"
    data = np.random.default_rng(0).integers(0, 256, 65536, dtype=np.uint8).tobytes()
    with ImageBuilder(path, MiB) as b:
        b.write_compressed(0, data)
    out = assert_valid_and_equal(path, data + bytes(MiB - len(data)))
    assert "0.00% compressed" in out


def test_compressed_streams_cross_into_the_next_cluster(tmp_path):
    """Streams are packed back to back as QEMU's qcow2_alloc_bytes packs them: one that does
    not fit in what is left of its host cluster continues into the next cluster when that is
    the one allocated next (both clusters count a reference)."""
    from qcow2kit import tables as T

    path = tmp_path / "packed.qcow2"
    cs, n = 512, 64
    rng = np.random.default_rng(3)
    # ~200 random bytes and zeros: streams of ~220 bytes, so about every other one crosses
    clusters = [rng.integers(0, 256, 200, dtype=np.uint8).tobytes() + bytes(cs - 200)
                for _ in range(n)]
    with ImageBuilder(path, n * cs, cluster_size=cs) as b:
        for gc, data in enumerate(clusters):
            b.write_compressed(gc * cs, data)
        l1_offset = b.plan.allocator.l1_offset
    out = assert_valid_and_equal(path, b"".join(clusters))
    assert "100.00% compressed" in out, out
    geo = T.L2Geometry(9, False, False)
    with open(path, "rb") as f:
        f.seek(l1_offset)
        l2_offset = int(T.l1_offsets(T.decode_u64_table(f.read(8)))[0])
        f.seek(l2_offset)
        units = T.classify(*T.decode_l2(f.read(cs), geo), geo)
    assert (units.kind[:n] == T.COMPRESSED).all()
    first = units.host[:n] // cs
    last = (units.host[:n] + units.csize[:n] - 1) // cs
    assert np.count_nonzero(last != first) > n // 4
    assert np.unique(first).shape[0] < n // 2


def test_misuse_is_refused(tmp_path):
    path = tmp_path / "misuse.qcow2"
    with ImageBuilder(path, MiB, cluster_size=4096) as b:
        with pytest.raises(BuilderError):
            b.write(512, bytes(4096))
        with pytest.raises(BuilderError):
            b.write(MiB, bytes(4096))
        b.write(0, bytes(4096))
        with pytest.raises(BuilderError):
            b.write_zero(0, 4096)
    with ImageBuilder(tmp_path / "v2.qcow2", MiB, compat="0.10") as b:
        with pytest.raises(BuilderError):
            b.write_zero(0, 65536)
    assert qemu_check(path).returncode == 0


def test_multi_cluster_runs_across_l2_tables(tmp_path):
    """Runs of many clusters (one write call each) that cross L2 tables, written out of order
    with zero runs between them; a run overlapping a queued cluster is refused whole."""
    cs = 4096
    size = 3 * (cs // 8) * cs + 5 * cs          # three L2 tables and a bit
    path = tmp_path / "runs.qcow2"
    expected = bytearray(size)
    rng = np.random.default_rng(5)
    with ImageBuilder(path, size, cluster_size=cs, batch_bytes=256 * KiB) as b:
        for first, n in ((700, 600), (3, 500), (1310, size // cs - 1310)):
            data = rng.integers(1, 255, n * cs, dtype=np.uint8).tobytes()
            b.write(first * cs, data)
            expected[first * cs:(first + n) * cs] = data
        b.write_zero(510 * cs, 150 * cs)
        with pytest.raises(BuilderError, match="guest cluster 700 written twice"):
            b.write(690 * cs, bytes(20 * cs))
        b.write(690 * cs, b"\x01" * (10 * cs))      # the refused run left these free
        expected[690 * cs:700 * cs] = b"\x01" * (10 * cs)
    assert_valid_and_equal(path, bytes(expected))


def test_unsafe_cache_writes_the_same_bytes_without_fsync(tmp_path, monkeypatch):
    """cache="unsafe" changes when data reaches the disk, never what is written: the file is
    byte for byte the one cache="writeback" writes, and no fsync is called (create included)."""
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd):
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    size, cs = 8 * MiB, 4096
    order = _order("shuffled", size // cs, 3)
    counts, batches = {}, []
    for cache in ("writeback", "unsafe"):
        calls.clear()
        with ImageBuilder(tmp_path / f"{cache}.qcow2", size, cluster_size=cs,
                          batch_bytes=256 * KiB, checkpoint_bytes=MiB, cache=cache,
                          on_commit=batches.append) as b:
            expected = build(b, size, order, 3, 4)
        counts[cache] = len(calls)
        assert_valid_and_equal(tmp_path / f"{cache}.qcow2", bytes(expected))
    assert (tmp_path / "writeback.qcow2").read_bytes() == (tmp_path / "unsafe.qcow2").read_bytes()
    assert counts["unsafe"] == 0
    checkpoints = len(batches) // 2
    assert checkpoints >= 4
    # create's two, then per checkpoint: data+refcounts, then L2 tables (L1 when it grew)
    assert 2 + 2 * checkpoints <= counts["writeback"] <= 2 + 4 * checkpoints
    with pytest.raises(BuilderError, match="cache mode 'none'"):
        ImageBuilder(tmp_path / "x.qcow2", MiB, cache="none")
    assert not (tmp_path / "x.qcow2").exists()


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_build_from_raw_allocates_what_qemu_img_convert_allocates(tmp_path, cache):
    """A raw file with zero clusters, zero runs across L2 tables and a short last cluster:
    the built image equals the raw file and allocates exactly the clusters qemu-img
    convert -O qcow2 allocates."""
    from qcow2kit.builder import build_from_raw

    cs = 65536
    n = 2 * 8192 + 300                      # past two L2 tables
    rng = np.random.default_rng(9)
    nonzero = rng.random(n) < 0.6
    nonzero[8000:8500] = False              # a zero run across an L2 boundary
    nonzero[-1] = True
    raw = tmp_path / "src.raw"
    with open(raw, "wb") as f:
        for gc in range(n):
            if nonzero[gc]:
                block = bytearray(cs)
                block[rng.integers(0, cs)] = 1 + gc % 255
                f.write(block)
            else:
                f.write(bytes(cs))
        f.truncate(n * cs - 1000)           # a short last cluster
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    build_from_raw(ours, raw, cache=cache)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(theirs)],
                   check=True)
    chk = qemu_check(ours)
    assert chk.returncode == 0, chk.stdout
    assert "0.00% fragmented" in chk.stdout
    assert qemu_compare(ours, raw).returncode == 0

    def allocation(path):
        out = subprocess.run(["qemu-img", "map", "--output=json", str(path)], check=True,
                             capture_output=True, text=True).stdout
        import json
        return [(e["start"], e["length"], e["data"], e["zero"]) for e in json.loads(out)]

    assert allocation(ours) == allocation(theirs)


# --------------------------------------------------------------------------- crash safety

CHILD = HELPERS + '''
import os, sys
import numpy as np
from qcow2kit.builder import ImageBuilder
path, log, size, cs, seed = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
cache = sys.argv[6]
fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
def commit(gcs):
    os.write(fd, ("\\n".join(map(str, gcs.tolist())) + "\\n").encode())
if len(sys.argv) > 7:   # a file size limit: writes past it fail with EFBIG
    import resource, signal
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[7]),) * 2)
with ImageBuilder(path, size, cluster_size=cs, batch_bytes=256 * 1024,
                  checkpoint_bytes=1024 * 1024, on_commit=commit, cache=cache) as b:
    order = np.random.default_rng(seed).permutation(b.guest_clusters).tolist()
    build(b, size, order, seed, 4)
'''

CRASH_SIZE, CRASH_CS, CRASH_SEED = 16 * MiB, 512, 21


def _wait_stopped_or_done(proc: subprocess.Popen, timeout: float = 120) -> bool:
    """True when the child stopped itself (SIGSTOP), False when it exited."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            return False
        try:
            state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            state = ""
        if state in ("T", "t"):
            return True
        time.sleep(0.01)
    raise AssertionError("the builder neither stopped nor finished")


@pytest.mark.parametrize("stop_at,cache", [
    *((n, "writeback") for n in (1, 2, 3, 4, 5, 7, 12, 20, 33, 50, 75, 100, 137, 138, 139, 140,
                                 141, 160, 180, 400)),
    *((n, "unsafe") for n in (2, 33, 138, 140, 400))])
def test_sigkill_leaves_a_valid_image_with_the_committed_data(tmp_path, stop_at, cache):
    """16 MiB of shuffled data, compressed and zero 512-byte clusters, in 256 KiB batches
    (a step each) and checkpoints (steps 2 to 4; one after every batch here, as each
    adds refcount blocks to the table), killed after step ``stop_at``.  The refcount table
    moves after step 138 (the header points at it in step 139); the build ends at step
    181.  qemu-img check finds no corruption, every committed cluster reads back, every
    other reads as zeros or as written.  With cache="unsafe" (no fsync) the same holds
    after a killed process: the page cache keeps the order."""
    path, log = tmp_path / "crash.qcow2", tmp_path / "commits.log"
    env = dict(os.environ, QCOW2KIT_WRITER_STOP_AT=str(stop_at),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(log), str(CRASH_SIZE),
                             str(CRASH_CS), str(CRASH_SEED), cache], env=env)
    try:
        stopped = _wait_stopped_or_done(proc)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    if not stopped:
        assert proc.returncode == 0
    _assert_committed_data_survives(tmp_path, path, log, finished=not stopped)


def test_a_write_error_mid_batch_commits_nothing_of_that_batch(tmp_path):
    """A file size limit (RLIMIT_FSIZE: the kernel refuses writes past 5 MiB with EFBIG)
    stops the build in the middle of a batch.  The builder leaves the ``with`` block by
    the exception, commits none of the half-written batch, and the image is still valid
    with every committed cluster in it."""
    path, log = tmp_path / "efbig.qcow2", tmp_path / "commits.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cs = 4096     # one refcount block covers 8 MiB: several batches between checkpoints
    proc = subprocess.run([sys.executable, "-c", CHILD, str(path), str(log), str(CRASH_SIZE),
                           str(cs), str(CRASH_SEED), "writeback", str(5 * MiB)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "File too large" in proc.stderr, proc.stderr
    assert path.stat().st_size <= 5 * MiB
    committed = _assert_committed_data_survives(tmp_path, path, log, finished=False, cs=cs)
    assert len(committed) > 500


def _assert_committed_data_survives(tmp_path: Path, path: Path, log: Path, finished: bool,
                                    cs: int = CRASH_CS) -> set[int]:
    chk = qemu_check(path)
    assert chk.returncode in (0, 3), chk.stdout + chk.stderr
    raw = tmp_path / "out.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(path), str(raw)], check=True)
    got = np.frombuffer(raw.read_bytes(), dtype=np.uint8).reshape(-1, cs)
    committed = {int(x) for x in log.read_text().split()} if log.exists() else set()
    kinds = {gc: _h["cluster_kind"](gc, CRASH_SEED, 4) for gc in range(got.shape[0])}
    for gc in range(got.shape[0]):
        want = _h["cluster_data"](gc, cs, CRASH_SEED) if kinds[gc] in (0, 1) else None
        have = got[gc].tobytes()
        if gc in committed and want is not None:
            assert have == want, f"committed cluster {gc} does not read back"
        elif not (want is not None and have == want):
            assert not any(have), f"cluster {gc} holds bytes never written there"
    if finished:   # the build finished: everything is there, in a grown refcount table
        assert len(committed) == sum(1 for k in kinds.values() if k != 3)
        assert header_of(path)["refcount_table_clusters"] > 1
    return committed


# --------------------------------------------------------------------------- property test

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@hypothesis.settings(max_examples=25, deadline=None,
                     suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])
@hypothesis.given(
    cluster_bits=st.sampled_from([9, 12, 16]),
    clusters=st.integers(1, 300),
    ops=st.lists(st.tuples(st.integers(0, 299), st.integers(0, 2), st.integers(0, 255)),
                 max_size=120),
    batch=st.sampled_from([1, 4, 64]),
    compression=st.sampled_from(["zlib", "zstd"]),
)
def test_random_write_sequences(tmp_path, cluster_bits, clusters, ops, batch, compression):
    cs = 1 << cluster_bits
    size = clusters * cs
    path = tmp_path / "prop.qcow2"
    expected = bytearray(size)
    seen: set[int] = set()
    with ImageBuilder(path, size, cluster_size=cs, batch_bytes=batch * cs,
                      compression_type=compression) as b:
        for gc, kind, byte in ops:
            if gc >= clusters or gc in seen:
                continue
            seen.add(gc)
            data = bytes([byte]) * (cs // 2) + bytes(range(256)) * (cs // 512)
            if kind == 2:
                b.write_zero(gc * cs, cs)
                continue
            (b.write_compressed if kind else b.write)(gc * cs, data)
            expected[gc * cs:(gc + 1) * cs] = data
    assert_valid_and_equal(path, bytes(expected))


def test_reserve_runs_many_ranges_in_one_call(tmp_path):
    """reserve_runs over sorted ranges spread across many L2 tables (512-byte clusters: 64
    per table), some clusters written before, then some ranges sharing a cluster (reserved
    one range at a time): every cluster reserved once, in guest order, and what is filled
    reads back through qemu-img; the rest reads as zeros."""
    import json
    import random

    cs, size = 512, 4 * MiB
    path = tmp_path / "runs.qcow2"
    rng = random.Random(7)
    n = size // cs
    expected = bytearray(size)
    with ImageBuilder(path, size, cluster_size=cs, batch_bytes=64 * KiB) as b:
        written = sorted(rng.sample(range(n), 200))
        for g in written:
            data = bytes([g % 251 + 1]) * cs
            b.write(g * cs, data)
            expected[g * cs:(g + 1) * cs] = data
        picked = sorted(rng.sample(range(n), 1500))
        runs = [(g * cs, cs * rng.randint(1, 3)) for g in picked]
        runs = [(a, min(ln, (picked[k + 1] - picked[k]) * cs) if k + 1 < len(picked) else ln)
                for k, (a, ln) in enumerate(runs)]
        want = set()
        for a, ln in runs:
            want.update(range(a // cs, -(-(a + ln) // cs)))
        assert b.reserve_runs(runs) == len(want - set(written))
        assert b.reserve_runs(runs) == 0                      # all reserved already
        # unaligned ranges that share clusters: taken one at a time, each cluster once
        assert b.reserve_runs([(size - 10 * cs + 100, 300), (size - 10 * cs + 200, 2 * cs)]) \
            == 3 - len({n - 10, n - 9, n - 8} & set(written))
        reserved = np.flatnonzero(b.reserved(0, size))
        assert set(reserved.tolist()) == (want | {n - 10, n - 9, n - 8}) - set(written)
        for g in reserved[::3].tolist():
            data = bytes([g % 247 + 3]) * cs
            b.fill(g * cs, data)
            expected[g * cs:(g + 1) * cs] = data
        b.unreserve(keep=True)
    assert_valid_and_equal(path, bytes(expected))
    # reserved in guest order: host offsets rise with guest offsets
    m = json.loads(qemu_img("map", "--output=json", path).stdout)
    host = {(e["start"] + k) // cs: e["offset"] + k for e in m if "offset" in e
            for k in range(0, e["length"], cs)}
    hosts = [host[g] for g in reserved.tolist()]
    assert hosts == sorted(hosts) and len(set(hosts)) == len(hosts)
