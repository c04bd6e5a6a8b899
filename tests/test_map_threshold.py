"""``map`` at the threshold of QEMU's metadata-preallocation heuristic (issue 13).

QEMU 7.2 (``qcow2_detect_metadata_preallocation``, block/qcow2-refcount.c) counts the clusters
below the end of the file whose refcount is not zero (header, tables, refcount structures, the
snapshot table, clusters only a snapshot references, data) and calls the image preallocated when
that count *reaches* ``max(real * 10 // 9, real + 2)``, ``real`` being the file's allocated bytes
(``st_blocks * 512``) in whole clusters.  Then ``qcow2_co_block_status`` asks the file about
every data cluster and a hole in it is reported as zero.

Each image here is made by qemu-img / qemu-io with two internal snapshots (so some clusters are
referenced by snapshots only), then whole data clusters of the active layer are punched out of the
file, as many as it takes to put the count exactly at the threshold, one below it, or one above
it.  The count and the threshold are computed here with ``struct`` and ``os.stat``, not through
qcow2kit; ``qemu-img map`` shows which side QEMU saw; ``qcow2kit map`` must print the same bytes,
in JSON and in the human form.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import factory  # tests/ is on sys.path (conftest.py)
import qcow2kit
from qcow2kit import mapping as M
from qemu import qemu_img
from test_map import (KiB, MiB, image_case, parse_layout, qemu_io, qemu_map,
                      qemu_map_uncached, run_cli)

qemu = pytest.mark.qemu


def threshold(real_clusters: int) -> int:
    """QEMU's threshold for a file holding ``real_clusters`` clusters' worth of blocks."""
    return max(real_clusters * 10 // 9, real_clusters + 2)


def clusters_in_use(path: Path) -> int:
    """Clusters below the end of the file (rounded up) with a non-zero refcount."""
    lay = parse_layout(path)
    cs, bits = lay.cluster_size, lay.refcount_bits
    per_block = cs * 8 // bits
    end = -(-lay.file_size // cs)
    count = 0
    with open(path, "rb") as f:
        for i, block in enumerate(lay.refblocks):
            if not block or i * per_block >= end:
                continue
            f.seek(block)
            raw = f.read(cs)
            n = min(per_block, end - i * per_block)
            if bits >= 8:
                w = bits // 8
                vals = [int.from_bytes(raw[k * w:(k + 1) * w], "big") for k in range(n)]
            else:  # sub-byte entries, lowest bits first (as QEMU's get_refcount_ro0..2)
                vals = [raw[k * bits // 8] >> (k * bits % 8) & ((1 << bits) - 1)
                        for k in range(n)]
            count += sum(1 for v in vals if v)
    return count


def real_clusters(path: Path, cs: int) -> int:
    return os.stat(path).st_blocks * 512 // cs


def punch(path: Path, offset: int, length: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length",
                    str(length), str(path)], check=True)


def build(d: Path, cs: int, n: int) -> Path:
    """``n`` data clusters, snapshot s1, half of them rewritten, s2, a quarter rewritten."""
    path = d / "img.qcow2"
    if path.exists():
        path.unlink()
    qemu_img("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cs}", path.name,
             str(2 * n * cs + MiB), cwd=d)
    qemu_io(path, f"write -P 0x11 0 {n * cs}")
    qemu_img("snapshot", "-c", "s1", path.name, cwd=d)
    qemu_io(path, f"write -P 0x22 0 {n // 2 * cs}", f"write -P 0x23 {n * cs} {cs}")
    qemu_img("snapshot", "-c", "s2", path.name, cwd=d)
    qemu_io(path, f"write -P 0x33 {cs} {n // 4 * cs}")
    return path


def data_clusters(path: Path, cs: int) -> list[int]:
    """Host offsets of the active layer's data clusters, in guest order."""
    out = []
    for e in factory.qemu_img_map(path):
        if e["data"] and "offset" in e:
            out += range(e["offset"], e["offset"] + e["length"], cs)
    return out


def at_offset(d: Path, cs: int, n0: int, target: int) -> Path:
    """An image whose clusters in use number ``threshold + target`` once some of its data
    clusters are punched out, one at a time from the second (holes inside the data), measuring
    ``st_blocks`` after each (ext4 may add a block to its extent tree).  Tries ``n0``,
    ``n0 + 1``, ... data clusters until that count is reachable (``real * 10 // 9`` skips
    every tenth value)."""
    for n in range(n0, n0 + 12):
        path = build(d, cs, n)
        count = clusters_in_use(path)
        candidates = iter(data_clusters(path, cs)[1:-1])
        while count - threshold(real_clusters(path, cs)) < target:
            off = next(candidates, None)
            if off is None:
                break
            punch(path, off, cs)
        if count - threshold(real_clusters(path, cs)) == target:
            if clusters_in_use(path) != count:
                raise factory.FactoryError("punching changed the refcounts")
            return path
    raise factory.FactoryError(f"no image with {n0}.. data clusters reaches {target}")


# (cluster size, data clusters): the "real + 2" regime of small files, then the "10 / 9" one,
# with 4 KiB clusters (metadata fills its clusters) and 64 KiB ones (it does not: the file has
# fewer blocks than clusters in use before anything is punched).
SHAPES = [(4 * KiB, 6), (4 * KiB, 150), (64 * KiB, 56)]


@pytest.fixture(scope="module")
def threshold_images(tmp_path_factory):
    if not factory.have_qemu():
        pytest.skip("needs qemu-img and qemu-io")
    cache: dict[tuple[int, int, int], factory.ImageCase] = {}

    def get(cs: int, n0: int, target: int) -> factory.ImageCase:
        key = (cs, n0, target)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"threshold-{cs}-{n0}-{target}")
            path = at_offset(d, cs, n0, target)
            cache[key] = image_case(f"threshold{target:+d}", path, cs)
        return cache[key]

    return get


def _qemu_saw_preallocation(case: factory.ImageCase) -> bool:
    """Whether QEMU looked at the file's holes: punched data clusters then read as zero."""
    rc, out, err = qemu_map_uncached(case)
    if rc:
        raise factory.FactoryError(err.decode())
    return any(e["zero"] and e["data"] for e in json.loads(out))


@qemu
@pytest.mark.parametrize("target", [-1, 0, 1], ids=["below", "at", "above"])
@pytest.mark.parametrize("cs,n0", SHAPES, ids=[f"{cs // KiB}k-{n}" for cs, n in SHAPES])
def test_map_at_the_preallocation_threshold(threshold_images, capsysbinary, cs, n0, target):
    case = threshold_images(cs, n0, target)
    qemu_prealloc = _qemu_saw_preallocation(case)
    if qemu_prealloc != (target >= 0):
        raise factory.FactoryError(f"qemu-img map did not show the expected side of the "
                                   f"threshold (count - threshold = {target})")
    qrc, qout, qerr = qemu_map(case)
    assert qrc == 0, qerr
    assert run_cli(capsysbinary, case, "--output=json") == (0, qout, b"")
    qrc, qout, qerr = qemu_map(case, human=True)
    assert qrc == 0, qerr
    assert run_cli(capsysbinary, case) == (0, qout, b"")
    with qcow2kit.open(case.path) as img:
        assert len(img.snapshots) == 2
        assert M.detect_metadata_preallocation(img) is qemu_prealloc


@qemu
def test_unaligned_refcount_block_means_no_preallocation(tmp_path, capsysbinary):
    """``qcow2_get_refcount`` fails on an unaligned refcount block; the heuristic then returns
    the error and ``qcow2_co_block_status`` takes it as "not preallocated": a
    preallocation=metadata image is mapped as plain data, holes and all (QEMU warns on stderr
    and exits 0).  qcow2kit refused the image instead."""
    path = tmp_path / "pm.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path.name, "4M",
             cwd=tmp_path)
    qemu_io(path, "write -P 1 0 4k")
    case = image_case("unaligned-refblock", path, 64 * KiB)
    if not any(e["zero"] and e["data"] for e in factory.qemu_img_map(path)):
        raise factory.FactoryError("preallocation=metadata: QEMU should see holes as zero")
    lay = parse_layout(path)
    with open(path, "r+b") as f:
        f.seek(lay.reftable_offset)
        f.write((lay.refblocks[0] + 0x200).to_bytes(8, "big"))
    rc, out, err = qemu_map_uncached(case)
    if rc != 0 or b"unaligned" not in err or any(e["zero"] for e in json.loads(out)):
        raise factory.FactoryError(f"qemu-img map: {rc} {out!r} {err!r}")
    assert run_cli(capsysbinary, case, "--output=json") == (0, out, b"")
