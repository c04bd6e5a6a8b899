"""`qcow2kit dump`: the decoded fields agree with the file's bytes at the printed offsets (read
here with struct, from the spec's layout) and with what QEMU reports about the same image."""
from __future__ import annotations

import json
import struct

import pytest

from qemu import cli_process, open_args, qemu_img, qemu_img_info, qemu_img_map

pytestmark = pytest.mark.qemu

SECTIONS = ("header", "extensions", "l1", "l2", "refcounts", "snapshots", "bitmaps")


def _dump(path, section, **options):
    """The section as the JSON output has it (the library in this process: the CLI's own
    output is tested on one image below)."""
    from qcow2kit import dump
    from qcow2kit.image import Image
    with Image.open(path, follow_backing=False) as img:
        return json.loads(json.dumps(list(getattr(dump, section)(img, **options))))


def _cli_dump(path, section, *extra):
    p = cli_process("dump", section, "--output=json", *extra, path)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def _at(raw: bytes, rec) -> int | str:
    """The big-endian integer (or hex bytes) at the record's offset, read here."""
    b = raw[rec["offset"]:rec["offset"] + rec["size"]]
    if isinstance(rec["value"], int) and rec["size"] in (1, 2, 4, 8):
        return int.from_bytes(b, "big")
    return b.hex()


def test_every_section_of_every_factory_image(factory_images):
    for name, case in sorted(factory_images.items()):
        raw = case.path.read_bytes()
        for section in SECTIONS:
            out = _dump(case.path, section)
            assert isinstance(out, list), (name, section)
        # every header field is the file's bytes at its offset
        for rec in _dump(case.path, "header"):
            if rec["field"] != "backing_file_name":
                assert _at(raw, rec) == rec["value"], (name, rec)
        for ext in _dump(case.path, "extensions"):
            for rec in ext["fields"]:
                if isinstance(rec["value"], int):
                    assert _at(raw, rec) == rec["value"], (name, rec)


def test_header_against_the_spec_offsets_and_qemu(factory_images):
    for name, case in sorted(factory_images.items()):
        raw = case.path.read_bytes()
        hdr = {r["field"]: r["value"] for r in _dump(case.path, "header")}
        assert hdr["magic"] == "514649fb"
        assert hdr["version"] == struct.unpack_from(">I", raw, 4)[0]
        assert hdr["size"] == struct.unpack_from(">Q", raw, 24)[0]
        assert hdr["l1_table_offset"] == struct.unpack_from(">Q", raw, 40)[0]
        info = qemu_img_info(case)
        assert hdr["size"] == info["virtual-size"], name
        assert 1 << hdr["cluster_bits"] == info["cluster-size"], name


def test_l2_entries_are_qemu_img_map_s_data(factory_images):
    checked = 0
    for name, case in sorted(factory_images.items()):
        if case.encrypted or "data_file" in case.tags:
            continue
        ours = {}
        for table in _dump(case.path, "l2"):
            for e in table["entries"]:
                if "data" in e["kind"].split() and not e["compressed"]:
                    ours[e["guest_offset"]] = e["host_offset"]
        info = qemu_img_info(case)
        cs = info["cluster-size"]
        # (the VM state of a snapshot lies beyond the virtual size: in L2, not in map)
        ours = {g: h for g, h in ours.items() if g < info["virtual-size"]}
        step = cs // 32 if "extended_l2" in case.tags else cs
        theirs = {}
        for m in qemu_img_map(case):
            if m["depth"] == 0 and m["data"] and "offset" in m and not m.get("compressed"):
                for p in range(m["start"], m["start"] + m["length"], step):
                    g = p // cs * cs
                    theirs[g] = m["offset"] + (p - m["start"]) - (p - g)
        if "extended_l2" in case.tags:
            # a cluster with some subclusters allocated is in L2 but partly in map
            assert all(ours.get(g) == h for g, h in theirs.items()), name
            continue
        assert ours == theirs, name
        checked += bool(ours)
    assert checked >= 10


def test_refcounts_end_where_qemu_check_says_the_image_ends(factory_images):
    for name, case in sorted(factory_images.items()):
        check = qemu_img("check", "--output=json", *open_args(case), ok=None,
                         cwd=case.path.parent)
        report = json.loads(check.stdout) if check.stdout.strip() else {}
        if "image-end-offset" not in report or report.get("leaks") or report.get("corruptions"):
            continue
        cs = qemu_img_info(case)["cluster-size"]
        last = max(r["first_cluster"] + r["count"]
                   for t in _dump(case.path, "refcounts") for r in t["runs"])
        assert last * cs == report["image-end-offset"], name


def test_snapshots_and_bitmaps_as_qemu_lists_them(factory_images):
    seen = {"snapshots": 0, "bitmaps": 0}
    for name, case in sorted(factory_images.items()):
        info = qemu_img_info(case)
        snaps = _dump(case.path, "snapshots")
        names = [next(r["value"] for r in s["fields"] if r["field"] == "name") for s in snaps]
        assert names == [s["name"] for s in info.get("snapshots", [])], name
        seen["snapshots"] += bool(snaps)
        bms = _dump(case.path, "bitmaps")
        qb = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
        got = [(next(r["value"] for r in b["fields"] if r["field"] == "name"),
                1 << next(r["value"] for r in b["fields"] if r["field"] == "granularity_bits"))
               for b in bms]
        assert got == [(b["name"], b["granularity"]) for b in qb], name
        seen["bitmaps"] += bool(bms)
    assert seen["snapshots"] >= 3 and seen["bitmaps"] >= 2


def test_human_output_and_errors(factory_images, tmp_path):
    case = next(c for c in factory_images.values() if c.snapshots)
    p = cli_process("dump", "snapshots", case.path)
    assert p.returncode == 0 and "snapshot 0 at 0x" in p.stdout
    p = cli_process("dump", "header", case.path)
    assert p.stdout.splitlines()[1].split()[:3] == ["0x000000000000", "4", "magic"]
    bad = cli_process("dump", "l3", case.path)
    assert bad.returncode == 1 and "invalid choice: 'l3'" in bad.stderr
    wrong = cli_process("dump", "l1", "--l1-index", "0", case.path)
    assert wrong.returncode == 1 and "--l1-index is for the l2 section" in wrong.stderr
    missing = cli_process("dump", "header", tmp_path / "nope.qcow2")
    assert missing.returncode == 1 and "nope.qcow2" in missing.stderr
    one = _cli_dump(case.path, "l2", "--l1-index", "0")
    assert one and all(t["l1_index"] == 0 for t in one)
    for section in SECTIONS:
        assert _cli_dump(case.path, section) == _dump(case.path, section)
