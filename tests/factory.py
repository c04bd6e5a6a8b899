"""Test-image factory: qcow2 images built with the real qemu-img / qemu-io.

Every image is made by QEMU itself (a few are patched afterwards where QEMU 7.2 cannot produce a
state any more, and the patch is said in ``ImageCase.notes``), so the differential tests compare
qcow2kit against what QEMU writes and reads, not against our own idea of the format.

Each builder also keeps a byte model of the guest view (``_Img``) next to the qemu-io commands it
issues, so every case knows the SHA-256 of its active layer and of each internal snapshot, and the
dirty ranges each persistent bitmap must have. ``tests/test_factory.py`` checks these claims against
qemu-img, which proves the factory produces what it says.

QEMU 7.2 quirks worth knowing (all observed, not guessed):
- a relative ``data_file`` name is resolved against the *current directory* of the QEMU process,
  not the image's directory; the helpers here therefore run qemu-img with ``cwd`` = the image's
  directory (harmless for everything else, backing names are resolved against the image anyway);
- ``qemu-img create/rebase/convert`` refuse a backing file without a backing format, so the
  "no backing-format extension" case is made by deleting that header extension afterwards;
- ``qemu-img create`` rounds the virtual size up to a multiple of 512;
- ``qemu-img map`` gives no ``offset`` for encrypted images, and map/check/convert of encrypted
  images need the secret (``open_args`` builds the ``--object``/``--image-opts`` arguments);
- ``qemu-img map`` may look at holes of the *host file*: when qcow2 decides an image has
  "preallocated metadata" (heuristic: far more clusters referenced than blocks allocated in the
  host file, e.g. prealloc_metadata, or extl2_2M where subcluster writes leave most of each 2 MiB
  host cluster sparse) it reports sparse parts of allocated clusters as ``"zero": true`` and splits
  extents at 4 KiB host-page boundaries; in extended-L2 images unallocated subclusters of an
  allocated cluster are reported ``"present": false`` *with* an ``offset``. A map comparison
  must therefore run on the same files, and these cases are the ones to look at first.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from qemu import (QEMU_IMG, QEMU_IO, SECRET, SECRET_ID, QemuError, have_qemu, merge_ranges,
                  open_args, qemu_img_check, run)
# test_map.py and test_map_threshold.py still reach these through factory (factory.qemu_img_map...)
from qemu import qemu_img_info, qemu_img_map  # noqa: F401


KiB = 1024
MiB = 1024 * KiB

EXT_BACKING_FORMAT = 0xE2792ACA


class FactoryError(RuntimeError):
    """A QEMU command failed or an image is not what its builder claims."""


# --------------------------------------------------------------------------------------------
# Case description


@dataclass
class BitmapSpec:
    """What a persistent bitmap must look like after the build."""

    name: str
    granularity: int
    enabled: bool  # qemu-img info flag "auto"
    dirty: list[tuple[int, int]] = field(default_factory=list)  # (start, length), merged, sorted
    in_use: bool = False


@dataclass
class ImageCase:
    name: str
    path: Path
    encrypted: bool = False
    has_backing: bool = False
    notes: str = ""
    secret: str | None = None
    data_file: Path | None = None
    #: virtual size as QEMU reports it (create rounds up to 512)
    virtual_size: int = 0
    cluster_size: int = 65536
    #: feature words used for selecting cases: "compressed", "snapshots", "bitmaps", "backing",
    #: "extended_l2", "data_file", "encrypted", "dirty", "v2", "zero", "discard", "prealloc", ...
    tags: frozenset[str] = frozenset()
    #: dotted paths into `qemu-img info --output=json` -> expected value (the case's claims)
    expect: dict[str, object] = field(default_factory=dict)
    #: expected exit status of `qemu-img check` (0 clean, 2 corruptions, 3 leaks)
    check_rc: int = 0
    #: number of backing files below this image (0 = none)
    backing_depth: int = 0
    #: backing file paths, nearest first
    backing_chain: list[Path] = field(default_factory=list)
    #: internal snapshot names in table order
    snapshots: list[str] = field(default_factory=list)
    #: SHA-256 of the guest view of each snapshot (by name), from the builder's model
    snapshot_sha256: dict[str, str] = field(default_factory=dict)
    bitmaps: list[BitmapSpec] = field(default_factory=list)
    #: SHA-256 of the full guest view (qemu-img convert -O raw output), from the builder's model
    sha256: str | None = None
    #: qemu-io / qemu-img operations applied, in order (for debugging a failing comparison)
    ops: list[str] = field(default_factory=list)
    #: the builder's directory: holds this image and every file it refers to by relative name
    root: Path | None = None

    @property
    def refcount_bits(self) -> int | None:
        v = self.expect.get("format-specific.data.refcount-bits")
        return int(v) if v is not None else None

    def open_args(self) -> list[str]:
        return open_args(self)


# --------------------------------------------------------------------------------------------
# Header patches (for states QEMU 7.2 will not produce on request)


def _read_header_area(f) -> tuple[bytes, int, int]:
    f.seek(0)
    head = f.read(104)
    version = struct.unpack(">I", head[4:8])[0]
    cluster_bits = struct.unpack(">I", head[20:24])[0]
    header_length = struct.unpack(">I", head[100:104])[0] if version >= 3 else 72
    f.seek(0)
    return f.read(1 << cluster_bits), header_length, version


def set_incompatible_bits(path: Path, bits: int) -> None:
    """OR `bits` into incompatible_features (header bytes 72..79, big-endian)."""
    with open(path, "r+b") as f:
        f.seek(72)
        cur = struct.unpack(">Q", f.read(8))[0]
        f.seek(72)
        f.write(struct.pack(">Q", cur | bits))


def drop_header_extension(path: Path, ext_type: int) -> None:
    """Remove every header extension of `ext_type`, zero-filling the bytes freed at the end."""
    with open(path, "r+b") as f:
        cl0, hlen, _ = _read_header_area(f)
        backing_off = struct.unpack(">Q", cl0[8:16])[0]
        pos, kept = hlen, []
        while True:
            etype, elen = struct.unpack(">II", cl0[pos:pos + 8])
            if etype == 0:
                break
            padded = (elen + 7) & ~7
            if etype != ext_type:
                kept.append(cl0[pos:pos + 8 + padded])
            pos += 8 + padded
        old_end = pos + 8
        blob = b"".join(kept) + b"\0" * 8
        blob += b"\0" * (old_end - hlen - len(blob))
        if backing_off and hlen + len(blob) > backing_off:
            raise FactoryError("header extensions would overlap the backing file name")
        f.seek(hlen)
        f.write(blob)


# --------------------------------------------------------------------------------------------
# Image under construction: qemu-io command queue plus a byte model of the guest view


class _Img:
    def __init__(self, path: Path, size: int, *, opts: str = "", backing: "_Img | None" = None,
                 backing_path: str | None = None, backing_fmt: str = "qcow2",
                 secret: str | None = None, v2: bool = False, cluster_size: int = 65536,
                 create: bool = True, create_extra: Sequence[str] = ()):
        self.path = Path(path).absolute()
        self.size = (size + 511) // 512 * 512
        self.v2 = v2
        self.cluster_size = cluster_size
        self.secret = secret
        self.backing = backing
        self.ops: list[str] = []
        self._queue: list[str] = []
        self.snap_sha: dict[str, str] = {}
        self.snaps: list[str] = []
        self.bitmaps: dict[str, dict] = {}  # name -> {gran, enabled, dirty:set(chunk idx)}
        self.buf = bytearray(self.size)
        if backing is not None:
            backing.flush()  # the backing file must hold its data before we COW from it
            n = min(self.size, backing.size)
            self.buf[:n] = backing.buf[:n]
        self._under = bytes(self.buf) if backing is not None else None
        if create:
            cmd = [QEMU_IMG, "create", "-q", "-f", "qcow2"]
            if secret is not None:
                cmd += ["--object", f"secret,id={SECRET_ID},data={secret}"]
            if opts:
                cmd += ["-o", opts]
            if backing_path is not None:
                cmd += ["-b", backing_path, "-F", backing_fmt]
            cmd += [*create_extra, str(self.path), str(size)]
            for attempt in range(5):
                try:
                    run(cmd, cwd=self.path.parent)
                    break
                except QemuError as e:
                    # QEMU's PBKDF benchmark (LUKS) fails now and then when the thread CPU
                    # clock has not advanced: "Unable to get accurate CPU usage". Try again.
                    if "accurate CPU usage" not in str(e) or attempt == 4:
                        raise
                    self.path.unlink(missing_ok=True)
            self.ops.append(" ".join(cmd[1:]))

    # ---- model + queued qemu-io commands
    def _touch(self, off: int, n: int) -> None:
        for bm in self.bitmaps.values():
            if bm["enabled"] and n > 0:
                g = bm["gran"]
                bm["dirty"].update(range(off // g, (off + n - 1) // g + 1))

    def write(self, off: int, n: int, pattern: int, compressed: bool = False) -> None:
        assert 0 <= off and off + n <= self.size and n > 0
        self.buf[off:off + n] = bytes([pattern]) * n
        self._touch(off, n)
        self._queue.append(f"write {'-c ' if compressed else ''}-P 0x{pattern:02x} {off} {n}")

    def write_data(self, off: int, data: bytes, compressed: bool = False) -> None:
        """Write arbitrary bytes through a pattern file (qemu-io write -s)."""
        assert 0 <= off and off + len(data) <= self.size and data
        src = self.path.parent / f".src-{self.path.stem}-{len(self.ops) + len(self._queue)}.bin"
        src.write_bytes(data)
        self.buf[off:off + len(data)] = data
        self._touch(off, len(data))
        self._queue.append(f"write {'-c ' if compressed else ''}-s {src} {off} {len(data)}")

    def zero(self, off: int, n: int, unmap: bool = False) -> None:
        assert 0 <= off and off + n <= self.size and n > 0
        self.buf[off:off + n] = bytes(n)
        self._touch(off, n)
        self._queue.append(f"write -z {'-u ' if unmap else ''}{off} {n}")

    def discard(self, off: int, n: int) -> None:
        """Guest discard: only whole clusters are dropped (qcow2 ignores the unaligned parts,
        except a cluster-aligned tail that reaches the end of the image)."""
        cs, end = self.cluster_size, off + n
        a = -(-off // cs) * cs
        b = end if end == self.size else end // cs * cs
        if a < b:
            if self.v2 and self._under is not None:
                self.buf[a:b] = self._under[a:b]  # v2 has no zero flag: falls through to backing
            else:
                self.buf[a:b] = bytes(b - a)
        self._touch(off, n)
        self._queue.append(f"discard {off} {n}")

    def flush(self, extra_cmds: Sequence[str] = (), ok_codes: Iterable[int] = (0,)) -> None:
        cmds = self._queue + list(extra_cmds)
        self._queue = []
        if not cmds:
            return
        for i in range(0, len(cmds), 200):
            chunk = cmds[i:i + 200]
            argv = [QEMU_IO]
            if self.secret is not None:
                argv += open_args(self.path, secret=self.secret)
            else:
                argv += ["-f", "qcow2", str(self.path)]
            for c in chunk:
                argv += ["-c", c]
            out = run(argv, cwd=self.path.parent, ok_codes=ok_codes)
            if "failed" in out.lower():
                raise FactoryError(f"qemu-io reported a failure on {self.path}:\n{out[-2000:]}")
        self.ops.extend(cmds)
        for src in self.path.parent.glob(f".src-{self.path.stem}-*.bin"):
            src.unlink()

    def crash(self) -> None:
        """Run the queued commands, then SIGKILL qemu-io (nothing flushed, no clean close)."""
        self.flush(extra_cmds=["sigraise 9"], ok_codes=(-9, 137))

    # ---- qemu-img operations on the closed image
    def img(self, *args: str) -> None:
        self.flush()
        cmd = [QEMU_IMG, *args]
        run(cmd, cwd=self.path.parent)
        self.ops.append(" ".join(args))

    def snapshot(self, name: str) -> None:
        self.img("snapshot", "-c", name, str(self.path))
        self.snaps.append(name)
        self.snap_sha[name] = hashlib.sha256(self.buf).hexdigest()

    def delete_snapshot(self, name: str) -> None:
        self.img("snapshot", "-d", name, str(self.path))
        self.snaps.remove(name)
        del self.snap_sha[name]

    def add_bitmap(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        args = ["bitmap", "--add"]
        if granularity is not None:
            args += ["-g", str(granularity)]
        if not enabled:
            args.append("--disable")
        self.img(*args, "-f", "qcow2", str(self.path), name)
        # qemu-img's default granularity is the cluster size, but at least 4 KiB
        gran = granularity or max(4096, self.cluster_size)
        self.bitmaps[name] = {"gran": gran, "enabled": enabled,
                              "dirty": set()}

    def set_bitmap_enabled(self, name: str, enabled: bool) -> None:
        self.img("bitmap", "--enable" if enabled else "--disable", "-f", "qcow2", str(self.path), name)
        self.bitmaps[name]["enabled"] = enabled

    def merge_bitmap(self, src: str, dst: str) -> None:
        self.img("bitmap", "--merge", src, "-f", "qcow2", str(self.path), dst)
        s, d = self.bitmaps[src], self.bitmaps[dst]
        # merge works on byte ranges; convert source chunks to destination granularity
        for c in s["dirty"]:
            a, b = c * s["gran"], (c + 1) * s["gran"]
            d["dirty"].update(range(a // d["gran"], (b - 1) // d["gran"] + 1))

    # ---- results
    def sha256(self) -> str:
        return hashlib.sha256(self.buf).hexdigest()

    def bitmap_specs(self) -> list[BitmapSpec]:
        out = []
        for name, bm in self.bitmaps.items():
            g = bm["gran"]
            ranges = [(c * g, min(g, self.size - c * g)) for c in bm["dirty"]]
            out.append(BitmapSpec(name, g, bm["enabled"], merge_ranges(ranges)))
        return out

    def case(self, name: str, **kw) -> ImageCase:
        self.flush()
        chain, b = [], self.backing
        while b is not None:
            chain.append(b.path)
            b = b.backing
        tags = set(kw.pop("tags", ()))
        if self.snaps:
            tags.add("snapshots")
        if self.bitmaps:
            tags.add("bitmaps")
        if chain:
            tags.add("backing")
        expect = {"virtual-size": self.size, "cluster-size": self.cluster_size, "format": "qcow2"}
        expect.update(kw.pop("expect", {}))
        fields = dict(
            name=name, path=self.path, virtual_size=self.size, cluster_size=self.cluster_size,
            encrypted=self.secret is not None, secret=self.secret, has_backing=bool(chain),
            backing_depth=len(chain), backing_chain=chain, snapshots=list(self.snaps),
            snapshot_sha256=dict(self.snap_sha), bitmaps=self.bitmap_specs(), sha256=self.sha256(),
            ops=list(self.ops), tags=frozenset(tags), expect=expect)
        fields.update(kw)
        return ImageCase(**fields)


def _random_writes(img: _Img, rng: random.Random, count: int, *, max_len: int = 512 * KiB,
                   lo: int = 0, hi: int | None = None, zero_ratio: float = 0.1) -> None:
    """Random-ish writes: sub-cluster, sector-multiple, cluster-multiple and ragged lengths at
    byte-, sector- and cluster-aligned offsets, with patterns 0x01..0xff; a few zero writes."""
    cs = img.cluster_size
    hi = img.size if hi is None else hi
    for _ in range(count):
        r = rng.random()
        if r < 0.3:
            n = rng.randint(1, max(1, cs // 2))
        elif r < 0.5:
            n = 512 * rng.randint(1, max(1, 2 * cs // 512))
        elif r < 0.7:
            n = cs * rng.randint(1, 3)
        else:
            n = rng.randint(cs // 3 + 1, 3 * cs + 777)
        n = min(n, max_len)
        align = rng.choice((1, 512, 4096, cs))
        off = lo + (rng.randrange(0, hi - lo) // align) * align
        n = min(n, hi - off)
        if n <= 0:
            continue
        if rng.random() < zero_ratio:
            img.zero(off, n, unmap=rng.random() < 0.5)
        else:
            img.write(off, n, rng.randrange(1, 256))


def _varied_data(rng: random.Random, n: int, block: int = 4096) -> bytes:
    """Content with every compressibility: zero blocks, runs, text, low-entropy and random."""
    words = [b"qcow2", b"cluster", b"refcount", b"L2 ", b"snapshot ", b"\x00\x01", b"kit-"]
    out = bytearray()
    while len(out) < n:
        k = rng.random()
        if k < 0.15:
            blk = bytes(block)
        elif k < 0.3:
            blk = bytes([rng.randrange(256)]) * block
        elif k < 0.55:
            blk = b"".join(rng.choice(words) for _ in range(block // 3))[:block]
        elif k < 0.8:
            alphabet = bytes(rng.randrange(256) for _ in range(rng.choice((2, 4, 16))))
            blk = bytes(rng.choice(alphabet) for _ in range(block))
        else:
            blk = rng.randbytes(block)
        out += blk
    return bytes(out[:n])


# --------------------------------------------------------------------------------------------
# Builders. Each takes its own directory and returns the cases it made.

Builder = Callable[[Path], list[ImageCase]]
BUILDERS: dict[str, Builder] = {}


def builder(fn: Builder) -> Builder:
    BUILDERS[fn.__name__.removeprefix("b_")] = fn
    return fn


def _cluster_case(d: Path, name: str, cs: int, size: int, count: int, max_len: int, seed: int):
    img = _Img(d / f"{name}.qcow2", size, opts=f"cluster_size={cs}", cluster_size=cs)
    # a recognisable stripe: block i of 4 KiB filled with byte i+1, crossing several L2 ranges
    for i in range(16):
        img.write(i * 4096 + (cs if cs >= 4096 else 0), 4096, i + 1)
    _random_writes(img, random.Random(seed), count, max_len=max_len)
    img.write(size - 1000, 1000, 0xEE)  # the very end of the disk
    return img.case(name, tags={"cluster_size"},
                    notes=f"cluster_size={cs}, {count} random writes incl. sub-cluster/ragged")


@builder
def b_cs512(d):
    return [_cluster_case(d, "cs512", 512, 8 * MiB, 60, 64 * KiB, 512)]


@builder
def b_cs4k(d):
    return [_cluster_case(d, "cs4k", 4096, 16 * MiB, 50, 256 * KiB, 4096)]


@builder
def b_cs64k(d):
    return [_cluster_case(d, "cs64k", 65536, 32 * MiB, 40, 512 * KiB, 65536)]


@builder
def b_cs2M(d):
    img = _Img(d / "cs2M.qcow2", 64 * MiB, opts="cluster_size=2M", cluster_size=2 * MiB)
    img.write(0, 2 * MiB, 0x21)  # one whole cluster
    img.write(5 * MiB + 12345, 3000, 0x22)  # sub-cluster, ragged
    img.write(10 * MiB - 4096, 8192, 0x23)  # straddles a cluster boundary
    _random_writes(img, random.Random(2), 6, max_len=300 * KiB)
    img.write(64 * MiB - 512, 512, 0x24)
    return [img.case("cs2M", tags={"cluster_size"}, notes="cluster_size=2M (cluster_bits 21)")]


def _refbits(d: Path, bits: int) -> ImageCase:
    name = f"refbits{bits}"
    img = _Img(d / f"{name}.qcow2", 16 * MiB, opts=f"cluster_size=4k,refcount_bits={bits}",
               cluster_size=4096)
    # 2.5 MiB of data: more than one refcount block for the wide orders (4k clusters)
    img.write(0, 2 * MiB + 512 * KiB, 0x10 + bits % 0xF0)
    _random_writes(img, random.Random(1000 + bits), 20, max_len=128 * KiB)
    notes = f"refcount_bits={bits}, 4k clusters, >2 MiB of data"
    if bits >= 2:  # refcount 2 needs at least 2 bits
        img.snapshot("snap1")
        img.write(1 * MiB, 256 * KiB, 0xA5)
        notes += "; one snapshot, then partial overwrite (refcounts 1 and 2)"
    return img.case(name, tags={"refcount_bits"}, notes=notes,
                    expect={"format-specific.data.refcount-bits": bits})


for _bits in (1, 2, 4, 8, 16, 32, 64):
    def _make(bits):
        def fn(d):
            return [_refbits(d, bits)]
        fn.__name__ = f"b_refbits{bits}"
        return fn
    builder(_make(_bits))


@builder
def b_v2(d):
    img = _Img(d / "v2.qcow2", 8 * MiB, opts="compat=0.10", v2=True)
    img.write(0, 100 * KiB, 0x02)
    _random_writes(img, random.Random(20), 20)
    img.zero(2 * MiB, 128 * KiB)  # v2 has no zero flag: QEMU writes/unmaps instead
    img.discard(3 * MiB, 192 * KiB)
    return [img.case("v2", tags={"v2", "zero", "discard"},
                     notes="compat=0.10 (version 2, 72-byte header), data, zero writes, discard",
                     expect={"format-specific.data.compat": "0.10"})]


@builder
def b_v2_snapshots(d):
    img = _Img(d / "v2_snapshots.qcow2", 8 * MiB, opts="compat=0.10", v2=True)
    img.write(0, 1 * MiB, 0x31)
    img.snapshot("v2-first")
    img.write(512 * KiB, 1 * MiB, 0x32)
    img.snapshot("v2-second")
    _random_writes(img, random.Random(21), 12, zero_ratio=0)
    return [img.case("v2_snapshots", tags={"v2"},
                     notes="compat=0.10 with two snapshots (v2 snapshot entries, no extra data)",
                     expect={"format-specific.data.compat": "0.10"})]


@builder
def b_compat11(d):
    img = _Img(d / "compat11.qcow2", 8 * MiB, opts="compat=1.1")
    _random_writes(img, random.Random(11), 25)
    return [img.case("compat11", notes="explicit compat=1.1 (version 3)",
                     expect={"format-specific.data.compat": "1.1"})]


@builder
def b_lazy_refcounts(d):
    img = _Img(d / "lazy_refcounts.qcow2", 8 * MiB, opts="lazy_refcounts=on")
    _random_writes(img, random.Random(30), 20)
    return [img.case("lazy_refcounts", tags={"lazy_refcounts"},
                     notes="lazy_refcounts=on (compatible bit 0), closed cleanly",
                     expect={"format-specific.data.lazy-refcounts": True, "dirty-flag": False})]


@builder
def b_dirty_patched(d):
    img = _Img(d / "dirty_patched.qcow2", 8 * MiB, opts="lazy_refcounts=on")
    _random_writes(img, random.Random(31), 20)
    img.flush()
    set_incompatible_bits(img.path, 1)
    img.ops.append("python: incompatible_features |= 1 (dirty)")
    return [img.case("dirty_patched", tags={"lazy_refcounts", "dirty"},
                     notes="lazy_refcounts image closed cleanly, then dirty bit set by patching "
                           "header byte 79; refcounts are in fact consistent. Open read-only only "
                           "(a read-write open by QEMU repairs and clears the bit).",
                     expect={"format-specific.data.lazy-refcounts": True, "dirty-flag": True})]


@builder
def b_dirty_crashed(d):
    img = _Img(d / "dirty_crashed.qcow2", 8 * MiB, opts="lazy_refcounts=on")
    img.write(0, 64 * KiB, 0x5A)
    img.write(1 * MiB, 128 * KiB, 0x5B)
    img.write(3 * MiB + 512, 1000, 0x5C)
    img.crash()
    img.ops.append("qemu-io sigraise 9 (crash before refcounts were written)")
    return [img.case("dirty_crashed", tags={"lazy_refcounts", "dirty"}, check_rc=2,
                     notes="lazy_refcounts image whose qemu-io was SIGKILLed after writing "
                           "(sigraise 9): dirty bit set, data clusters have refcount 0, so "
                           "qemu-img check reports errors (exit 2). Open read-only only.",
                     expect={"format-specific.data.lazy-refcounts": True, "dirty-flag": True})]


def _prealloc(d: Path, mode: str) -> ImageCase:
    name = f"prealloc_{mode}"
    img = _Img(d / f"{name}.qcow2", 4 * MiB, opts=f"preallocation={mode}")
    img.write(64 * KiB, 64 * KiB, 0x61)
    img.write(1 * MiB + 100, 5000, 0x62)
    img.zero(2 * MiB, 64 * KiB)
    return img.case(name, tags={"prealloc"}, notes=f"preallocation={mode}, 4 MiB, a few writes")


for _mode in ("off", "metadata", "falloc", "full"):
    def _makep(mode):
        def fn(d):
            return [_prealloc(d, mode)]
        fn.__name__ = f"b_prealloc_{mode}"
        return fn
    builder(_makep(_mode))


@builder
def b_snapshots(d):
    img = _Img(d / "snapshots.qcow2", 16 * MiB)
    img.write(0, 2 * MiB, 0x41)
    img.write(8 * MiB, 300 * KiB + 17, 0x42)
    img.snapshot("s1")
    img.write(1 * MiB, 2 * MiB, 0x43)  # overwrites half of the first range, COW
    img.zero(8 * MiB, 64 * KiB)
    img.snapshot("s2 with spaces")
    img.snapshot("doomed")
    img.discard(0, 256 * KiB)
    _random_writes(img, random.Random(40), 15)
    img.snapshot("s3")
    img.delete_snapshot("doomed")
    img.write(12 * MiB, 64 * KiB, 0x44)
    return [img.case("snapshots",
                     notes="4 snapshots created (one deleted again) with writes, zero writes and "
                           "a discard between them, so every snapshot L1 differs from the active",
                     expect={"snapshots.len": 3})]


@builder
def b_vmstate(d):
    img = _Img(d / "vmstate.qcow2", 4 * MiB)
    img.write(0, 64 * KiB, 0x71)
    img.flush(extra_cmds=["write -b -P 0x99 0 64k"])
    img.snapshot("with-vmstate-area")
    return [img.case("vmstate", tags={"vmstate"},
                     notes="qemu-io 'write -b' wrote 64 KiB of VM state: the active and snapshot "
                           "L1 tables have an entry beyond the end of the virtual disk "
                           "(vm-state-size of the snapshot is still 0)",
                     expect={"snapshots.len": 1})]


@builder
def b_bitmaps(d):
    img = _Img(d / "bitmaps.qcow2", 16 * MiB)
    img.write(0, 128 * KiB, 0x51)  # before any bitmap: not recorded anywhere
    img.add_bitmap("bm_default")
    img.add_bitmap("bm_gran4k", granularity=4096)
    img.add_bitmap("bm_disabled", enabled=False)
    img.add_bitmap("bm_toggled", granularity=512 * KiB, enabled=False)
    img.write(1 * MiB, 64 * KiB, 0x52)
    img.write(3 * MiB + 100, 3000, 0x53)
    img.zero(5 * MiB, 8 * KiB)
    img.flush()
    img.add_bitmap("bm_merged", enabled=False)
    img.merge_bitmap("bm_gran4k", "bm_merged")
    img.set_bitmap_enabled("bm_toggled", True)
    img.set_bitmap_enabled("bm_gran4k", False)
    img.write(9 * MiB + 4096, 4096, 0x54)
    img.write(15 * MiB, 1 * MiB, 0x55)
    img.flush()
    img.add_bitmap("bm_empty")
    return [img.case("bitmaps",
                     notes="persistent bitmaps: default granularity, 4k granularity, disabled, "
                           "disabled-then-enabled, merged copy, and one added last (clean); "
                           "writes happen between the steps, so dirty ranges differ",
                     expect={"format-specific.data.bitmaps.len": 6})]


@builder
def b_bitmaps_cs4k(d):
    img = _Img(d / "bitmaps_cs4k.qcow2", 64 * MiB, opts="cluster_size=4k", cluster_size=4096)
    img.add_bitmap("fine", granularity=512)
    img.add_bitmap("coarse", granularity=1 * MiB)
    _random_writes(img, random.Random(50), 30, max_len=64 * KiB, zero_ratio=0.2)
    img.write(40 * MiB, 8 * KiB, 0x56)
    return [img.case("bitmaps_cs4k",
                     notes="4k clusters, a 512-byte-granularity bitmap whose table spans 4 "
                           "clusters (some all-zero, stored as offset 0) and a 1 MiB one",
                     expect={"format-specific.data.bitmaps.len": 2})]


@builder
def b_bitmap_in_use(d):
    img = _Img(d / "bitmap_in_use.qcow2", 4 * MiB)
    img.add_bitmap("b0")
    img.write(0, 64 * KiB, 0x5A)
    img.crash()
    img.ops.append("qemu-io sigraise 9 (bitmap never stored)")
    c = img.case("bitmap_in_use", tags={"dirty"},
                 notes="qemu-io killed while a persistent bitmap was loaded: the bitmap keeps "
                       "its in_use flag (inconsistent); check is still clean")
    c.bitmaps[0].in_use = True
    c.bitmaps[0].dirty = []  # contents are undefined for an in-use bitmap
    return [c]


def _compressed_io(d: Path, name: str, ctype: str) -> ImageCase:
    img = _Img(d / f"{name}.qcow2", 8 * MiB, opts=f"compression_type={ctype}")
    cs = img.cluster_size
    rng = random.Random(60 if ctype == "zlib" else 61)
    for i in range(12):  # single whole clusters, uniform patterns (tiny streams)
        img.write(i * cs, cs, 0x80 + i, compressed=True)
    img.write(20 * cs, 4 * cs, 0x90, compressed=True)  # multi-cluster request
    for i in range(24, 40):  # varied data: streams of very different lengths
        img.write_data(i * cs, _varied_data(rng, cs), compressed=True)
    img.write(5 * cs + 1000, 3000, 0x91)  # partial overwrite of a compressed cluster
    img.zero(6 * cs, cs, unmap=True)
    img.write(8 * MiB - cs, cs, 0x92, compressed=True)  # last cluster
    return img.case(name, tags={"compressed"},
                    notes=f"{ctype}: qemu-io 'write -c' of whole clusters (uniform and varied "
                          "data), one compressed cluster partly overwritten, one zeroed",
                    expect={"format-specific.data.compression-type": ctype})


@builder
def b_compressed_zlib(d):
    return [_compressed_io(d, "compressed_zlib", "zlib")]


@builder
def b_compressed_zstd(d):
    return [_compressed_io(d, "compressed_zstd", "zstd")]


def _convert_c(d: Path, name: str, ctype: str, cs: int) -> ImageCase:
    rng = random.Random(f"{ctype}-{cs}")
    raw = d / f"{name}.src.raw"
    size = 3 * MiB
    parts = []
    for _ in range(size // cs):  # per cluster: all zero, incompressible, or mixed content
        k = rng.random()
        if k < 0.1:
            parts.append(bytes(cs))
        elif k < 0.2:
            parts.append(rng.randbytes(cs))
        else:
            parts.append(_varied_data(rng, cs, block=rng.choice((512, 1024, 4096))))
    data = b"".join(parts)
    raw.write_bytes(data)
    path = (d / f"{name}.qcow2").absolute()
    run([QEMU_IMG, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o",
         f"compression_type={ctype},cluster_size={cs}", str(raw), str(path)], cwd=d)
    raw.unlink()
    img = _Img(path, size, cluster_size=cs, create=False)
    img.buf[:] = data
    img.ops.append(f"convert -c -O qcow2 -o compression_type={ctype},cluster_size={cs} <raw>")
    return img.case(name, tags={"compressed", "converted"},
                    notes=f"qemu-img convert -c from 3 MiB of varied raw data, {ctype}, "
                          f"cluster {cs}: packed streams crossing host-cluster boundaries, "
                          "zero clusters left out, incompressible clusters stored plain",
                    expect={"format-specific.data.compression-type": ctype})


@builder
def b_convert_zlib_4k(d):
    return [_convert_c(d, "convert_zlib_4k", "zlib", 4096)]


@builder
def b_convert_zlib_64k(d):
    return [_convert_c(d, "convert_zlib_64k", "zlib", 65536)]


@builder
def b_convert_zstd_4k(d):
    return [_convert_c(d, "convert_zstd_4k", "zstd", 4096)]


@builder
def b_convert_zstd_64k(d):
    return [_convert_c(d, "convert_zstd_64k", "zstd", 65536)]


@builder
def b_extl2_backing(d):
    base = _Img(d / "extl2_base.qcow2", 8 * MiB)
    for i in range(64):  # every 64k cluster of the first 4 MiB filled with byte i+1
        base.write(i * 64 * KiB, 64 * KiB, i + 1)
    base.flush()
    img = _Img(d / "extl2_backing.qcow2", 8 * MiB, opts="extended_l2=on",
               backing=base, backing_path="extl2_base.qcow2")
    sc = 2 * KiB  # 64k clusters -> 32 subclusters of 2 KiB
    for k in (1, 3, 7, 31):  # single subclusters at odd indices of cluster 2
        img.write(2 * 64 * KiB + k * sc, sc, 0xA0 + k)
    img.write(3 * 64 * KiB + 5 * sc + 300, 1000, 0xB5)  # inside one subcluster: COW from backing
    img.write(4 * 64 * KiB - sc, 2 * sc, 0xB6)  # across a cluster boundary
    img.zero(5 * 64 * KiB + 10 * sc, 3 * sc)  # zero subclusters over backing data
    img.zero(6 * 64 * KiB + 100, 1500)  # zero inside one subcluster
    img.zero(7 * 64 * KiB, 64 * KiB, unmap=True)  # a whole cluster
    img.discard(8 * 64 * KiB, 64 * KiB)
    img.write(9 * 64 * KiB, 64 * KiB, 0xB9, compressed=True)
    img.write(5 * MiB + 7 * sc, sc, 0xBA)  # above the backing data
    _random_writes(img, random.Random(70), 12, max_len=64 * KiB, hi=4 * MiB)
    base_case = base.case("extl2_base", notes="plain backing file under extl2_backing: "
                                              "64k cluster i of 0..4 MiB filled with byte i+1")
    return [base_case, img.case(
        "extl2_backing", tags={"extended_l2", "zero", "discard", "compressed"},
        notes="extended_l2=on, 64k clusters (2 KiB subclusters) over a backing file: "
              "odd single-subcluster writes, sub-subcluster COW, zero subclusters, a "
              "discarded and a compressed cluster; unallocated subclusters read the backing",
        expect={"format-specific.data.extended-l2": True, "backing-filename": "extl2_base.qcow2"})]


@builder
def b_extl2_16k(d):
    img = _Img(d / "extl2_16k.qcow2", 8 * MiB, opts="extended_l2=on,cluster_size=16k",
               cluster_size=16 * KiB)
    for k in range(1, 32, 2):  # every odd 512-byte subcluster of cluster 0
        img.write(k * 512, 512, k)
    img.write(16 * KiB + 700, 100, 0x77)
    img.zero(32 * KiB + 1024, 2048)
    img.write(48 * KiB, 16 * KiB, 0x78, compressed=True)
    _random_writes(img, random.Random(71), 30, max_len=64 * KiB, zero_ratio=0.3)
    return [img.case("extl2_16k", tags={"extended_l2", "compressed"},
                     notes="extended_l2=on, 16k clusters (512-byte subclusters, the minimum), "
                           "odd subclusters, zero ranges, a compressed cluster",
                     expect={"format-specific.data.extended-l2": True})]


@builder
def b_extl2_2M(d):
    img = _Img(d / "extl2_2M.qcow2", 64 * MiB, opts="extended_l2=on,cluster_size=2M",
               cluster_size=2 * MiB)
    img.write(64 * KiB, 64 * KiB, 0x81)  # subcluster 1 of cluster 0
    img.write(2 * MiB + 3 * 64 * KiB + 5, 200, 0x82)
    img.zero(4 * MiB, 128 * KiB)
    img.write(10 * MiB - 64 * KiB, 128 * KiB, 0x83)
    return [img.case("extl2_2M", tags={"extended_l2"},
                     notes="extended_l2=on, 2M clusters (64 KiB subclusters)",
                     expect={"format-specific.data.extended-l2": True})]


@builder
def b_chain3(d):
    base = _Img(d / "chain3_base.qcow2", 16 * MiB)
    base.write(0, 4 * MiB, 0x11)
    base.write(8 * MiB, 1 * MiB, 0x12)
    base.write(15 * MiB, 1 * MiB, 0x13)
    mid = _Img(d / "chain3_mid.qcow2", 16 * MiB, backing=base, backing_path="chain3_base.qcow2")
    mid.write(1 * MiB, 512 * KiB, 0x22)
    mid.write(6 * MiB + 1234, 10000, 0x23)
    mid.zero(8 * MiB, 256 * KiB)
    mid.flush()
    top = _Img(d / "chain3.qcow2", 16 * MiB, backing=mid, backing_path="chain3_mid.qcow2")
    top.write(1 * MiB + 256 * KiB, 512 * KiB, 0x33)
    top.zero(2 * MiB, 256 * KiB)  # zeros over base data
    top.zero(6 * MiB, 64 * KiB, unmap=True)  # zeros over mid data
    top.discard(3 * MiB, 128 * KiB)  # discard over base data -> zero clusters
    top.write(12 * MiB + 100, 100, 0x34)
    _random_writes(top, random.Random(80), 10, zero_ratio=0.2)
    return [
        base.case("chain3_base", notes="bottom of chain3"),
        mid.case("chain3_mid", notes="middle of chain3: writes and a zero write over the base",
                 expect={"backing-filename": "chain3_base.qcow2"}),
        top.case("chain3", tags={"zero", "discard"},
                 notes="base <- mid <- top (names relative, same directory); top zeroes and "
                       "discards ranges that hold backing data",
                 expect={"backing-filename": "chain3_mid.qcow2",
                         "backing-filename-format": "qcow2"}),
    ]


@builder
def b_backing_larger(d):
    base = _Img(d / "bl_base.qcow2", 3_000_000)  # not cluster aligned either (-> 3000320)
    base.write(0, 1 * MiB, 0x91)
    base.write(base.size - 5000, 5000, 0x92)
    top = _Img(d / "backing_larger.qcow2", 8 * MiB, backing=base,
               backing_path=str(base.path))  # absolute backing name
    top.write(2 * MiB, 64 * KiB, 0x93)
    top.write(6 * MiB, 64 * KiB, 0x94)  # beyond the end of the backing file
    return [top.case("backing_larger",
                     notes="8 MiB top over a 3000320-byte backing file given by absolute path: "
                           "reads past the backing's end are zeros (partial last backing cluster)",
                     expect={"backing-filename": str(base.path)})]


@builder
def b_backing_smaller(d):
    base = _Img(d / "bs_base.qcow2", 8 * MiB)
    base.write(0, 1 * MiB, 0xA1)
    base.write(4 * MiB - 64 * KiB, 128 * KiB, 0xA2)  # straddles the top's end
    base.write(6 * MiB, 1 * MiB, 0xA3)  # invisible through the top
    top = _Img(d / "backing_smaller.qcow2", 4 * MiB, backing=base, backing_path="bs_base.qcow2")
    top.write(512 * KiB, 64 * KiB, 0xA4)
    return [top.case("backing_smaller",
                     notes="4 MiB top over an 8 MiB backing file: backing data past 4 MiB unseen")]


@builder
def b_backing_relative(d):
    (d / "A").mkdir()
    (d / "B").mkdir()
    base = _Img(d / "B" / "base.qcow2", 4 * MiB)
    base.write(0, 2 * MiB, 0xC1)
    top = _Img(d / "A" / "top.qcow2", 4 * MiB, backing=base, backing_path="../B/base.qcow2")
    top.write(1 * MiB, 64 * KiB, 0xC2)
    return [top.case("backing_relative",
                     notes="backing name '../B/base.qcow2', resolved against the image's own "
                           "directory (A/), not the current directory",
                     expect={"backing-filename": "../B/base.qcow2"})]


@builder
def b_backing_raw(d):
    size = 4 * MiB
    raw = d / "raw_base.raw"
    data = bytearray(size)
    data[0:1 * MiB] = b"\xD1" * MiB
    data[2 * MiB + 7:2 * MiB + 7 + 9999] = b"\xD2" * 9999
    raw.write_bytes(bytes(data))
    base = _Img(raw, size, create=False)
    base.buf[:] = data
    top = _Img(d / "backing_raw.qcow2", size, backing=base, backing_path="raw_base.raw",
               backing_fmt="raw")
    top.write(512 * KiB, 64 * KiB, 0xD3)
    top.zero(2 * MiB, 64 * KiB)
    return [top.case("backing_raw", notes="qcow2 over a raw backing file (-F raw)",
                     expect={"backing-filename-format": "raw"})]


@builder
def b_backing_nofmt(d):
    base = _Img(d / "nofmt_base.qcow2", 4 * MiB)
    base.write(0, 1 * MiB, 0xE1)
    top = _Img(d / "backing_nofmt.qcow2", 4 * MiB, backing=base, backing_path="nofmt_base.qcow2")
    top.write(256 * KiB, 64 * KiB, 0xE2)
    top.flush()
    drop_header_extension(top.path, EXT_BACKING_FORMAT)
    top.ops.append("python: removed header extension 0xe2792aca (backing format)")
    return [top.case("backing_nofmt",
                     notes="no backing-format header extension (QEMU probes the backing format). "
                           "qemu-img 7.2 refuses to create this, so the extension was removed "
                           "from a normal image afterwards, as older QEMU wrote it",
                     expect={"backing-filename": "nofmt_base.qcow2",
                             "backing-filename-format": None})]


@builder
def b_backing_v2(d):
    base = _Img(d / "v2_base.qcow2", 4 * MiB, opts="compat=0.10", v2=True)
    base.write(0, 2 * MiB, 0xF1)
    top = _Img(d / "backing_v2.qcow2", 4 * MiB, opts="compat=0.10", v2=True, backing=base,
               backing_path="v2_base.qcow2")
    top.write(64 * KiB, 64 * KiB, 0xF2)
    top.discard(512 * KiB, 128 * KiB)  # v2: falls through to the backing data again
    top.zero(1 * MiB, 64 * KiB)  # v2 zero write over backing data: real zeros
    return [top.case("backing_v2", tags={"v2", "discard", "zero"},
                     notes="compat=0.10 over compat=0.10: a discard in a v2 image re-exposes the "
                           "backing data; zero writes are stored as data",
                     expect={"format-specific.data.compat": "0.10"})]


def _datafile(d: Path, name: str, raw: bool) -> ImageCase:
    dname = f"{name}.data"
    img = _Img(d / f"{name}.qcow2", 8 * MiB,
               opts=f"data_file={dname},data_file_raw={'on' if raw else 'off'}")
    img.write(0, 64 * KiB, 0x71)
    img.write(1 * MiB + 333, 7777, 0x72)
    _random_writes(img, random.Random(90 + raw), 12, zero_ratio=0.2)
    img.zero(4 * MiB, 128 * KiB)
    return img.case(name, tags={"data_file"}, data_file=(d / dname).absolute(),
                    notes=f"external data file '{dname}' (relative name; QEMU 7.2 resolves it "
                          f"against the process cwd, so run QEMU in the image's directory), "
                          f"data_file_raw={'on' if raw else 'off'}",
                    expect={"format-specific.data.data-file": dname,
                            "format-specific.data.data-file-raw": raw})


@builder
def b_datafile_raw(d):
    return [_datafile(d, "datafile_raw", True)]


@builder
def b_datafile(d):
    return [_datafile(d, "datafile", False)]


@builder
def b_luks(d):
    img = _Img(d / "luks.qcow2", 4 * MiB, secret=SECRET,
               opts=f"encrypt.format=luks,encrypt.key-secret={SECRET_ID},encrypt.iter-time=10")
    img.write(0, 64 * KiB, 0x4C)
    img.write(1 * MiB + 512, 3 * 512, 0x4D)
    img.write(2 * MiB + 17, 100, 0x4E)  # unaligned: read-modify-write of an encrypted sector
    return [img.case("luks", tags={"encrypted"},
                     notes=f"LUKS-encrypted qcow2 (crypt_method 2), secret '{SECRET}'",
                     expect={"encrypted": True, "format-specific.data.encrypt.format": "luks"})]


@builder
def b_aes(d):
    img = _Img(d / "aes.qcow2", 4 * MiB, secret=SECRET,
               opts=f"encrypt.format=aes,encrypt.key-secret={SECRET_ID}")
    img.write(0, 64 * KiB, 0x41)
    img.write(2 * MiB + 512, 1024, 0x42)
    return [img.case("aes", tags={"encrypted"},
                     notes=f"legacy AES-CBC qcow2 encryption (crypt_method 1), secret '{SECRET}'",
                     expect={"encrypted": True, "format-specific.data.encrypt.format": "aes"})]


@builder
def b_size0(d):
    img = _Img(d / "size0.qcow2", 0)
    return [img.case("size0", tags={"size"}, notes="virtual size 0 (l1_size 0)")]


@builder
def b_size_unaligned(d):
    img = _Img(d / "size_unaligned.qcow2", 1_000_000)
    img.write(12345, 6789, 0x55)
    img.write(img.size - 1448, 1448, 0x56)  # up to the (rounded) end, partial last cluster
    return [img.case("size_unaligned", tags={"size"},
                     notes="created with 1000000 bytes: QEMU rounds to 1000448 (not a multiple "
                           "of the cluster size); data in the partial last cluster")]


@builder
def b_discard_zero(d):
    img = _Img(d / "discard_zero.qcow2", 8 * MiB)
    img.write(0, 4 * MiB, 0x66)
    img.discard(0, 128 * KiB)  # aligned: two clusters dropped
    img.discard(200 * KiB, 100 * KiB)  # partial: only the whole cluster inside goes
    img.zero(512 * KiB, 128 * KiB)  # allocated zero clusters (offset kept, zero flag)
    img.zero(1 * MiB, 128 * KiB, unmap=True)  # unmapped zero clusters
    img.zero(1536 * KiB + 1000, 3000)  # sub-cluster: written as zeros
    img.zero(6 * MiB, 256 * KiB)  # over unallocated space
    img.write(7 * MiB, 1 * MiB, 0x67)
    img.discard(8 * MiB - 64 * KiB, 64 * KiB)  # the last cluster
    img.write(3 * MiB, 64 * KiB, 0x68)
    img.discard(3 * MiB, 64 * KiB)
    img.write(3 * MiB, 4096, 0x69)  # re-allocate after discard
    return [img.case("discard_zero", tags={"discard", "zero"},
                     notes="discard (aligned, partial, last cluster), write -z with and without "
                           "unmap, sub-cluster zero write, rewrite after discard")]


@builder
def b_empty(d):
    img = _Img(d / "empty.qcow2", 16 * MiB)
    return [img.case("empty", notes="freshly created, nothing written")]


# --------------------------------------------------------------------------------------------


def clone_case(case: ImageCase, dst_dir: "str | os.PathLike") -> ImageCase:
    """Copy a case's builder directory to `dst_dir` (for tests that modify images) and return
    the case with its paths moved. Backing files named by absolute path (backing_larger) still
    point at the original."""
    import copy
    import dataclasses

    root = case.root or case.path.parent
    new_root = Path(dst_dir).absolute() / root.name
    shutil.copytree(root, new_root, symlinks=True)

    def move(p: Path | None) -> Path | None:
        if p is None:
            return None
        try:
            return new_root / Path(p).relative_to(root)
        except ValueError:
            return p

    return dataclasses.replace(
        copy.deepcopy(case), path=move(case.path), data_file=move(case.data_file),
        backing_chain=[move(p) for p in case.backing_chain], root=new_root)


def _build_one(workdir: Path, key: str) -> list[ImageCase]:
    d = workdir / key
    d.mkdir(parents=True, exist_ok=True)
    cases = BUILDERS[key](d)
    for c in cases:
        c.root = d
        rc, _ = qemu_img_check(c)
        if rc != c.check_rc:
            raise FactoryError(f"{c.name}: qemu-img check exit status {rc}, expected {c.check_rc}")
    return cases


def build_all(workdir: Path, only: Iterable[str] | None = None,
              jobs: int | None = None) -> dict[str, ImageCase]:
    """Build every case (or the builders named in `only`) under `workdir`, one subdirectory per
    builder, verify each with `qemu-img check`, and return the cases by name."""
    if not have_qemu():
        raise FactoryError("qemu-img / qemu-io not found on PATH")
    workdir = Path(workdir).absolute()
    keys = list(BUILDERS) if only is None else list(only)
    for k in keys:
        if k not in BUILDERS:
            raise KeyError(f"unknown builder {k!r}; known: {', '.join(BUILDERS)}")
    # the LUKS key derivation benchmark takes ~2 s of CPU: start it first
    keys.sort(key=lambda k: k != "luks")
    jobs = jobs or max(2, min(8, (os.cpu_count() or 2) * 2))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        results = list(pool.map(lambda k: _build_one(workdir, k), keys))
    out: dict[str, ImageCase] = {}
    for cases in results:
        for c in cases:
            if c.name in out:
                raise FactoryError(f"duplicate case name {c.name}")
            out[c.name] = c
    return out


if __name__ == "__main__":  # python tests/factory.py DIR: build and list
    import sys
    import time

    t = time.monotonic()
    cases = build_all(Path(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()))
    for c in cases.values():
        print(f"{c.name:20} {c.path}")
    print(f"{len(cases)} cases in {time.monotonic() - t:.1f} s")
