"""The vectorized ``qemu-img map`` renderers (qcow2kit.cli.render.map_json_chunks,
map_human_chunks) against slow per-line references and against qemu-img 7.2 itself.

* property tests: random extent arrays (values up to 2**63-1, depth up to 65535,
  every flag combination), cut into batches anywhere (empty batches included)
  and formatted in blocks of a few rows, must give exactly what the per-line
  references give: ``map_entry_json`` for JSON, and for the human form a port
  of qemu-img.c's ``dump_map_entry`` loop (including its quirk of turning an
  entry into a plain zero entry before checking it);
* qemu-img: images made here and the shared factory images are mapped by
  qemu-img in both forms; its JSON is parsed into extent arrays, cut into
  random batches and rendered again, and the bytes must be qemu-img's stdout
  (for a human map that qemu-img refuses: the lines it printed before failing,
  then the error);
* throughput: :func:`measure_throughput` prints lines per second next to a
  per-line f-string loop (``python tests/test_render_map.py [N]``, or
  ``pytest -s -k throughput``); nothing about wall-clock time is asserted.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qcow2kit.cli.render import map as R
from qemu import QEMU_IMG, QEMU_IO, open_args, run_process
from qemu import qemu_io as run_qemu_io
from qcow2kit.cli.render.map import (
    EXTENT_DTYPE,
    MAP_HUMAN_ERROR,
    MAP_HUMAN_HEADER,
    MapRenderError,
    map_entry_json,
    map_human_chunks,
    map_json_chunks,
    render_map_human,
)

PRESENT, ZERO, DATA, OFFSET, COMPRESSED = 1, 2, 4, 8, 16
MAX63 = 2 ** 63 - 1

QEMU_ENV = dict(os.environ, LC_ALL="C")
needs_qemu = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img / qemu-io not installed")


# --------------------------------------------------------------------------
# Conversions and slow references
# --------------------------------------------------------------------------

def to_array(rows) -> np.ndarray:
    """(start, length, offset, depth, kind, flags) tuples -> EXTENT_DTYPE array."""
    return np.array([tuple(r) for r in rows], dtype=EXTENT_DTYPE).reshape(-1)


def from_qemu(entries: list[dict]) -> np.ndarray:
    """Parsed ``qemu-img map --output=json`` -> EXTENT_DTYPE array."""
    return to_array((e["start"], e["length"], e.get("offset", 0), e["depth"], 0,
                     (PRESENT if e["present"] else 0) | (ZERO if e["zero"] else 0)
                     | (DATA if e["data"] else 0) | (OFFSET if "offset" in e else 0))
                    for e in entries)


def entries(arr: np.ndarray) -> list[dict]:
    """EXTENT_DTYPE array -> dicts with the JSON member names (offset None if invalid)."""
    return [{"start": s, "length": ln, "depth": d, "present": bool(f & PRESENT),
             "zero": bool(f & ZERO), "data": bool(f & DATA),
             "offset": o if f & OFFSET else None}
            for s, ln, o, d, _k, f in arr.tolist()]


def json_reference(arr: np.ndarray, empty_start: int = 0) -> bytes:
    if len(arr) == 0:
        return ('[{ "start": %d, "length": 0, "depth": 0, "present": false, "zero": false,'
                ' "data": false}]\n' % empty_start).encode()
    return ("[" + ",\n".join(map_entry_json(e) for e in entries(arr)) + "]\n").encode()


def c_hash_hex(v: int) -> bytes:
    """printf("%#x", v): no "0x" for zero."""
    return b"%#x" % v if v else b"0"


def human_reference(arr: np.ndarray, filenames) -> tuple[bytes, int | None]:
    """qemu-img.c img_map / dump_map_entry (human), one dump per extent: (stdout,
    index of the extent it fails at, or None)."""
    out = [MAP_HUMAN_HEADER.encode()]
    ents = entries(arr)
    for i, e in enumerate(ents):
        if e["data"] and e["offset"] is None:
            return b"".join(out), i
        if e["data"] and not e["zero"]:
            out.append(c_hash_hex(e["start"]).ljust(16) + c_hash_hex(e["length"]).ljust(16)
                       + c_hash_hex(e["offset"]).ljust(16)
                       + filenames[e["depth"]].encode("utf-8", "surrogateescape") + b"\n")
        # "This format ignores the distinction between 0, ZERO and ZERO|DATA."
        if i + 1 < len(ents) and (not ents[i + 1]["data"] or ents[i + 1]["zero"]):
            ents[i + 1]["data"] = False
            ents[i + 1]["zero"] = True
    return b"".join(out), None


def split(arr: np.ndarray, cuts) -> list[np.ndarray]:
    """``arr`` cut at the given positions (repeats make empty batches)."""
    cuts = sorted(min(max(c, 0), len(arr)) for c in cuts)
    bounds = [0, *cuts, len(arr)]
    return [arr[a:b] for a, b in zip(bounds, bounds[1:])]


def random_split(arr: np.ndarray, rng: random.Random) -> list[np.ndarray]:
    n = len(arr)
    k = rng.choice([0, 1, 2, 5, 20])
    return split(arr, [rng.randint(0, n) for _ in range(k)])


def render_human(batches, filenames) -> tuple[bytes, MapRenderError | None]:
    """The chunks map_human_chunks yields before it stops, and its error."""
    got = []
    try:
        for chunk in map_human_chunks(batches, filenames):
            assert isinstance(chunk, bytes) and chunk
            got.append(chunk)
    except MapRenderError as exc:
        return b"".join(got), exc
    return b"".join(got), None


def small_blocks(rows: int, chunk: int):
    """Format ``rows`` lines at a time, yield chunks of ``chunk`` lines."""
    return mock.patch.multiple(R, _ROWS=rows, _CHUNK=chunk)


# --------------------------------------------------------------------------
# Property tests against the references
# --------------------------------------------------------------------------

_EDGES = sorted({v for k in range(20) for v in (10 ** k - 1, 10 ** k)}
                | {v for k in range(16) for v in (16 ** k - 1, 16 ** k)}
                | {2 ** 56, 2 ** 62, MAX63 - 1, MAX63})
_EDGES = [v for v in _EDGES if 0 <= v <= MAX63]

u63 = st.one_of(st.sampled_from(_EDGES), st.integers(0, MAX63), st.integers(0, 2 ** 40),
                st.integers(0, 300))
flag_values = st.integers(0, 31)


def extent_arrays(depths=st.integers(0, 65535), max_size=40):
    row = st.tuples(u63, u63, u63, depths, st.integers(0, 255), flag_values)
    return st.lists(row, max_size=max_size).map(to_array)


@st.composite
def batched(draw, arrays):
    arr = draw(arrays)
    cuts = draw(st.lists(st.integers(0, len(arr)), max_size=6))
    rows = draw(st.integers(1, 7))
    chunk = draw(st.integers(1, 20))
    return arr, split(arr, cuts), rows, chunk


@settings(max_examples=400, deadline=None)
@given(batched(extent_arrays()))
def test_json_matches_reference(case):
    arr, batches, rows, chunk = case
    with small_blocks(rows, chunk):
        chunks = list(map_json_chunks(batches))
    assert b"".join(chunks) == json_reference(arr)
    # a chunk per `chunk` extents of every non-empty batch, then "]\n"
    assert len(chunks) == 1 + sum(-(-len(b) // chunk) for b in batches)
    assert all(isinstance(c, bytes) and c for c in chunks)


@settings(max_examples=100, deadline=None)
@given(extent_arrays(max_size=10), st.integers(1, 30))
def test_json_default_blocks_and_copy_free_inputs(arr, step):
    # default block sizes; batches that are strided views or have another field order
    assert b"".join(map_json_chunks([arr])) == json_reference(arr)
    assert b"".join(map_json_chunks([arr[::-1][::2]])) == json_reference(arr[::-1][::2])
    other = np.dtype([("flags", "u1"), ("depth", ">u2"), ("offset", ">u8"), ("kind", "u1"),
                      ("length", "<u8"), ("start", ">u8")])
    conv = np.empty(len(arr), other)
    for name in other.names:
        conv[name] = arr[name]
    assert b"".join(map_json_chunks(split(conv, [step % 7]))) == json_reference(arr)


def test_json_empty_map():
    # qemu-img map prints its initial zero-length entry when there is no extent
    expected = b'[{ "start": 0, "length": 0, "depth": 0, "present": false, "zero": false, "data": false}]\n'
    assert b"".join(map_json_chunks([])) == expected
    empty = np.zeros(0, EXTENT_DTYPE)
    assert list(map_json_chunks([empty, empty])) == [expected]
    assert b"".join(map_json_chunks(iter([]), empty_start=4096)) == expected.replace(
        b'"start": 0', b'"start": 4096')


def test_json_extremes():
    arr = to_array([(MAX63, MAX63, MAX63, 65535, 255, 31), (0, 0, 0, 0, 0, 0),
                    (9999, 10000, 99999999, 9, 1, OFFSET), (10 ** 18, 10 ** 18 - 1, 1, 10, 2, 15)])
    assert b"".join(map_json_chunks([arr])) == json_reference(arr)
    # unsigned beyond int64 (no image can have it): printed as unsigned
    big = to_array([(2 ** 64 - 1, 2 ** 63, 2 ** 64 - 1, 1, 0, 15)])
    assert b"".join(map_json_chunks([big])) == json_reference(big)


def test_json_large_batch():
    rng = np.random.default_rng(7)
    n = R._CHUNK + R._ROWS + 123
    arr = synthetic_extents(n, rng)
    arr["offset"][::97] = rng.integers(0, 2 ** 63, len(arr[::97]), dtype=np.uint64)
    chunks = list(map_json_chunks([arr[:5], arr[5:]]))
    assert len(chunks) == 1 + 1 + 2
    assert b"".join(chunks) == json_reference(arr)


filename_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@st.composite
def human_case(draw):
    names = draw(st.lists(filename_text, min_size=1, max_size=5))
    arr = draw(extent_arrays(depths=st.integers(0, len(names) - 1)))
    if draw(st.booleans()):      # mostly printable extents, so that lines get printed
        keep = np.array(draw(st.lists(st.booleans(), min_size=len(arr), max_size=len(arr))),
                        dtype=bool)
        arr["flags"][keep] = (arr["flags"][keep] & (0xFF ^ ZERO)) | DATA | OFFSET
    cuts = draw(st.lists(st.integers(0, len(arr)), max_size=6))
    return names, arr, split(arr, cuts), draw(st.integers(1, 7)), draw(st.integers(1, 20))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(human_case())
def test_human_matches_reference(case):
    names, arr, batches, rows, chunk = case
    expected, fail_at = human_reference(arr, names)
    with small_blocks(rows, chunk):
        got, err = render_human(batches, names)
    assert got == expected
    if fail_at is None:
        assert err is None
    else:
        assert err is not None and str(err) == MAP_HUMAN_ERROR and isinstance(err, ValueError)
        assert (err.index, err.start, err.length) == (
            fail_at, int(arr["start"][fail_at]), int(arr["length"][fail_at]))


@settings(max_examples=150, deadline=None)
@given(human_case())
def test_human_matches_render_map_human(case):
    # the module's older per-line renderer refuses every data extent without an
    # offset; where no such extent reads as zeroes it must agree with qemu-img's rule
    names, arr, batches, rows, chunk = case
    f = arr["flags"]
    arr = arr[~(((f & (DATA | OFFSET)) == DATA) & ((f & ZERO) != 0))]
    ents = entries(arr)
    for e in ents:
        e["filename"] = names[e["depth"]]
    try:
        expected, raised = render_map_human(ents).encode("utf-8", "surrogateescape"), False
    except ValueError:
        raised = True
    got, err = render_human(split(arr, [len(arr) // 2]), names)
    assert (err is not None) == raised
    if not raised:
        assert got == expected


def test_human_zero_data_without_offset_is_only_refused_first():
    zero_data = (0, 512, 0, 0, 0, PRESENT | ZERO | DATA)
    plain = (512, 512, 4096, 0, 0, PRESENT | DATA | OFFSET)
    later = (1024, 512, 0, 0, 0, PRESENT | ZERO | DATA)
    arr = to_array([plain, later, (1536, 512, 0, 0, 0, 0)])
    got, err = render_human([arr[:1], arr[:0], arr[1:]], ["f"])
    assert err is None and got == human_reference(arr, ["f"])[0]
    assert got.endswith(b"0x200           0x200           0x1000          f\n")
    got, err = render_human([to_array([zero_data]), arr], ["f"])
    assert got == MAP_HUMAN_HEADER.encode() and err is not None and err.index == 0


def test_human_compressed_after_lines():
    arr = to_array([(0, 65536, 327680, 0, 0, PRESENT | DATA | OFFSET),
                    (65536, 65536, 0, 1, 0, ZERO),
                    (131072, 65536, 0, 0, 0, PRESENT | DATA | COMPRESSED),
                    (196608, 65536, 458752, 0, 0, PRESENT | DATA | OFFSET)])
    for batches in ([arr], [arr[:1], arr[1:2], arr[2:]], split(arr, [2, 2, 3])):
        got, err = render_human(batches, ["c.qcow2", "b.qcow2"])
        assert got == MAP_HUMAN_HEADER.encode() + b"0               0x10000         0x50000         c.qcow2\n"
        assert err.index == 2 and err.start == 131072 and err.length == 65536


def test_human_names_and_extremes():
    names = [f"layer{i}.qcow2" for i in range(65536)]
    names[7] = ""
    names[65535] = "sp ace/ü/" + os.fsdecode(b"\xff\xfe") + ".img"
    rows = [(MAX63, MAX63, MAX63, 65535, 0, DATA | OFFSET),
            (2 ** 56, 2 ** 60 - 1, 0, 7, 0, PRESENT | DATA | OFFSET),
            (0, 0, 0, 300, 0, DATA | OFFSET), (15, 16, 255, 65535, 0, DATA | OFFSET),
            (2 ** 64 - 1, 2 ** 64 - 16, 2 ** 63, 1, 0, DATA | OFFSET)]
    arr = to_array(rows)
    got, err = render_human([arr], names)
    assert err is None and got == human_reference(arr, names)[0]
    assert b"\xff\xfe.img\n" in got and b"0x7fffffffffffffff0x7fffffffffffffff0x7fff" in got
    assert b"\n0               0               0               layer300.qcow2\n" in got
    with pytest.raises(IndexError):
        list(map_human_chunks([arr], names[:10]))


def test_human_nothing_printed():
    arr = to_array([(0, 512, 0, 0, 0, ZERO), (512, 512, 0, 0, 0, PRESENT | ZERO | DATA | OFFSET)])
    assert list(map_human_chunks([arr, arr[:0]], ["x"])) == [MAP_HUMAN_HEADER.encode()]
    assert list(map_human_chunks([], [])) == [MAP_HUMAN_HEADER.encode()]


def test_human_large_batch():
    rng = np.random.default_rng(3)
    arr = synthetic_extents(R._CHUNK * 2 + 17, rng)
    arr["flags"] = rng.choice([PRESENT | DATA | OFFSET, PRESENT | ZERO | DATA | OFFSET, ZERO],
                              len(arr))
    names = ["top.qcow2", "base image.qcow2"]
    got, err = render_human([arr], names)
    assert err is None and got == human_reference(arr, names)[0]


# --------------------------------------------------------------------------
# Against qemu-img
# --------------------------------------------------------------------------

def qemu(*args: str, cwd: Path, ok=(0,)) -> subprocess.CompletedProcess:
    """A QEMU tool in the C locale, output as bytes."""
    return run_process(args, cwd=cwd, ok=ok, env=QEMU_ENV, text=False)


def qemu_io(cwd: Path, name: str, *cmds: str) -> None:
    run_qemu_io(name, *cmds, cwd=cwd, env=QEMU_ENV)


def create(cwd: Path, name: str, size: str, *opts: str) -> None:
    qemu(QEMU_IMG, "create", "-f", "qcow2", *opts, name, size, cwd=cwd)


def chain_filenames(open_args: list[str], cwd: Path) -> list[str]:
    """The file each depth's data lives in, as qemu-img names it: the image's
    filename, or its external data file."""
    out = qemu(QEMU_IMG, "info", "--backing-chain", "--output=json", *open_args, cwd=cwd).stdout
    names = []
    for info in json.loads(out):
        data_file = (info.get("format-specific", {}).get("data", {}) or {}).get("data-file")
        names.append(data_file or info["filename"])
    return names


def check_against_qemu(open_args: list[str], cwd: Path, rng: random.Random,
                       map_args: tuple[str, ...] = ()) -> np.ndarray:
    """Render qemu-img's map of an image again, both forms, random batches; return
    the extents."""
    r = qemu(QEMU_IMG, "map", "--output=json", *map_args, *open_args, cwd=cwd)
    arr = from_qemu(json.loads(r.stdout))
    start = next((int(a.split("=", 1)[1]) for a in map_args if a.startswith("--start-offset=")), 0)
    for attempt in range(4):
        batches = [arr] if attempt == 0 else random_split(arr, rng)
        blocks = small_blocks(rng.randint(1, 9), rng.randint(1, 30)) if attempt == 3 \
            else contextlib.nullcontext()
        with blocks:
            assert b"".join(map_json_chunks(batches, empty_start=start)) == r.stdout
    h = qemu(QEMU_IMG, "map", *map_args, *open_args, cwd=cwd, ok=(0, 1))
    names = chain_filenames(open_args, cwd)
    for attempt in range(3):
        batches = [arr] if attempt == 0 else random_split(arr, rng)
        got, err = render_human(batches, names)
        assert got == h.stdout
        if h.returncode:
            assert err is not None
            assert h.stderr == b"qemu-img: " + str(err).encode() + b"\n"
        else:
            assert err is None and h.stderr == b""
    return arr


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """The images of this module, built once (read-only for the tests)."""
    if QEMU_IMG is None or QEMU_IO is None:
        pytest.skip("qemu-img / qemu-io not installed")
    d = tmp_path_factory.mktemp("map-images")
    # plain: data, zeroes written over data (preallocated zero clusters), unmapped
    # zeroes, discards, an unaligned tail
    create(d, "plain.qcow2", "5000k")
    qemu_io(d, "plain.qcow2", "write -P 1 0 192k", "write -P 2 1m 64k", "write -P 3 2m 512k",
            "write -z 2112k 64k", "write -z -u 2304k 64k", "discard 2432k 64k",
            "write -P 4 4900k 100k", "write -z 3m 128k")
    # a chain with awkward names: raw base, qcow2 middle, qcow2 top
    raw = d / "raw base ü.raw"
    with open(raw, "wb") as f:
        f.truncate(4 << 20)
        f.seek(1 << 20)
        f.write(b"\x07" * 200000)
        f.seek(3 << 20)
        f.write(b"\x08" * 4096)
    create(d, "mid,img.qcow2", "4m", "-b", raw.name, "-F", "raw")
    qemu_io(d, "mid,img.qcow2", "write -P 9 0 256k", "write -z 1088k 64k", "write -P 5 2m 64k")
    create(d, "top.qcow2", "6m", "-b", "mid,img.qcow2", "-F", "qcow2")
    qemu_io(d, "top.qcow2", "write -P 6 64k 64k", "write -P 7 2m 8k", "write -z 3m 4k",
            "write -P 8 5m 1m")
    # compressed clusters between plain ones: human map fails after the first line
    create(d, "compressed.qcow2", "1m")
    qemu_io(d, "compressed.qcow2", "write -P 1 0 64k", "write -c -P 2 128k 64k",
            "write -P 3 256k 64k")
    # compressed first: the human map fails before any line
    create(d, "compressed_first.qcow2", "1m")
    qemu_io(d, "compressed_first.qcow2", "write -c -P 2 0 64k", "write -P 3 256k 64k")
    # extended L2: subcluster writes, zeroes and discards inside clusters
    create(d, "extl2.qcow2", "8m", "-o", "extended_l2=on,cluster_size=128k")
    qemu_io(d, "extl2.qcow2", "write -P 1 4k 4k", "write -P 2 12k 8k", "write -z 16k 4k",
            "write -P 3 1m 128k", "write -z 1m 4k", "discard 1060k 8k", "write -P 4 7m 36k")
    # many extents, alternating between two layers (512-byte clusters)
    create(d, "many_base.qcow2", "2m", "-o", "cluster_size=512")
    qemu_io(d, "many_base.qcow2", *[f"write -P 1 {i * 1024} 512" for i in range(2048)])
    create(d, "many.qcow2", "2m", "-o", "cluster_size=512", "-b", "many_base.qcow2",
           "-F", "qcow2")
    qemu_io(d, "many.qcow2", *[f"write -P 2 {i * 1536 + 512} 512" for i in range(1300)])
    create(d, "empty.qcow2", "0")
    return d


@needs_qemu
@pytest.mark.parametrize("name,lines", [
    ("plain.qcow2", 7), ("top.qcow2", 7), ("compressed.qcow2", 1),
    ("compressed_first.qcow2", 0), ("extl2.qcow2", 4), ("many.qcow2", 1000),
    ("empty.qcow2", 0)])
def test_against_qemu_img(images, name, lines):
    rng = random.Random(name)
    arr = check_against_qemu(["-f", "qcow2", name], images, rng)
    assert len(arr) >= (1 if lines else 0)
    h = qemu(QEMU_IMG, "map", "-f", "qcow2", name, cwd=images, ok=(0, 1))
    assert h.stdout.count(b"\n") - 1 >= lines        # the cases show what they should


@needs_qemu
@pytest.mark.parametrize("map_args", [
    ("--start-offset=4096",), ("--start-offset=1000000", "--max-length=1234567"),
    ("--start-offset=7340032",), ("--start-offset=99999999",), ("--max-length=0",)])
def test_against_qemu_img_ranges(images, map_args):
    rng = random.Random(repr(map_args))
    for name in ("top.qcow2", "empty.qcow2"):
        check_against_qemu(["-f", "qcow2", name], images, rng, map_args)


@needs_qemu
def test_qemu_img_quirks(images):
    # empty map: one zero-length entry, also at a start offset past the end
    r = qemu(QEMU_IMG, "map", "--output=json", "empty.qcow2", cwd=images)
    assert r.stdout == (b'[{ "start": 0, "length": 0, "depth": 0, "present": false, '
                        b'"zero": false, "data": false}]\n')
    r = qemu(QEMU_IMG, "map", "--output=json", "--start-offset=8m", "top.qcow2", cwd=images)
    assert r.stdout.startswith(b'[{ "start": 8388608, "length": 0,')
    # the lines before a compressed cluster stay on stdout, exit status 1
    h = qemu(QEMU_IMG, "map", "compressed.qcow2", cwd=images, ok=(1,))
    assert h.stdout.count(b"\n") == 2
    assert h.stderr == f"qemu-img: {MAP_HUMAN_ERROR}\n".encode()


@needs_qemu
def test_against_qemu_img_factory(factory_images):
    rng = random.Random(5)
    for name, case in sorted(factory_images.items()):
        try:
            check_against_qemu(open_args(case), case.path.parent, rng)
        except AssertionError as exc:
            raise AssertionError(f"factory case {name}: {exc}") from None


# --------------------------------------------------------------------------
# Throughput (reported, never asserted)
# --------------------------------------------------------------------------

def synthetic_extents(n: int, rng: np.random.Generator) -> np.ndarray:
    """A map like a large image's: 64 KiB-aligned extents, offsets up to 256 GiB,
    two layers, a mix of data, zero and unallocated extents."""
    arr = np.zeros(n, EXTENT_DTYPE)
    arr["length"] = 65536 * rng.integers(1, 4, n)
    arr["start"] = np.cumsum(arr["length"]) - arr["length"]
    arr["offset"] = rng.integers(0, 1 << 38, n) // 65536 * 65536
    arr["depth"] = rng.integers(0, 2, n)
    arr["flags"] = rng.choice([PRESENT | DATA | OFFSET, ZERO, PRESENT | ZERO,
                               PRESENT | ZERO | DATA | OFFSET, 0], n)
    return arr


def fstring_json(batches) -> bytes:
    """The naive per-line loop, for comparison."""
    parts = ["["]
    first = True
    for batch in batches:
        for s, ln, o, d, _k, f in batch.tolist():
            if not first:
                parts.append(",\n")
            first = False
            line = (f'{{ "start": {s}, "length": {ln}, "depth": {d}, '
                    f'"present": {"true" if f & 1 else "false"}, '
                    f'"zero": {"true" if f & 2 else "false"}, '
                    f'"data": {"true" if f & 4 else "false"}')
            parts.append(line + (f', "offset": {o}}}' if f & 8 else "}"))
    parts.append("]\n")
    return "".join(parts).encode()


def measure_throughput(n: int = 4_190_000, batch: int = 65536, seed: int = 0,
                       out=sys.stdout) -> dict[str, float]:
    """Time both renderers on ``n`` synthetic extents in ``batch``-sized batches
    (the chunks are consumed, not joined), and the f-string loop on up to 300000
    of them; print and return lines per second."""
    arr = synthetic_extents(n, np.random.default_rng(seed))
    batches = [arr[i:i + batch] for i in range(0, n, batch)]
    printable = arr.copy()
    printable["flags"] = PRESENT | DATA | OFFSET
    printable_batches = [printable[i:i + batch] for i in range(0, n, batch)]
    names = ["top.qcow2", "base.qcow2"]

    def best(fn, reps=3):
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            result = fn()
            t = min(t, time.perf_counter() - t0)
        return t, result

    def consume(chunks):
        return sum(len(c) for c in chunks)

    t_json, json_size = best(lambda: consume(map_json_chunks(batches)))
    t_human, _ = best(lambda: consume(map_human_chunks(printable_batches, names)))
    t_mixed, _ = best(lambda: consume(map_human_chunks(batches, names)))
    sample = arr[:min(n, 300_000)]
    t_loop, loop_bytes = best(lambda: fstring_json([sample]), reps=1)
    assert loop_bytes == b"".join(map_json_chunks([sample]))
    rates = {"json_lines_per_s": n / t_json,
             "human_lines_per_s": n / t_human,
             "human_mixed_extents_per_s": n / t_mixed,
             "fstring_json_lines_per_s": len(sample) / t_loop}
    print(f"\nqemu-img map rendering, {n} extents in batches of {batch}:\n"
          f"  JSON             {rates['json_lines_per_s'] / 1e6:6.2f} M lines/s"
          f"  ({json_size / t_json / 1e6:.0f} MB/s)\n"
          f"  human            {rates['human_lines_per_s'] / 1e6:6.2f} M lines/s"
          f" (every extent printed)\n"
          f"  human, mixed     {rates['human_mixed_extents_per_s'] / 1e6:6.2f} M extents/s"
          f" (1 in 5 printed)\n"
          f"  JSON f-string    {rates['fstring_json_lines_per_s'] / 1e6:6.2f} M lines/s"
          f" (per-line loop; the vectorized JSON is "
          f"{rates['json_lines_per_s'] / rates['fstring_json_lines_per_s']:.1f}x faster)",
          file=out)
    return rates


def test_throughput_report():
    """Prints the rates (see with ``-s``); only checks the outputs agree."""
    rates = measure_throughput(n=200_000, batch=65536)
    assert all(v > 0 for v in rates.values())


if __name__ == "__main__":
    measure_throughput(int(sys.argv[1]) if len(sys.argv) > 1 else 4_190_000)
