"""qcow2kit.cli.render against qemu-img's own output, byte for byte.

Images are made here with qemu-img / qemu-io (snapshots, bitmaps, backing
chains, compat=0.10, LUKS, external data files, vmdk, odd sizes, awkward file
names, damaged refcounts).  For each, the JSON qemu-img prints is parsed and
rendered again (also after shuffling every dict, since the renderer must
rebuild QEMU's QDict order from the schema and not from the input order), and
the human forms are rendered from that JSON.  qemu-img runs with TZ=UTC and
LC_ALL=C, and the renderer with TZ=UTC.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import time
from pathlib import Path

import pytest

from qemu import QEMU_ENV, QEMU_IMG, QEMU_IO, create_encrypted, qemu_img, qemu_io
from qcow2kit.cli.render.check import render_check_human, render_check_json, render_measure_json
from qcow2kit.cli.render.info import (render_info_chain_human, render_info_chain_json,
                                      render_info_human, render_info_json, render_snapshot_table,
                                      size_to_str)
from qcow2kit.cli.render.map import map_entry_json, render_map_human, render_map_json
from qcow2kit.cli.render.qemujson import (QAPI_STRUCTS, QDICT_BUCKET_MAX, qdict_hash, qdict_order,
                                          to_qemu_json)

pytestmark = pytest.mark.skipif(QEMU_IMG is None or QEMU_IO is None,
                                reason="qemu-img / qemu-io not installed")

SECRET = ["--object", "secret,id=sec0,data=abc"]


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def img(*args, cwd: Path, ok=(0,)) -> subprocess.CompletedProcess:
    """qemu-img in the C locale and UTC."""
    return qemu_img(*args, cwd=cwd, ok=ok, env=QEMU_ENV)


def io(path: str, *cmds: str, cwd: Path, extra=()) -> None:
    """qemu-io on `path`, or on the image `extra` opens (--image-opts)."""
    qemu_io(path, *cmds, cwd=cwd, env=QEMU_ENV, image_args=extra or None)


def create_luks(cwd: Path, name: str, fmt: str, opts: str, size: str) -> None:
    if not create_encrypted(cwd / name, size, opts, fmt=fmt, env=QEMU_ENV):
        pytest.skip("qemu-img could not calibrate PBKDF on this machine")


def patch_refcount(path: Path, cluster: int, value: int) -> None:
    """Set one 16-bit refcount (first refcount block) of a fresh image."""
    with open(path, "r+b") as f:
        f.seek(48)
        reftable = struct.unpack(">Q", f.read(8))[0]
        f.seek(reftable)
        block = struct.unpack(">Q", f.read(8))[0]
        f.seek(block + 2 * cluster)
        f.write(struct.pack(">H", value))


WEIRD = 'we"ird\\ é.qcow2'
WEIRD_BASE = "bäse\tx.qcow2"

# case name -> (path relative to the work dir, how to open it for map/check)
CASES: dict[str, tuple[str, str]] = {}


def _build(d: Path) -> None:
    def case(name: str, path: str, opener: str = "plain") -> None:
        CASES[name] = (path, opener)

    img("create", "-q", "-f", "qcow2", "plain.qcow2", "64M", cwd=d)
    case("plain", "plain.qcow2")

    img("create", "-q", "-f", "qcow2", "written.qcow2", "4M", cwd=d)
    io("written.qcow2", "write -P 1 0 64k", "write -P 2 96k 8k", "write -z 1M 128k",
       "write -z -u 2M 64k", "write -P 3 3M 4k", cwd=d)
    case("written", "written.qcow2")

    img("create", "-q", "-f", "qcow2", "compressed.qcow2", "4M", cwd=d)
    io("compressed.qcow2", "write -c -P 1 0 64k", "write -P 2 1M 64k", cwd=d)
    case("compressed", "compressed.qcow2")

    img("create", "-q", "-f", "qcow2", "snaps.qcow2", "8M", cwd=d)
    io("snaps.qcow2", "write -P 1 0 64k", cwd=d)
    img("snapshot", "-c", "snap1", "snaps.qcow2", cwd=d)
    io("snaps.qcow2", "write -P 2 64k 64k", cwd=d)
    img("snapshot", "-c", "schnappschuß-ünïcødé-and-a-long-tail", "snaps.qcow2", cwd=d)
    img("snapshot", "-c", "x" * 300, "snaps.qcow2", cwd=d)
    img("snapshot", "-c", "with space", "snaps.qcow2", cwd=d)
    img("snapshot", "-d", "snap1", "snaps.qcow2", cwd=d)
    img("snapshot", "-c", "again", "snaps.qcow2", cwd=d)
    case("snapshots", "snaps.qcow2")

    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2snap.qcow2", "1M", cwd=d)
    img("snapshot", "-c", "old", "v2snap.qcow2", cwd=d)
    case("v2-snapshot", "v2snap.qcow2")

    img("create", "-q", "-f", "qcow2", "bitmaps.qcow2", "16M", cwd=d)
    img("bitmap", "--add", "bitmaps.qcow2", "b0", cwd=d)
    img("bitmap", "--add", "--disable", "bitmaps.qcow2", "b1", cwd=d)
    img("bitmap", "--add", "-g", "512", "bitmaps.qcow2", "fine-grained", cwd=d)
    img("bitmap", "--add", "-g", "2M", "--disable", "bitmaps.qcow2", "bm é", cwd=d)
    case("bitmaps", "bitmaps.qcow2")

    (d / "sub").mkdir()
    img("create", "-q", "-f", "qcow2", "-o", "compat=0.10", "sub/base.qcow2", "1G", cwd=d)
    io("sub/base.qcow2", "write -P 1 0 1M", "write -P 2 512M 64k", cwd=d)
    img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/mid.qcow2", cwd=d)
    io("sub/mid.qcow2", "write -P 3 64k 64k", "write -z 256k 64k", cwd=d)
    img("create", "-q", "-f", "qcow2", "-b", "sub/mid.qcow2", "-F", "qcow2", "top.qcow2", cwd=d)
    io("top.qcow2", "write -P 4 128k 4k", cwd=d)
    case("chain-top", "top.qcow2")
    case("chain-mid", "sub/mid.qcow2")
    case("chain-base-v2", "sub/base.qcow2")

    img("create", "-q", "-f", "raw", "base.raw", "2M", cwd=d)
    with open(d / "base.raw", "r+b") as f:
        f.write(b"\x55" * 8192)
    img("create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "over-raw.qcow2", cwd=d)
    case("over-raw", "over-raw.qcow2")
    case("raw", "base.raw", "raw")

    img("create", "-q", "-f", "qcow2", "-u", "-b", "nonexistent.qcow2", "-F", "qcow2",
        "missing.qcow2", "1M", cwd=d)
    case("missing-backing", "missing.qcow2", "none")

    img("create", "-q", "-f", "qcow2", "-b", WEIRD_BASE, "-F", "qcow2", WEIRD, "1M", cwd=d,
        ok=(0, 1))  # the backing does not exist yet: create it, then retry
    img("create", "-q", "-f", "qcow2", WEIRD_BASE, "1M", cwd=d)
    img("create", "-q", "-f", "qcow2", "-b", WEIRD_BASE, "-F", "qcow2", WEIRD, "1M", cwd=d)
    case("weird-names", WEIRD)

    create_luks(d, "luks.qcow2", "qcow2",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "16M")
    io("", "write -P 1 0 128k", cwd=d,
       extra=[*SECRET, "--image-opts",
              "driver=qcow2,file.filename=luks.qcow2,encrypt.key-secret=sec0"])
    case("luks", "luks.qcow2", "secret")
    create_luks(d, "luks-essiv.qcow2", "qcow2",
                "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,"
                "encrypt.cipher-alg=aes-128,encrypt.cipher-mode=cbc,encrypt.ivgen-alg=essiv,"
                "encrypt.ivgen-hash-alg=sha256,encrypt.hash-alg=sha1", "16M")
    case("luks-essiv", "luks-essiv.qcow2", "secret")
    create_luks(d, "raw.luks", "luks", "key-secret=sec0,iter-time=10", "1M")
    case("luks-raw", "raw.luks", "luks-secret")

    img("create", "-q", "-f", "qcow2", "-o", "data_file=df-raw.dat,data_file_raw=on",
        "df-raw.qcow2", "10M", cwd=d)
    io("df-raw.qcow2", "write -P 7 0 128k", cwd=d)
    case("data-file-raw", "df-raw.qcow2")
    img("create", "-q", "-f", "qcow2", "-o", "data_file=df.dat", "df.qcow2", "10M", cwd=d)
    io("df.qcow2", "write -P 7 64k 128k", cwd=d)
    case("data-file", "df.qcow2")

    for name, opts in {
        "extended-l2": "extended_l2=on,cluster_size=128k",
        "lazy": "lazy_refcounts=on",
        "zstd": "compression_type=zstd",
        "refcount1": "refcount_bits=1",
        "refcount64": "refcount_bits=64",
        "cluster512": "cluster_size=512",
        "cluster2m": "cluster_size=2M",
        "prealloc": "preallocation=metadata",
    }.items():
        img("create", "-q", "-f", "qcow2", "-o", opts, f"{name}.qcow2", "3M", cwd=d)
        io(f"{name}.qcow2", "write -P 9 4k 70k", cwd=d)
        case(name, f"{name}.qcow2")

    img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "1M", cwd=d)
    with open(d / "dirty.qcow2", "r+b") as f:   # incompatible features: dirty | corrupt
        f.seek(72)
        f.write(struct.pack(">Q", 3))
    case("dirty-corrupt", "dirty.qcow2")

    img("create", "-q", "-f", "qcow2", "corrupt.qcow2", "4M", cwd=d)
    io("corrupt.qcow2", "write -P 1 0 256k", "write -c -P 2 1M 64k", cwd=d)
    patch_refcount(d / "corrupt.qcow2", 1, 0)           # refcount table: refcount 0
    case("refcount-corruption", "corrupt.qcow2")
    img("create", "-q", "-f", "qcow2", "leak.qcow2", "4M", cwd=d)
    io("leak.qcow2", "write -P 1 0 256k", cwd=d)
    size = (d / "leak.qcow2").stat().st_size
    with open(d / "leak.qcow2", "ab") as f:             # one more cluster, referenced by
        f.write(b"\0" * 65536)                          # nothing but the refcount
    patch_refcount(d / "leak.qcow2", size // 65536, 1)
    case("refcount-leak", "leak.qcow2")

    for name, size in {"huge-1e": "1E", "huge-2e": "2E", "big-1.5t": "1536G",
                       "odd-1000k": "1000K", "odd-1023k": "1023K"}.items():
        img("create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", f"{name}.qcow2", size, cwd=d)
        case(name, f"{name}.qcow2")
    for n in (0, 1, 999, 1000, 1023, 1024, 1025, 10239, 10240, 1022976, 1047552, 1048063,
              1048576, 1023 * 1024 * 1024, 1000 * 1000 * 1000, 123456789):
        (d / f"size{n}.raw").write_bytes(b"")
        os.truncate(d / f"size{n}.raw", n)
        case(f"raw-size-{n}", f"size{n}.raw", "raw")

    img("create", "-q", "-f", "vmdk", "mono.vmdk", "1M", cwd=d)
    case("vmdk", "mono.vmdk", "none")
    img("create", "-q", "-f", "vmdk", "-o", "subformat=twoGbMaxExtentSparse", "split.vmdk", "5G",
        cwd=d)
    case("vmdk-split", "split.vmdk", "none")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("render")
    CASES.clear()
    _build(d)
    return d


def _case_names() -> list[str]:
    # the names are fixed by _build; list them without building
    return [
        "plain", "written", "compressed", "snapshots", "v2-snapshot", "bitmaps",
        "chain-top", "chain-mid", "chain-base-v2", "over-raw", "raw", "missing-backing",
        "weird-names", "luks", "luks-essiv", "luks-raw", "data-file-raw", "data-file",
        "extended-l2", "lazy", "zstd", "refcount1", "refcount64", "cluster512", "cluster2m",
        "prealloc", "dirty-corrupt", "refcount-corruption", "refcount-leak",
        "huge-1e", "huge-2e", "big-1.5t", "odd-1000k", "odd-1023k",
        *[f"raw-size-{n}" for n in (0, 1, 999, 1000, 1023, 1024, 1025, 10239, 10240, 1022976,
                                    1047552, 1048063, 1048576, 1023 * 1024 * 1024,
                                    1000 * 1000 * 1000, 123456789)],
        "vmdk", "vmdk-split",
    ]


def test_case_list_is_complete(workdir: Path) -> None:
    assert sorted(CASES) == sorted(_case_names())


def _open_args(name: str) -> list[str]:
    path, opener = CASES[name]
    if opener == "secret":
        return [*SECRET, "--image-opts",
                f"driver=qcow2,file.filename={path},encrypt.key-secret=sec0"]
    if opener == "luks-secret":
        return [*SECRET, "--image-opts", f"driver=luks,file.filename={path},key-secret=sec0"]
    if opener == "raw":
        return ["-f", "raw", path]
    return [path]


def _shuffled(obj, rng: random.Random):
    """The same value with every dict in a random key order."""
    if isinstance(obj, dict):
        items = list(obj.items())
        rng.shuffle(items)
        return {k: _shuffled(v, rng) for k, v in items}
    if isinstance(obj, list):
        return [_shuffled(v, rng) for v in obj]
    return obj


def _insertion_ordered(obj, type_name):
    """The same value with dicts in QAPI declaration order (what a library builds)."""
    if isinstance(obj, dict) and type_name in QAPI_STRUCTS:
        from qcow2kit.cli.render.qemujson import _members
        members = dict(_members(obj, type_name))
        out = {}
        for key in [m for m in members if m in obj] + [k for k in obj if k not in members]:
            ref = members.get(key)
            value = obj[key]
            if isinstance(ref, list):
                out[key] = [_insertion_ordered(v, ref[0]) for v in value]
            else:
                out[key] = _insertion_ordered(value, ref)
        return out
    return obj


# ------------------------------------------------------------ qemu-img info

@pytest.mark.parametrize("name", _case_names())
def test_info_json(workdir: Path, name: str) -> None:
    path = CASES[name][0]
    out = img("info", "--output=json", path, cwd=workdir).stdout
    info = json.loads(out)
    assert render_info_json(info) == out
    assert to_qemu_json(info) + "\n" == out            # the type is guessed right
    rng = random.Random(name)
    for _ in range(3):
        assert render_info_json(_shuffled(info, rng)) == out
    assert render_info_json(_insertion_ordered(info, "ImageInfo")) == out


@pytest.mark.parametrize("name", _case_names())
def test_info_human(workdir: Path, name: str) -> None:
    path = CASES[name][0]
    info = json.loads(img("info", "--output=json", path, cwd=workdir).stdout)
    expected = img("info", path, cwd=workdir).stdout
    assert render_info_human(info) == expected
    assert render_info_human(_shuffled(info, random.Random(name))) == expected


@pytest.mark.parametrize("name", _case_names())
def test_info_backing_chain(workdir: Path, name: str) -> None:
    path = CASES[name][0]
    r = img("info", "--backing-chain", "--output=json", path, cwd=workdir, ok=None)
    if name == "missing-backing":
        assert r.returncode != 0     # the chain cannot be followed
        return
    out = r.stdout
    infos = json.loads(out)
    assert isinstance(infos, list) and infos
    assert render_info_chain_json(infos) == out
    assert render_info_chain_json(_shuffled(infos, random.Random(name))) == out
    human = img("info", "--backing-chain", path, cwd=workdir).stdout
    assert render_info_chain_human(infos) == human


def test_chain_shapes(workdir: Path) -> None:
    infos = json.loads(img("info", "--backing-chain", "--output=json", "top.qcow2",
                           cwd=workdir).stdout)
    assert [i["filename"] for i in infos] == ["top.qcow2", "sub/mid.qcow2", "sub/base.qcow2"]
    human = render_info_chain_human(infos)
    assert "backing file: base.qcow2 (actual path: sub/base.qcow2)\n" in human
    assert human.count("\n\nimage: ") == 2


# ----------------------------------------------------------- qemu-img check

@pytest.mark.parametrize("name", _case_names())
def test_check(workdir: Path, name: str) -> None:
    args = _open_args(name)
    r = img("check", "--output=json", *args, cwd=workdir, ok=None)
    if r.returncode not in (0, 2, 3):
        pytest.skip(f"qemu-img check refuses this image: {r.stderr.strip()}")
    check = json.loads(r.stdout)
    assert render_check_json(check) == r.stdout
    assert to_qemu_json(check) + "\n" == r.stdout
    assert render_check_json(_shuffled(check, random.Random(name))) == r.stdout
    human = img("check", *args, cwd=workdir, ok=(0, 2, 3)).stdout
    assert render_check_human(check) == human


def test_check_damage_is_reported(workdir: Path) -> None:
    check = json.loads(img("check", "--output=json", "leak.qcow2", cwd=workdir, ok=(3,)).stdout)
    assert check["leaks"] == 1
    check = json.loads(img("check", "--output=json", "corrupt.qcow2", cwd=workdir,
                           ok=(2,)).stdout)
    assert check["corruptions"] == 1 and check["compressed-clusters"] == 1


# ------------------------------------------------------------- qemu-img map

def _map_filename(workdir: Path, name: str, infos: list[dict], entry: dict) -> str:
    info = infos[entry["depth"]]
    data_file = info.get("format-specific", {}).get("data", {}).get("data-file")
    if data_file is not None:
        return os.path.join(os.path.dirname(info["filename"]), data_file)
    return info["filename"]


@pytest.mark.parametrize("name", _case_names())
def test_map(workdir: Path, name: str) -> None:
    if name.startswith("huge-"):
        pytest.skip("qemu-img map walks every L2 slot of an exabyte image: too slow")
    args = _open_args(name)
    r = img("map", "--output=json", *args, cwd=workdir, ok=None)
    if r.returncode != 0:
        assert name in ("missing-backing", "vmdk", "vmdk-split"), r.stderr
        pytest.skip(r.stderr.strip())
    out = r.stdout
    entries = json.loads(out)
    assert render_map_json(entries) == out
    lines = out[1:-2].split(",\n")
    assert [map_entry_json(e) for e in entries] == lines

    human = img("map", *args, cwd=workdir, ok=None)
    if CASES[name][1] in ("secret", "luks-secret"):
        infos = [{"filename": CASES[name][0]}]
    else:
        infos = json.loads(img("info", "--backing-chain", "--output=json", *args,
                               cwd=workdir).stdout)
    for e in entries:
        e["filename"] = _map_filename(workdir, name, infos, e)
    if human.returncode != 0:
        assert human.stderr == ("qemu-img: File contains external, encrypted or compressed "
                                "clusters.\n")
        with pytest.raises(ValueError, match="external, encrypted or compressed"):
            render_map_human(entries)
    else:
        assert render_map_human(entries) == human.stdout


def test_map_human_zero_start() -> None:
    # "%#x" prints 0 without the 0x prefix
    text = render_map_human([{"start": 0, "length": 65536, "depth": 0, "present": True,
                              "zero": False, "data": True, "offset": 0, "filename": "f"}])
    assert text.splitlines()[1] == "0               0x10000         0               f"


# --------------------------------------------------------- qemu-img measure

@pytest.mark.parametrize("name", ["written", "bitmaps", "chain-top"])
def test_measure_json(workdir: Path, name: str) -> None:
    out = img("measure", "--output=json", "-O", "qcow2", CASES[name][0], cwd=workdir).stdout
    measure = json.loads(out)
    assert render_measure_json(measure) == out
    assert render_measure_json(_shuffled(measure, random.Random(1))) == out


# ------------------------------------------------ compact JSON (json: names)

def test_compact_json_from_json_filenames(workdir: Path) -> None:
    # QEMU names a node it cannot describe by a file name with its options
    # printed as compact JSON: another oracle for the writer and the QDict order
    specs = [
        '{"driver":"raw","offset":512,"size":1024,"file":{"driver":"file","filename":"base.raw"}}',
        '{"driver":"blkdebug","image":{"driver":"file","filename":"base.raw"},"align":4096,'
        '"max-transfer":65536,"opt-discard":4096,"max-discard":65536}',
        '{"driver":"raw","file":{"driver":"null-co","size":1048576}}',
    ]
    seen = 0
    for spec in specs:
        first = img("info", "json:" + spec, cwd=workdir).stdout.splitlines()[0]
        assert first.startswith("image: json:")
        text = first[len("image: json:"):]
        assert to_qemu_json(json.loads(text), pretty=False) == text
        seen += 1
    r = img("info", "--output=json", *_open_args("luks"), cwd=workdir)
    info = json.loads(r.stdout)
    assert info["filename"].startswith("json:{")
    assert to_qemu_json(json.loads(info["filename"][5:]), pretty=False) == info["filename"][5:]
    assert render_info_json(info) == r.stdout
    assert seen == 3


# ------------------------------------------- file names that are not UTF-8

BAD_NAMES = [b"\x80\x80", b"\xf8\x88\x80\x80\x80", b"\xfe\xff", b"\xe0\x80\x80",
             b"\xc1\x81", b"\xc0\x80\xc0\x80", b"\xef\xb7\x90", b"\xf0\x9f\xbf\xbe",
             b"\xef\xbf\xbe", b"\xe2\x82x", b"\xc3", b"\xf4\x90\x80\x80",
             b"\xed\xa0\x80", b"\xee\x80\x80\xc2\x80\xed\x9f\xbf", b"\x7f\x01\x1f",
             b"\xf0\x9f\x98\x80 \xe2\x82\xac"]


@pytest.mark.parametrize("raw", BAD_NAMES, ids=lambda b: b.hex())
def test_undecodable_file_names(tmp_path: Path, raw: bytes) -> None:
    """A name from os.fsdecode() is written as QEMU writes the raw bytes."""
    name = b"n" + raw + b".img"
    path = os.path.join(os.fsencode(tmp_path), name)
    with open(path, "wb") as f:
        f.truncate(65536)
    env = QEMU_ENV
    out = subprocess.run([QEMU_IMG, "info", "-f", "raw", "--output=json", name], cwd=tmp_path,
                         env=env, capture_output=True, check=True).stdout
    human = subprocess.run([QEMU_IMG, "info", "-f", "raw", name], cwd=tmp_path, env=env,
                           capture_output=True, check=True).stdout
    info = json.loads(out)
    info["filename"] = os.fsdecode(name)     # what a library holding the path has
    assert render_info_json(info).encode() == out
    assert render_info_human(info).encode("utf-8", "surrogateescape") == human


# -------------------------------------------------------------- unit tests

def test_qdict_order_known_images() -> None:
    keys = ["filename", "format", "dirty-flag", "actual-size", "virtual-size", "cluster-size",
            "snapshots", "format-specific"]
    assert qdict_order(keys) == ["snapshots", "virtual-size", "filename", "cluster-size",
                                 "format", "actual-size", "format-specific", "dirty-flag"]


def _colliding_pair() -> tuple[str, str]:
    seen: dict[int, str] = {}
    i = 0
    while True:
        key = f"k{i}"
        bucket = qdict_hash(key) % QDICT_BUCKET_MAX
        if bucket in seen:
            return seen[bucket], key
        seen[bucket] = key
        i += 1


def test_qdict_order_bucket_collision_newest_first() -> None:
    a, b = _colliding_pair()
    assert qdict_order([a, b]) == [b, a]
    assert qdict_order([b, a]) == [a, b]
    assert qdict_order([a, b, a]) == [b, a]    # re-insertion replaces in place
    # to_qemu_json takes unknown keys as inserted in dict order
    assert to_qemu_json({a: 1, b: 2}, pretty=False) == '{"%s": 2, "%s": 1}' % (b, a)


def test_qdict_hash_values() -> None:
    # buckets implied by the member order qemu-img 7.2 prints for ImageInfo
    assert [qdict_hash(k) % 512 for k in ("snapshots", "virtual-size", "filename")] == \
        [263, 309, 313]
    assert 0 <= qdict_hash("\u00e9" * 50) < 2 ** 32


def test_no_collisions_in_qemu_structs() -> None:
    # with 7.2's schema no struct has two members in one bucket, so the
    # collision rule is never visible in qemu-img output: it is unit-tested above
    for name, struct_ in QAPI_STRUCTS.items():
        members = [m for m, _ in struct_.members]
        buckets = [qdict_hash(m) % QDICT_BUCKET_MAX for m in members]
        assert len(set(buckets)) == len(buckets), name


def test_to_qemu_json_shapes() -> None:
    assert to_qemu_json({}) == "{\n}"
    assert to_qemu_json([]) == "[\n]"
    assert to_qemu_json({}, pretty=False) == "{}"
    assert to_qemu_json({"a": [], "b": {}}, pretty=False) in (
        '{"a": [], "b": {}}', '{"b": {}, "a": []}')
    assert to_qemu_json({"x": []}) == '{\n    "x": [\n    ]\n}'
    assert to_qemu_json([1, True, None, "s"]) == '[\n    1,\n    true,\n    null,\n    "s"\n]'
    assert to_qemu_json(-5) == "-5"
    assert to_qemu_json(2 ** 64 - 1) == "18446744073709551615"
    assert to_qemu_json(0.1) == "0.10000000000000001"
    assert to_qemu_json(
        "a\"b\\c\b\f\n\r\t\x01\x7f\u00e9\u20ac\U0001F600/") == \
        '"a\\"b\\\\c\\b\\f\\n\\r\\t\\u0001\\u007F\\u00E9\\u20AC\\uD83D\\uDE00/"'


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1, "1 B"), (999, "999 B"), (1000, "0.977 KiB"), (1023, "0.999 KiB"),
    (1024, "1 KiB"), (200704, "196 KiB"), (1342177, "1.28 MiB"), (67108864, "64 MiB"),
    (1022976, "999 KiB"), (1023 * 1024, "0.999 MiB"), (2 ** 60, "1 EiB"),
    (2 ** 64 - 1, "16 EiB"),
])
def test_size_to_str(n: int, text: str) -> None:
    assert size_to_str(n) == text


def test_snapshot_table_clock_and_icount() -> None:
    sn = {"id": "12", "name": "n", "vm-state-size": 1536 * 1024, "date-sec": 0,
          "date-nsec": 0, "vm-clock-sec": 100 * 3600 + 62, "vm-clock-nsec": 987654321}
    table = render_snapshot_table([sn, dict(sn, icount=42)])
    lines = table.splitlines()
    assert lines[0] == ("ID        TAG               VM SIZE                DATE     VM CLOCK"
                        "     ICOUNT")
    assert lines[1] == ("12        n                 1.5 MiB 1970-01-01 00:00:00"
                        "100:01:02.987           ")
    assert lines[2].endswith("100:01:02.987         42")


def test_human_without_actual_size_or_full_backing() -> None:
    text = render_info_human({"filename": "f", "format": "qcow2", "virtual-size": 512,
                              "backing-filename": "b"})
    assert text == ("image: f\nfile format: qcow2\nvirtual size: 512 B (512 bytes)\n"
                    "disk size: unavailable\nbacking file: b (cannot determine actual path)\n")


# ------------------------------------- every image of the shared factory

def test_factory_images_round_trip(request) -> None:
    """Round-trip info/check/map JSON for every case of tests/factory.py, when
    that shared factory is available (it is built by the other suites)."""
    try:
        cases = request.getfixturevalue("factory_images")
    except pytest.skip.Exception:
        raise
    except Exception as exc:  # the factory belongs to another part of the suite
        pytest.skip(f"shared image factory unavailable: {exc}")
    checked = 0
    for case in cases.values():
        cwd = Path(case.path).parent
        opener = ([*SECRET[:1], f"secret,id=sec0,data={case.secret}", "--image-opts",
                   f"driver=qcow2,file.filename={case.path},encrypt.key-secret=sec0"]
                  if case.encrypted and case.secret else [str(case.path)])
        r = img("info", "--output=json", str(case.path), cwd=cwd, ok=None)
        if r.returncode == 0:
            info = json.loads(r.stdout)
            assert render_info_json(info) == r.stdout, case.name
            human = img("info", str(case.path), cwd=cwd).stdout
            assert render_info_human(info) == human, case.name
            checked += 1
        r = img("info", "--backing-chain", "--output=json", str(case.path), cwd=cwd, ok=None)
        if r.returncode == 0:
            infos = json.loads(r.stdout)
            assert render_info_chain_json(infos) == r.stdout, case.name
            human = img("info", "--backing-chain", str(case.path), cwd=cwd).stdout
            assert render_info_chain_human(infos) == human, case.name
        r = img("check", "--output=json", *opener, cwd=cwd, ok=None)
        if r.returncode in (0, 2, 3) and r.stdout:
            check = json.loads(r.stdout)
            assert render_check_json(check) == r.stdout, case.name
            human = img("check", *opener, cwd=cwd, ok=None).stdout
            assert render_check_human(check) == human, case.name
        r = img("map", "--output=json", *opener, cwd=cwd, ok=None)
        if r.returncode == 0:
            assert render_map_json(json.loads(r.stdout)) == r.stdout, case.name
    assert checked


# ------------------------------------------------------------- stream helpers

def test_emit_error_progress(capfdbinary) -> None:
    from qcow2kit.cli.render.output import emit, error, progress_bar
    emit("a\udcff\n")
    error("bad thing")
    with progress_bar(10, enabled=False) as advance:
        advance(5)
    with progress_bar(10, enabled=True) as advance:
        advance(10)
    out, err = capfdbinary.readouterr()
    assert out == b"a\xff\n"
    assert err.startswith(b"qcow2kit: bad thing\n")
