"""pytest-benchmark cases for read order (issue 4): `qcow2kit bench order`, and `convert -O raw`
in host order, in guest order and by qemu-img, on a 256 MiB image of 64 KiB clusters in random
host order with data in every cluster; plus checks of order_bench.py's map-output analysis and a
scaled-down run of the whole script.

Not part of the main test suite (pyproject's testpaths is ["tests"]); run them with

    python -m pytest bench/test_bench_order.py -q
    python -m pytest bench/test_bench_order.py -q --benchmark-only   # benchmarks only

Timings are never asserted.  The convert benchmarks drop the page cache before every round when
running as root (extra_info["cache"] says which), so they time cold reads as order_bench.py does.
"""
from __future__ import annotations

import filecmp
import json
import shutil
import subprocess
from pathlib import Path

import pytest


from bench import images
from bench import order_bench

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None,
                                reason="qemu-img not found (apt-get install qemu-utils)")

SIZE = 256 << 20
CLUSTERS = SIZE // 65536
ROUNDS = 3


def _kit() -> list[str]:
    return order_bench.kit_command(None)


def _run(cmd: list[str], stdout=subprocess.DEVNULL) -> None:
    p = subprocess.run(cmd, stdout=stdout, stderr=subprocess.PIPE)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {p.returncode}: "
                           f"{p.stderr.decode(errors='replace').strip()[-500:]}")


@pytest.fixture(scope="module")
def kit():
    cmd = _kit()
    for sub in (["bench", "order"], ["convert"], ["map"]):
        ok, detail = order_bench.available([*cmd, *sub])
        if not ok:
            pytest.skip(f"`qcow2kit {' '.join(sub)}` is not available: {detail}")
    return cmd


@pytest.fixture(scope="module")
def filled(tmp_path_factory):
    """The 256 MiB random image with the pattern in every cluster; removed after the module."""
    d = tmp_path_factory.mktemp("bench-order")
    rep = images.make_random_image(d / "filled.qcow2", SIZE, seed=1, fill_data=True)
    yield Path(rep.path), rep
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def reference_raw(filled, tmp_path_factory):
    """qemu-img convert's output (the oracle); removed after the module (it is not sparse)."""
    out = tmp_path_factory.mktemp("bench-order-ref") / "ref.raw"
    _run(["qemu-img", "convert", "-O", "raw", str(filled[0]), str(out)])
    assert order_bench.spot_check_pattern(out, SIZE)
    yield out
    out.unlink(missing_ok=True)


# -------------------------------------------------------------------- benchmarks

def test_bench_order_json(benchmark, filled, kit, tmp_path):
    path, rep = filled
    out = tmp_path / "order.json"

    def bench() -> dict:
        with open(out, "wb") as f:
            _run([*kit, "bench", "order", "--output=json", str(path)], stdout=f)
        return json.loads(out.read_text())

    benchmark.group = "bench order 256 MiB"
    res = benchmark.pedantic(bench, rounds=ROUNDS, iterations=1, warmup_rounds=0)
    g, h = res["guest"], res["host"]
    bound = res["sequential_bound_seconds"]
    benchmark.extra_info.update(guest_model_s=g["model_seconds"], host_model_s=h["model_seconds"],
                                bound_s=bound, guest_measured_s=g["measured_seconds"],
                                host_measured_s=h["measured_seconds"], cache=res["cache"])
    assert g["bytes"] == h["bytes"] == SIZE
    assert g["requests"] > 0.99 * CLUSTERS           # random order: about one read per cluster
    assert h["requests"] == SIZE // (1 << 20)        # host order: the data in 1 MiB reads
    assert bound <= h["model_seconds"] < g["model_seconds"] / 10
    # the first request's fixed cost (overhead + half a turn, 4.27 ms) is ~0.4% of the bound here
    assert h["model_seconds"] <= 1.01 * bound


def _drop() -> str:
    return "cold" if order_bench.drop_caches() == "dropped" else "warm"


@pytest.mark.parametrize("tool", order_bench.CONVERT_TOOLS)
def test_convert(benchmark, filled, reference_raw, kit, tmp_path, tool):
    path, rep = filled
    out = tmp_path / "out.raw"
    cmd = {"qemu-img": ["qemu-img", "convert", "-O", "raw"],
           "qcow2kit-host": [*kit, "convert", "-O", "raw"],
           "qcow2kit-guest": [*kit, "convert", "--order=guest", "-O", "raw"]}[tool]
    cache = set()

    def setup():
        out.unlink(missing_ok=True)
        cache.add(_drop())

    benchmark.group = "convert -O raw 256 MiB"
    benchmark.pedantic(_run, args=([*cmd, str(path), str(out)],), setup=setup, rounds=ROUNDS,
                       iterations=1, warmup_rounds=0)
    benchmark.extra_info.update(cache=",".join(sorted(cache)), size=SIZE)
    try:
        assert filecmp.cmp(out, reference_raw, shallow=False), f"{tool} output differs"
    finally:
        out.unlink(missing_ok=True)


# -------------------------------------------------------------------- checks of order_bench

def test_analyze_map_output_is_order_independent(tmp_path):
    lines = [b'{ "start": %d, "length": 65536, "depth": 0, "present": true, "zero": false, '
             b'"data": true, "offset": %d}' % (i * 65536, o)
             for i, o in enumerate([5 << 16, 2 << 16, 9 << 16, 3 << 16])]

    def write(name: str, ls: list[bytes]) -> Path:
        p = tmp_path / name
        p.write_bytes(b"[" + b",\n".join(ls) + b"]\n")
        return p

    guest = order_bench.analyze_map_output(write("g.json", lines))
    host = order_bench.analyze_map_output(write("h.json", sorted(lines, key=lambda x: int(
        x.rsplit(b" ", 1)[1].rstrip(b"}")))))
    other = order_bench.analyze_map_output(write("o.json", lines[:3] + [lines[0]]))
    assert guest["lines"] == host["lines"] == 4 and guest["total_length"] == 4 * 65536
    assert guest["multiset"] == host["multiset"] != other["multiset"]
    assert host["sorted_by_offset"] and not guest["sorted_by_offset"]
    assert guest["sha256"] != host["sha256"]
    # a small chunk size splits lines across reads: same figures
    assert order_bench.analyze_map_output(tmp_path / "g.json", chunk=7) == guest


def test_map_host_order_matches_qemu_img(kit, tmp_path):
    """On a 1 GiB random image, qcow2kit map --order=host holds qemu-img map's extents, sorted."""
    rep = images.make_random_image(tmp_path / "r.qcow2", 1 << 30, seed=3)
    q, k = tmp_path / "q.json", tmp_path / "k.json"
    with open(q, "wb") as f:
        _run(["qemu-img", "map", "--output=json", rep.path], stdout=f)
    with open(k, "wb") as f:
        _run([*kit, "map", "--order=host", "--memory=64M", "--output=json", rep.path], stdout=f)
    qa, ka = order_bench.analyze_map_output(q), order_bench.analyze_map_output(k)
    assert qa["lines"] > 0.99 * (1 << 30) // 65536
    assert qa["multiset"] == ka["multiset"] and qa["total_length"] == 1 << 30
    assert ka["sorted_by_offset"] and not qa["sorted_by_offset"]


def test_order_bench_script_small(kit, tmp_path):
    """The whole script at scale 1/256 (16 MiB filled, 1 GiB random), one run of everything."""
    out = tmp_path / "order.json"
    rc = order_bench.main(["--scale", "1/256", "--repeat", "1", "--workdir", str(tmp_path),
                           "--json", str(out), "--plot", str(tmp_path / "p.png"), "--quiet"])
    assert rc == 0
    rep = json.loads(out.read_text())
    assert set(rep["results"]) == {"model", "map", "convert"}
    assert rep["results"]["map"]["complete"] and rep["results"]["map"]["sorted"]
    assert all(v["same"] for v in rep["results"]["convert"]["identical"].values())
    assert (tmp_path / "p.png").stat().st_size > 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("qcow2kit-order-")] == []
