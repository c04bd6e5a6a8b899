"""``convert -O qcow2`` (and ``-n`` for raw) on the block-copy engine, against qemu-img.

Every factory image converted to qcow2 (plain, compressed, version 2, with -B, into an
empty image with -n) must
``qemu-img compare`` equal to its source, pass ``qemu-img check`` without leaks, and,
uncompressed, be unfragmented; its allocation (qemu-img map: data/zero/depth) must be
qemu-img convert's own.  The command's errors are qemu-img's, a failed run leaves no
file, a SIGKILL at any moment leaves an image qemu-img check does not call corrupt,
and I/O errors, a full disk and discards behave as the engine promises.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from qcow2kit.blockcopy import CopyJob, read_source
from qcow2kit.blockcopy.qcow2target import Qcow2Target, reserve_data
from qcow2kit.builder import ImageBuilder
from qcow2kit.convert import convert_to_qcow2
from qcow2kit.errors import CopyIncompleteError
from qcow2kit.image import Image

from qemu import QEMU_IMG, cli_process, nbdfuse_served, qemu_img_map, run, same_file
from test_blockcopy import _write_image, needs_fuse

KiB, MiB = 1024, 1024 * 1024

pytestmark = pytest.mark.qemu


def _check(path: Path) -> tuple[int, dict]:
    p = subprocess.run([QEMU_IMG, "check", "--output=json", str(path)], capture_output=True,
                       text=True, cwd=path.parent)
    return p.returncode, (json.loads(p.stdout) if p.stdout.strip() else {})


def _compare(a: Path, b: Path) -> int:
    return subprocess.run([QEMU_IMG, "compare", str(a), str(b)], capture_output=True,
                          cwd=a.parent).returncode


def _alloc(path: Path) -> list[tuple[int, int, bool, bool, int]]:
    """qemu-img map without host offsets: (start, length, data, zero, depth), merged."""
    out: list[tuple[int, int, bool, bool, int]] = []
    for e in qemu_img_map(path):
        key = (e["data"], e["zero"], e.get("depth", 0))
        if out and out[-1][2:] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], *key)
        else:
            out.append((e["start"], e["length"], *key))
    return out


VARIANTS = {
    "plain": ([], False),
    "compressed": ([], True),
    "v2": (["-o", "compat=0.10"], False),
    "existing": (["-n"], False),       # into an empty image qemu-img create made
}


# ============================================================================ every image

@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_factory_image_to_qcow2(factory_images, tmp_path, variant):
    opts, compress = VARIANTS[variant]
    existing = opts == ["-n"]
    options = [opts[1]] if opts and not existing else []
    failures = {}
    for i, (name, case) in enumerate(sorted(factory_images.items())):
        if case.encrypted:
            continue
        ours, ref = tmp_path / f"{name}.qcow2", tmp_path / f"{name}.ref.qcow2"
        with Image.open(case.path) as img:
            if existing:
                for p in (ours, ref):
                    run([QEMU_IMG, "create", "-q", "-f", "qcow2", p, str(img.size)])
            res = convert_to_qcow2(img, ours, options=options, compress=compress,
                                   workers=1 + i % 8, existing=existing)
        run([QEMU_IMG, "convert", "-O", "qcow2", *opts, *(["-c"] if compress else []),
             case.path, ref], cwd=case.path.parent)
        rc, chk = _check(ours)
        if not res.complete:
            failures[name] = ("result", res)
        elif _compare(case.path, ours) != 0:
            failures[name] = "content differs"
        elif rc != 0 or chk.get("leaks", 0) or chk.get("corruptions", 0):
            failures[name] = ("check", rc, chk)
        elif not compress and chk.get("fragmented-clusters", 0):
            failures[name] = ("fragmented", chk)
        elif variant in ("plain", "existing") and _alloc(ours) != _alloc(ref):
            failures[name] = ("allocation", _alloc(ours), _alloc(ref))
        if name not in failures:
            ours.unlink()
            ref.unlink()
    assert not failures


def test_every_backed_factory_image_with_B(factory_images, tmp_path):
    """-B with the source's own backing file: the same allocation as qemu-img's -B."""
    failures = {}
    done = 0
    for name, case in sorted(factory_images.items()):
        if case.encrypted or not case.backing_chain or case.data_file is not None:
            continue
        base = case.backing_chain[0].resolve()
        fmt = "qcow2" if base.read_bytes()[:4] == b"QFI\xfb" else "raw"
        ours, ref = tmp_path / f"{name}.qcow2", tmp_path / f"{name}.ref.qcow2"
        r = cli_process("convert", "-O", "qcow2", "-B", str(base), "-F", fmt,
                        str(case.path), str(ours))
        run([QEMU_IMG, "convert", "-O", "qcow2", "-B", str(base), "-F", fmt, case.path, ref],
            cwd=case.path.parent)
        rc, chk = _check(ours)
        if r.returncode != 0:
            failures[name] = ("exit", r.stderr)
        elif _compare(case.path, ours) != 0:
            failures[name] = "content differs"
        elif rc != 0 or chk.get("leaks", 0):
            failures[name] = ("check", rc, chk)
        elif _alloc(ours) != _alloc(ref):
            failures[name] = ("allocation", _alloc(ours), _alloc(ref))
        done += 1
    assert done >= 2 and not failures


def test_B_on_a_standalone_image_and_a_short_backing_file(tmp_path):
    """Ranges the source leaves unallocated read zeros: zero clusters over a backing file
    that has data there, nothing beyond the end of a shorter one (qemu-img's rules)."""
    _write_image(tmp_path, "base.qcow2", "8M", "write -P 1 0 8M")
    src = _write_image(tmp_path, "src.qcow2", "16M", "write -P 2 1M 1M", "write -P 0 12M 64k",
                       "write -z 13M 1M", "write -P 3 15M 4k")
    for extra in ([], ["-o", "compat=0.10"], ["-c"], ["-o", "cluster_size=4k"]):
        ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
        for p in (ours, ref):
            p.unlink(missing_ok=True)
        r = cli_process("convert", "-O", "qcow2", *extra, "-B", "base.qcow2", "-F", "qcow2",
                        str(src), str(ours))
        assert r.returncode == 0, r.stderr
        run([QEMU_IMG, "convert", "-O", "qcow2", *extra, "-B", "base.qcow2", "-F", "qcow2",
             src, ref])
        assert _compare(src, ours) == 0
        assert _check(ours)[0] == 0
        if "compat=0.10" not in extra:
            assert _alloc(ours) == _alloc(ref), extra


# ============================================================================ layout

def test_fragmented_source_gives_an_unfragmented_copy_read_in_host_order(tmp_path):
    cmds = [f"write -P {i % 200 + 1} {off}k 64k" for i, off in
            enumerate(random.Random(5).sample(range(0, 32768, 64), 400))]
    src = _write_image(tmp_path, "src.qcow2", "32M", *cmds)
    assert _check(src)[1]["fragmented-clusters"] > 100
    dst = tmp_path / "dst.qcow2"
    offsets = []
    with Image.open(src) as img:
        source = read_source(img, "host", max_chunk=64 * KiB)
        source.start()
        real = source._read

        def spy(spec):            # the order the source is read in
            offsets.append(spec.host)
            return real(spec)
        source._read = spy
        with ImageBuilder(dst, img.size, cache="unsafe") as b:
            target = Qcow2Target(b)
            job = CopyJob(source, target, workers=4)
            reserve_data(b, [(0, img.size)])
            res = job.run()
            target.finish()
    assert res.complete and offsets == sorted(offsets)
    rc, chk = _check(dst)
    assert rc == 0 and chk.get("fragmented-clusters", 0) == 0 and chk["allocated-clusters"] == 512
    assert _compare(src, dst) == 0
    # guest order in the file: each data cluster's host offset grows with its guest offset
    hosts = [e["offset"] for e in qemu_img_map(dst) if e["data"]]
    assert hosts == sorted(hosts)


@pytest.mark.parametrize("sparse", ["0", "4k", "64k", "1M"])
def test_sparse_size_like_qemu(tmp_path, sparse):
    src = _write_image(tmp_path, "src.qcow2", "8M", "write -P 1 0 64k", "write -P 0 64k 64k",
                       "write -P 2 128k 4k", "write -P 0 1M 1M", "write -P 3 2M 64k",
                       "write -z 3M 1M")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    assert cli_process("convert", "-O", "qcow2", "-S", sparse, str(src), str(ours)).returncode == 0
    run([QEMU_IMG, "convert", "-O", "qcow2", "-S", sparse, src, ref])
    assert _compare(src, ours) == 0 and _check(ours)[0] == 0
    # data where qemu-img has data; our all-zero clusters are allocated zero clusters
    want = [(s, n) for s, n, data, zero, _ in _alloc(ref) if data]
    got = [(s, n) for s, n, data, zero, _ in _alloc(ours) if data]
    assert got == want


# ============================================================================ the command

@pytest.mark.parametrize("argv", [
    ["-O", "qcow3", "SRC", "DST"],
    ["-c", "SRC", "DST"],
    ["-O", "qcow2", "-B", "base", "SRC", "DST"],
    ["-B", "base", "-F", "qcow2", "SRC", "DST"],
    ["-O", "qcow2", "SRC"],
    ["-n", "-o", "cluster_size=4k", "SRC", "DST"],
    ["-O", "qcow2", "-o", "cluster_size=3k", "SRC", "DST"],
    ["-O", "qcow2", "-o", "foo=bar", "SRC", "DST"],
    ["-O", "qcow2", "-o", "compat=2", "SRC", "DST"],
    ["-O", "qcow2", "SRC", "NODIR/DST"],
    ["-n", "SRC", "MISSING"],
])
def test_errors_are_qemu_imgs(tmp_path, argv):
    src = _write_image(tmp_path, "src.qcow2", "4M", "write -P 1 0 1M")
    names = {"SRC": str(src), "DST": str(tmp_path / "dst"), "MISSING": str(tmp_path / "no"),
             "NODIR/DST": str(tmp_path / "nodir" / "dst")}
    args = [names.get(a, a) for a in argv]
    before = sorted(os.listdir(tmp_path))
    ours = cli_process("convert", *args)
    theirs = subprocess.run([QEMU_IMG, "convert", *args], capture_output=True, text=True)
    assert ours.returncode == theirs.returncode == 1
    assert ours.stdout == "" and ours.stderr.count("\n") == 1
    assert ours.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1].splitlines()[0] + "\n"
    for p in tmp_path.iterdir():            # qemu-img's leftovers do not count
        if p.name not in before:
            p.unlink()


def test_options_help_is_qemu_imgs():
    ours = cli_process("convert", "-O", "qcow2", "-o", "help")
    assert ours.returncode == 0 and ours.stdout.startswith("Supported qcow2 options:\n")
    assert "cluster_size=<size>" in ours.stdout


def test_a_failed_conversion_leaves_nothing(tmp_path):
    src = _write_image(tmp_path, "src.qcow2", "4M", "write -P 1 0 1M")
    dst = tmp_path / "dst.qcow2"
    r = cli_process("convert", "-O", "qcow2", "-B", "nobase.qcow2", "-F", "qcow2", str(src), str(dst))
    assert r.returncode == 1 and "nobase.qcow2" in r.stderr and not dst.exists()
    r = cli_process("convert", "-O", "qcow2", str(src), str(src))
    assert r.returncode == 1 and "it is the source image" in r.stderr
    assert _check(src)[0] == 0
    r = cli_process("convert", "-O", "qcow2", "-o", f"data_file={src}", str(src), str(dst))
    assert r.returncode == 1 and "it is the source image" in r.stderr and not dst.exists()
    assert _check(src)[0] == 0


def test_data_file_and_zstd_outputs(tmp_path):
    src = _write_image(tmp_path, "src.qcow2", "8M", "write -P 1 0 3M", "write -P 2 5M 100k")
    for opts in (["-o", f"data_file={tmp_path / 'd.raw'}"], ["-c", "-o", "compression_type=zstd"],
                 ["-o", "refcount_bits=1,cluster_size=512"], ["-o", "extended_l2=on"]):
        dst = tmp_path / "dst.qcow2"
        r = cli_process("convert", "-O", "qcow2", *opts, str(src), str(dst))
        assert r.returncode == 0, r.stderr
        assert _compare(src, dst) == 0 and _check(dst)[0] == 0, opts
        dst.unlink()


# ============================================================================ -n (raw)

def test_existing_raw_target_like_qemu(tmp_path):
    src = _write_image(tmp_path, "src.qcow2", "8M", "write -P 1 0 1M", "write -z 2M 1M",
                       "write -P 0 4M 64k", "write -P 5 7M 4k")
    garbage = random.Random(1).randbytes(10 * MiB)
    ours, ref = tmp_path / "ours.raw", tmp_path / "ref.raw"
    ours.write_bytes(garbage)
    ref.write_bytes(garbage)
    assert cli_process("convert", "-n", str(src), str(ours)).returncode == 0
    run([QEMU_IMG, "convert", "-n", src, ref])
    assert same_file(ours, ref) and ours.stat().st_size == 10 * MiB
    small = tmp_path / "small.raw"
    small.write_bytes(b"x" * MiB)
    r = cli_process("convert", "-n", str(src), str(small))
    assert r.returncode == 1 and "output file is smaller than input file" in r.stderr
    assert small.read_bytes() == b"x" * MiB


# ============================================================================ crashes

def test_sigkill_at_any_moment_leaves_a_valid_image(tmp_path):
    """Stopped after each ordered step of the builder, and killed at random times: qemu-img
    check never finds corruption (leaks allowed), and finished runs compare equal."""
    cmds = [f"write -P {i % 200 + 1} {off}k 64k" for i, off in
            enumerate(random.Random(9).sample(range(0, 65536, 64), 600))]
    src = _write_image(tmp_path, "src.qcow2", "64M", *cmds)
    env_base = dict(os.environ)
    checked = 0
    for step in range(1, 8):
        dst = tmp_path / f"s{step}.qcow2"
        env = dict(env_base, QCOW2KIT_WRITER_STOP_AT=str(step))
        p = subprocess.Popen(["python", "-m", "qcow2kit", "convert", "-O", "qcow2", "-m", "4",
                              str(src), str(dst)], env=env, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        stopped = False
        while time.monotonic() < deadline and p.poll() is None:
            with open(f"/proc/{p.pid}/stat") as f:
                if f.read().split(") ")[1].split()[0] == "T":
                    stopped = True
                    break
            time.sleep(0.01)
        if stopped:
            p.send_signal(signal.SIGKILL)
        p.wait()
        if not dst.exists():
            continue
        rc, chk = _check(dst)
        assert rc in (0, 3), (step, chk)
        if not stopped:
            assert p.returncode == 0 and _compare(src, dst) == 0
        checked += 1
    rng = random.Random(11)
    for k in range(6):
        dst = tmp_path / f"r{k}.qcow2"
        p = subprocess.Popen(["python", "-m", "qcow2kit", "convert", "-O", "qcow2", str(src),
                              str(dst)], env=env_base)
        time.sleep(rng.uniform(0.3, 1.5))
        p.kill()
        p.wait()
        if dst.exists():
            assert _check(dst)[0] in (0, 3)
            checked += 1
    assert checked >= 8


# ============================================================================ faults

@needs_fuse
def test_io_errors_with_a_qcow2_target(tmp_path):
    cmds = [f"write -P {i + 1} {off}k 64k" for i, off in
            enumerate(random.Random(3).sample(range(0, 8192, 64), 80))]
    img = _write_image(tmp_path, "src.qcow2", "8M", *cmds)
    extents = [e for e in qemu_img_map(img) if e["data"]]
    victim = extents[len(extents) // 2]
    host, guest = victim["offset"], victim["start"]
    mapfile = tmp_path / "bad.map"
    mapfile.write_text("# Rescue Logfile\n0x00000000 + 1\n"
                       f"0x00000000 {host:#010x} +\n{host:#010x} 0x00010000 -\n"
                       f"{host + 64 * KiB:#010x} 0x10000000 +\n")
    with nbdfuse_served(tmp_path, img, "--filter=ddrescue", f"ddrescue-mapfile={mapfile}") as src:
        dst = tmp_path / "out.qcow2"
        with Image.open(src) as opened, pytest.raises(CopyIncompleteError) as caught:
            convert_to_qcow2(opened, dst, backoff=0.001)
    assert [(f.offset, f.length) for f in caught.value.failed] == [(guest, 64 * KiB)]
    rc, chk = _check(dst)
    assert rc == 0 and not chk.get("leaks")
    ref = tmp_path / "ref.raw"
    run([QEMU_IMG, "convert", "-O", "raw", img, ref])
    want = bytearray(ref.read_bytes())
    want[guest:guest + 64 * KiB] = bytes(64 * KiB)
    got = tmp_path / "got.raw"
    run([QEMU_IMG, "convert", "-O", "raw", dst, got])
    assert got.read_bytes() == want


def test_qcow2_target_runs_out_of_space(tmp_path, small_tmpfs):
    img = _write_image(tmp_path, "big.qcow2", "32M", "write -P 0x5a 0 20M")
    dst = small_tmpfs / "out.qcow2"
    r = cli_process("convert", "-O", "qcow2", str(img), str(dst))
    assert r.returncode == 1 and r.stdout == "" and r.stderr.count("\n") == 1
    assert "No space left on device" in r.stderr
    assert not dst.exists()                      # ours, so removed
    kept = small_tmpfs / "kept.qcow2"
    with Image.open(img) as opened, ImageBuilder(kept, opened.size, cache="unsafe") as b:
        source = read_source(opened, "host")
        source.start()
        target = Qcow2Target(b)
        reserve_data(b, [(0, opened.size)])
        res = CopyJob(source, target, backoff=0.001).run()
        assert res.stopped is not None and "No space left" in str(res.stopped)
    assert _check(kept)[0] in (0, 3)             # a partial image, never a corrupt one


def test_discard_while_copying_to_qcow2(tmp_path):
    cmds = [f"write -P {i + 1} {off}k 64k" for i, off in
            enumerate(random.Random(3).sample(range(0, 8192, 64), 100))]
    img = _write_image(tmp_path, "src.qcow2", "8M", *cmds)
    ref = tmp_path / "ref.raw"
    run([QEMU_IMG, "convert", "-O", "raw", img, ref])
    discards = [(0, 1 * MiB), (5 * MiB + 1000, 70000), (6 * MiB, 2 * MiB - 4096)]
    for compress in (False,):
        dst = tmp_path / f"out{compress}.qcow2"
        started = threading.Event()
        with Image.open(img) as opened, ImageBuilder(dst, opened.size, cache="unsafe") as b:
            source = read_source(opened, "host", max_chunk=64 * KiB)
            source.start()
            target = Qcow2Target(b, compress=compress)
            if not compress:
                reserve_data(b, [(0, opened.size)])
            job = CopyJob(source, target, workers=2, rate_limit=4 * MiB,
                          progress=lambda d, t: started.set())

            def discarder() -> None:
                started.wait(30)
                for off, n in discards:
                    job.discard(off, n)
            th = threading.Thread(target=discarder)
            th.start()
            res = job.run()
            th.join()
            target.finish()
        assert res.complete
        want = bytearray(ref.read_bytes())
        for off, n in discards:
            want[off:off + n] = bytes(n)
        got = tmp_path / "got.raw"
        run([QEMU_IMG, "convert", "-O", "raw", dst, got])
        assert got.read_bytes() == want and _check(dst)[0] == 0


# ============================================================================ -n (qcow2)

@pytest.mark.parametrize("opts", ["compat=1.1", "compat=0.10", "cluster_size=4k,lazy_refcounts=on",
                                  "extended_l2=on"])
def test_existing_empty_qcow2_target_like_qemu(tmp_path, opts):
    src = _write_image(tmp_path, "src.qcow2", "8M", "write -P 1 0 1M", "write -z 2M 1M",
                       "write -P 7 3M 4k", "write -P 5 7M 64k")
    ours, ref = tmp_path / "ours.qcow2", tmp_path / "ref.qcow2"
    for p in (ours, ref):
        run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o", opts, p, "10M"])
    r = cli_process("convert", "-n", "-O", "qcow2", str(src), str(ours))
    assert r.returncode == 0, r.stderr
    run([QEMU_IMG, "convert", "-n", "-O", "qcow2", src, ref])
    assert _compare(src, ours) == 0 and _check(ours)[0] == 0
    assert qemu_img_map(ours)[-1]["start"] + qemu_img_map(ours)[-1]["length"] == 10 * MiB
    if "extended_l2" not in opts:      # zero clusters where qemu-img writes them
        assert _alloc(ours) == _alloc(ref)


def test_existing_qcow2_target_with_data_is_refused_untouched(tmp_path):
    src = _write_image(tmp_path, "src.qcow2", "4M", "write -P 1 0 1M")
    used = _write_image(tmp_path, "used.qcow2", "4M", "write -P 2 0 64k")
    before = used.read_bytes()
    r = cli_process("convert", "-n", "-O", "qcow2", str(src), str(used))
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "only an empty image" in r.stderr and used.read_bytes() == before
    small = tmp_path / "small.qcow2"
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", small, "2M"])
    before = small.read_bytes()
    r = cli_process("convert", "-n", "-O", "qcow2", str(src), str(small))
    theirs = subprocess.run([QEMU_IMG, "convert", "-n", "-O", "qcow2", str(src), str(small)],
                            capture_output=True, text=True)
    assert r.returncode == theirs.returncode == 1
    assert r.stderr.split(": ", 1)[1] == theirs.stderr.split(": ", 1)[1]
    assert small.read_bytes() == before


def test_existing_raw_target_where_a_read_covers_a_cluster_in_part(tmp_path):
    """A data cluster holds 4 KiB and a file hole: the planner reads the 4 KiB and leaves the
    rest (zeros) unread; with -n the rest must still be zeroed in DST."""
    src = _write_image(tmp_path, "src.qcow2", "4M", "write -P 1 0 64k", "write -P 9 2M 4k",
                       "write -P 3 3M 64k")
    host = next(e["offset"] for e in qemu_img_map(src) if e["start"] == 2 * MiB)
    run(["fallocate", "-p", "-o", str(host + 4096), "-l", str(60 * KiB), src])
    # the premise: qemu-img map splits that cluster at the hole
    assert any(e["start"] == 2 * MiB and e["length"] == 4096 for e in qemu_img_map(src))
    garbage = b"\xee" * (4 * MiB)
    ours, ref = tmp_path / "ours.raw", tmp_path / "ref.raw"
    ours.write_bytes(garbage)
    ref.write_bytes(garbage)
    assert cli_process("convert", "-n", str(src), str(ours)).returncode == 0
    run([QEMU_IMG, "convert", "-n", src, ref])
    assert same_file(ours, ref)
