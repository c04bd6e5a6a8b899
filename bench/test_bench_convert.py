"""A quick run of bench/convert_bench.py (issue 9) on a 16 MiB image: the report's structure and
the checks it makes of the outputs.  Timings are never asserted.

Not part of the main test suite (pyproject's testpaths is ["tests"]); run it with

    python -m pytest bench/test_bench_convert.py -q          # about 15 s

It runs with --warm (the page cache is left alone), except the model part, whose `bench order
--drop-caches` drops it once when running as root.
"""
from __future__ import annotations

import json
import shutil

import pytest

from bench import convert_bench as cb
from bench import order_bench as ob

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None or shutil.which("strace") is None,
                                reason="needs qemu-img (qemu-utils) and strace")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    kit = ob.kit_command(None)
    ok, detail = ob.available([*kit, "convert"])
    if not ok:
        pytest.skip(f"`qcow2kit convert` is not available: {detail}")
    d = tmp_path_factory.mktemp("bench-convert")
    out, md = d / "conv.json", d / "conv.md"
    rc = cb.main(["--scale", "1/256", "-n", "1", "--threads", "1,8", "--warm", "--workdir",
                  str(d), "--json", str(out), "--markdown", str(md), "--quiet"])
    rep = json.loads(out.read_text())
    rep["_rc"], rep["_md"] = rc, md.read_text()
    rep["_left"] = [p.name for p in d.iterdir() if p.name.startswith("qcow2kit-convert-")]
    return rep


def test_report_structure(report):
    assert report["_rc"] == 0 and report["failed"] is False
    assert set(report["results"]) == set(cb.PARTS)
    assert report["image"]["size"] == 16 << 20
    assert report["_left"] == []                       # the work directory is removed
    for part in ("raw", "qcow2"):
        x = report["results"][part]
        if part == "qcow2" and x["status"] != "measured":
            assert x["status"] == "not available" and "pending" in report["_md"]
            continue
        assert set(x["summary"]) == {"qemu-img", "qcow2kit", "dd"}
        assert all(s["runs"] == 1 and s["failed"] == 0 for s in x["summary"].values())
        assert set(x["ratios"]) == {"qcow2kit/qemu-img", "qcow2kit/dd", "qemu-img/dd"}
    assert [r["m"] for r in report["results"]["threads"]["rows"]] == [1, 8]
    for heading in ("convert -O raw", "convert -O qcow2", "`-m N`", "Modelled rotating-disk",
                    "really issues"):
        assert heading in report["_md"]


def test_outputs_equal_qemu_img(report):
    raw = report["results"]["raw"]
    assert raw["identical"]["same"] and raw["compare"]["equal"] and raw["pattern_ok"]
    assert all(all(r["identical"].values()) for r in report["results"]["threads"]["rows"])
    q = report["results"]["qcow2"]
    if q["status"] == "measured":
        for v in q["verify"].values():
            assert v["compare"]["equal"]
            assert v["check"]["exit"] == 0 and v["check"]["clean"]
        assert q["verify"]["qcow2kit"]["check"]["fragmented_pct"] == 0.0


def test_model_and_trace(report):
    m = report["results"]["model"]
    assert m["host"]["bytes"] == m["guest"]["bytes"] == 16 << 20
    assert m["host"]["model_seconds"] < m["guest"]["model_seconds"] / 5
    t = report["results"]["trace"]["tools"]
    host, guest, one = (t["qcow2kit (host order)"], t["qcow2kit --order=guest"],
                        t["qcow2kit -m 1 (host order)"])
    # every data byte read once (metadata reads add a little)
    for x in (host, guest, one, t["qemu-img"]):
        assert 16 << 20 <= x["bytes"] < (16 << 20) + (1 << 20)
    # the reads convert issues (one reader: no races) cost what bench order models for the
    # same order, plus a few small metadata reads
    assert one["reads"] >= m["host"]["requests"] >= one["reads_of_1MiB"]
    for traced, modelled in ((one, m["host"]), (guest, m["guest"])):
        assert abs(traced["model_seconds"] - modelled["model_seconds"]) <= (
            0.05 * modelled["model_seconds"] + 0.01)
    assert one["model_seconds"] < guest["model_seconds"] / 5
    assert host["model_seconds_sorted"] <= host["model_seconds"]
