"""One resolver of the backing chain: block_status and the mapper agree, with qemu-img map.

Random small chains are built with the real tools (``qemu-img create -b``, ``qemu-io``
writes, zero writes with and without unmapping, discards): an optional raw base, then
one to three qcow2 layers of random geometry (512-byte to 64 KiB clusters, extended L2)
and sizes, each shorter or longer than its backing file.  At random guest ranges, every
status ``block_status`` yields must match the mapper's extent and ``qemu-img map``'s
extent at both of its ends: depth, present, zero, data.  Both callers go through
``qcow2kit.image.chain.resolve``; this test is what keeps them from drifting apart.
"""
from __future__ import annotations

import bisect
import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import factory  # tests/ is on sys.path (conftest.py)
import qcow2kit
from qcow2kit.image import block_status
from qcow2kit.mapping import iter_extents

pytestmark = pytest.mark.qemu

KiB = 1024
GEOMETRIES = ("cluster_size=512", "cluster_size=4k", "cluster_size=64k",
              "cluster_size=16k,extended_l2=on", "cluster_size=64k,extended_l2=on")


@st.composite
def chains(draw):
    """(raw base size or None, [(qcow2 options, size, [qemu-io commands])...], seed)."""
    raw = draw(st.one_of(st.none(), st.integers(1, 12).map(lambda k: k * 256 * KiB + 4096)))
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        size = draw(st.integers(2, 16)) * 256 * KiB + draw(st.sampled_from((0, 512, 4096)))
        cmds = []
        for _ in range(draw(st.integers(0, 12))):
            align = draw(st.sampled_from((512, 4096, 65536)))
            off = draw(st.integers(0, size - 1)) // align * align
            n = min(draw(st.sampled_from((512, 4096, 20000, 65536, 300000))), size - off)
            op = draw(st.sampled_from(("write -P 7", "write -P 0", "write -z", "write -z -u",
                                       "discard")))
            cmds.append(f"{op} {off} {n}")
        layers.append((draw(st.sampled_from(GEOMETRIES)), size, cmds))
    return raw, layers, draw(st.integers(0, 2**32))


def _build(d: Path, raw: int | None, layers) -> Path:
    back, fmt = None, None
    if raw is not None:
        back, fmt = d / "base.raw", "raw"
        back.write_bytes(random.Random(raw).randbytes(raw).replace(b"\0", b"\1"))  # no holes
    for i, (opts, size, cmds) in enumerate(layers):
        path = d / f"l{i}.qcow2"
        argv = [factory.QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts]
        if back is not None:
            argv += ["-b", back.name, "-F", fmt]
        factory.run([*argv, path.name, str(size)], cwd=d)
        if cmds:
            argv = [factory.QEMU_IO, "-f", "qcow2"]
            for c in cmds:
                argv += ["-c", c]
            factory.run([*argv, path.name], cwd=d)
        back, fmt = path, "qcow2"
    assert back is not None
    return back


def _at(extents: list[tuple[int, int, tuple]], pos: int) -> tuple:
    """The (depth, present, zero, data) of the extent holding ``pos``."""
    i = bisect.bisect_right([e[0] for e in extents], pos) - 1
    start, length, status = extents[i]
    assert start <= pos < start + length
    return status


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(chains())
def test_block_status_mapper_and_qemu_img_map_agree_on_random_chains(chain):
    raw, layers, seed = chain
    with tempfile.TemporaryDirectory() as tmp:
        top = _build(Path(tmp), raw, layers)
        qemu = [(e["start"], e["length"], (e["depth"], e["present"], e["zero"], e["data"]))
                for e in factory.qemu_img_map(top)]
        rng = random.Random(seed)
        with qcow2kit.open(top) as img:
            mapper = [(e.start, e.length, (e.depth, e.present, e.zero, e.data))
                      for e in iter_extents(img)]
            assert [e[:2] for e in mapper] == [e[:2] for e in qemu]
            for _ in range(20):
                off = rng.randrange(img.size)
                n = rng.choice((1, 512, 4096, 100_000, img.size))
                pos = off
                for s in block_status(img, off, n):
                    assert s.guest == pos and s.length > 0
                    pos += s.length
                    mine = (s.depth, s.layer is not None, s.zero, s.data)
                    for p in (s.guest, s.guest + s.length - 1):
                        assert mine == _at(mapper, p) == _at(qemu, p), (p, s)
                assert pos == min(off + n, img.size)
