"""pytest-benchmark cases: `qemu-img map` vs `qcow2kit map` (and the map_batches scanner) on
scaled-down images built once per module.

Not part of the main test suite (pyproject's testpaths is ["tests"]); run them with

    python -m pytest bench -q                   # benchmarks + builder checks
    python -m pytest bench -q --benchmark-only  # benchmarks only

Benchmarks never assert on time; they do assert that qcow2kit's output is byte-identical to
qemu-img's, and the builder checks assert that the images are what bench/images.py promises.
"""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


from bench import images

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img not found (apt-get install qemu-utils)")

# 1/64 of the full-scale prealloc image (1 TiB), 1/256 of the random one (256 GiB)
SIZES = {"prealloc": 16 * images.GiB, "random": 1 * images.GiB}
KINDS = list(SIZES)
ROUNDS = 5


def _kit_cmd() -> list[str]:
    exe = shutil.which("qcow2kit")
    return [exe] if exe else [sys.executable, "-m", "qcow2kit"]


def _run_map(cmd: list[str], image: Path, out: Path) -> None:
    with open(out, "wb") as f:
        p = subprocess.run([*cmd, "map", "--output=json", str(image)], stdout=f,
                           stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(p.args)} exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace').strip()[-500:]}")


@pytest.fixture(scope="module")
def bench_images(tmp_path_factory):
    """name -> (path, BuildReport) of the scaled-down images; removed after the module."""
    d = tmp_path_factory.mktemp("bench-map")
    built = {
        "prealloc": images.make_prealloc_image(d / "prealloc.qcow2", SIZES["prealloc"]),
        "random": images.make_random_image(d / "random.qcow2", SIZES["random"], seed=1),
    }
    yield {k: (Path(v.path), v) for k, v in built.items()}
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def qemu_outputs(bench_images, tmp_path_factory):
    """name -> file with `qemu-img map --output=json` of that image (the reference)."""
    d = tmp_path_factory.mktemp("bench-map-ref")
    out = {}
    for name, (path, _) in bench_images.items():
        out[name] = d / f"{name}.json"
        _run_map(["qemu-img"], path, out[name])
    return out


@pytest.fixture(scope="module")
def kit_map():
    """The qcow2kit command, or skip while `qcow2kit map` does not exist."""
    cmd = _kit_cmd()
    p = subprocess.run([*cmd, "map", "--help"], capture_output=True)
    if p.returncode != 0:
        pytest.skip("`qcow2kit map` is not available yet")
    return cmd


# -------------------------------------------------------------------- benchmarks

@pytest.mark.parametrize("kind", KINDS)
def test_qemu_img_map(benchmark, bench_images, tmp_path, kind):
    path, rep = bench_images[kind]
    benchmark.group = f"map {kind}"
    benchmark.extra_info.update(size=rep.size, clusters=rep.data_clusters)
    benchmark.pedantic(_run_map, args=(["qemu-img"], path, tmp_path / "out.json"),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("kind", KINDS)
def test_qcow2kit_map(benchmark, bench_images, qemu_outputs, kit_map, tmp_path, kind):
    path, rep = bench_images[kind]
    out = tmp_path / "out.json"
    benchmark.group = f"map {kind}"
    benchmark.extra_info.update(size=rep.size, clusters=rep.data_clusters)
    benchmark.pedantic(_run_map, args=(kit_map, path, out),
                       rounds=ROUNDS, iterations=1, warmup_rounds=1)
    assert filecmp.cmp(out, qemu_outputs[kind], shallow=False), \
        f"qcow2kit map output differs from qemu-img map on the {kind} image"


@pytest.mark.parametrize("kind", KINDS)
def test_api_scan(benchmark, bench_images, kind):
    qcow2kit = pytest.importorskip("qcow2kit")
    mapping = pytest.importorskip("qcow2kit.mapping")
    if not hasattr(mapping, "map_batches"):
        pytest.skip("qcow2kit.mapping.map_batches is not available yet")
    path, rep = bench_images[kind]
    benchmark.group = f"api scan {kind}"

    with qcow2kit.open(path) as img:
        def scan() -> int:
            n = 0
            for batch in mapping.map_batches(img, start=0, length=None, memory=32 << 20):
                n += len(batch)
            return n

        extents = benchmark.pedantic(scan, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(size=rep.size, clusters=rep.data_clusters, extents=extents)
    assert extents > 0


# -------------------------------------------------------------------- builder checks

def test_random_image_is_valid_and_fully_shuffled(bench_images, qemu_outputs):
    path, rep = bench_images["random"]
    rc, _, text = images.qemu_img_check(path)
    assert rc == 0, text
    extents = json.loads(qemu_outputs["random"].read_text())
    n = rep.size // rep.cluster_size
    assert rep.data_clusters == n
    assert sum(e["length"] for e in extents) == rep.size
    assert all(e["present"] and e["data"] for e in extents)
    # a random permutation leaves almost no guest-adjacent pair host-adjacent
    assert len(extents) > 0.99 * n


def test_shuffle_permutes_the_same_clusters(tmp_path):
    size = 64 << 20
    a = images.make_prealloc_image(tmp_path / "a.qcow2", size)
    b = images.make_random_image(tmp_path / "b.qcow2", size, seed=7)
    c = images.make_random_image(tmp_path / "c.qcow2", size, seed=7)
    maps = []
    for rep in (a, b, c):
        fd = images.os.open(rep.path, images.os.O_RDONLY)
        try:
            maps.append(images.data_mapping(fd, images.read_geometry(fd)))
        finally:
            images.os.close(fd)
    (ga, ha), (gb, hb), (gc, hc) = maps
    assert (ga == gb).all() and sorted(ha.tolist()) == sorted(hb.tolist())
    assert not (ha == hb).all()
    assert (hb == hc).all(), "same seed, same image"


@pytest.mark.parametrize("kind", KINDS)
def test_fill_data_pattern(tmp_path, kind):
    size = 32 << 20
    make = images.make_prealloc_image if kind == "prealloc" else images.make_random_image
    rep = make(tmp_path / "f.qcow2", size, fill_data=True)
    rc, _, text = images.qemu_img_check(rep.path)
    assert rc == 0, text
    raw = tmp_path / "f.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", rep.path, str(raw)], check=True)
    try:
        assert raw.read_bytes() == images.pattern(0, size)
    finally:  # not sparse: don't leave them to pytest's retention of old tmp_paths
        raw.unlink()
        Path(rep.path).unlink()
