"""The library as a Python developer expects it: errors that are also the OSError a file
would raise, closed images that refuse I/O as closed files do, reads that refuse impossible
lengths before allocating, cluster kinds as an enum, and `qcow2kit.open`'s typed options."""
from __future__ import annotations

import errno
import inspect
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest

from qemu import QEMU_IMG, QEMU_IO, cli_process, run
import qcow2kit
from qcow2kit import (BackingChainError, BackingFileNotFoundError, ClusterKind,
                      CorruptImageError, DataFileNotFoundError, ImageNotFoundError,
                      ImageOpenError, Qcow2Error)
from qcow2kit import tables as T
from qcow2kit.image import block_status
from qcow2kit.sample import make_fragmented_image

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------
# Missing files


def test_missing_image_is_a_file_not_found_error(tmp_path):
    path = tmp_path / "nope.qcow2"
    with pytest.raises(FileNotFoundError) as ei:
        qcow2kit.open(path)
    e = ei.value
    assert isinstance(e, ImageNotFoundError) and isinstance(e, Qcow2Error)
    assert isinstance(e, ImageOpenError) and isinstance(e, OSError)
    assert e.errno == errno.ENOENT and e.strerror == os.strerror(errno.ENOENT)
    assert e.filename == str(path) and e.path == str(path)
    assert str(e).count(str(path)) == 1 and "No such file or directory" in str(e)
    with pytest.raises(Qcow2Error):
        qcow2kit.Image.open(path)                     # still caught as a Qcow2Error


def test_other_open_failures_keep_their_errno(tmp_path):
    with pytest.raises(ImageOpenError) as ei:
        qcow2kit.open(tmp_path / "nope.qcow2" / "x")  # a path through a missing directory
    assert isinstance(ei.value, FileNotFoundError)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(ImageOpenError) as ei:
        qcow2kit.open(tmp_path / "file" / "x")        # a path through a regular file
    assert ei.value.errno == errno.ENOTDIR and not isinstance(ei.value, FileNotFoundError)
    assert isinstance(ei.value, OSError) and isinstance(ei.value, Qcow2Error)


def test_open_errors_survive_pickling(tmp_path):
    with pytest.raises(ImageNotFoundError) as ei:
        qcow2kit.open(tmp_path / "nope.qcow2")
    e = pickle.loads(pickle.dumps(ei.value))
    assert type(e) is ImageNotFoundError and str(e) == str(ei.value)
    assert (e.errno, e.filename, e.path) == (ei.value.errno, ei.value.filename, ei.value.path)


def _chain_without_base(tmp_path: Path) -> tuple[Path, Path]:
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M"])
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F",
                 "qcow2", tmp_path / "top.qcow2"], cwd=tmp_path)
    (tmp_path / "base.qcow2").unlink()
    return tmp_path / "top.qcow2", tmp_path / "base.qcow2"


@pytest.mark.qemu
def test_missing_backing_file_is_a_backing_chain_and_file_not_found_error(tmp_path):
    top, base = _chain_without_base(tmp_path)
    with qcow2kit.open(top) as img:
        with pytest.raises(FileNotFoundError) as ei:
            img.read(0, 4096)
    e = ei.value
    assert isinstance(e, BackingFileNotFoundError) and isinstance(e, BackingChainError)
    assert isinstance(e, ImageNotFoundError) and isinstance(e, Qcow2Error)
    assert e.errno == errno.ENOENT and e.filename == str(base)   # the file that is missing
    assert e.path == str(top)                                   # the image that names it
    assert (e.field, e.offset) == ("backing_file_offset", 8)
    assert str(e).count(str(base)) == 1 and str(e).startswith(f"{top}: ")


@pytest.mark.qemu
def test_missing_data_file_is_a_file_not_found_error(tmp_path):
    run([QEMU_IMG, "create", "-q", "-f", "qcow2", "-o",
                 "data_file=img.data", tmp_path / "img.qcow2", "1M"], cwd=tmp_path)
    run([QEMU_IO, "-f", "qcow2", "-c", "write 0 64k", "img.qcow2"],
                cwd=tmp_path)
    (tmp_path / "img.data").unlink()
    with qcow2kit.open(tmp_path / "img.qcow2") as img:
        with pytest.raises(FileNotFoundError) as ei:
            img.read(0, 4096)
    e = ei.value
    assert isinstance(e, DataFileNotFoundError) and isinstance(e, CorruptImageError)
    assert e.filename == str(tmp_path / "img.data") and e.path == str(tmp_path / "img.qcow2")
    assert str(e).count("img.data") == 1


def _cli(argv: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    return cli_process(*argv, cwd=cwd, env=env, timeout=60)


def _assert_names_once(r: subprocess.CompletedProcess[str], name: str) -> None:
    assert r.returncode == 1, r
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcow2kit: "), r.stderr
    assert "Traceback" not in r.stderr and lines[0].count(name) == 1, r.stderr
    assert "No such file or directory" in lines[0]


def test_cli_names_a_missing_image_once(tmp_path):
    _assert_names_once(_cli(["info", "nope.qcow2"], tmp_path), "nope.qcow2")


@pytest.mark.qemu
def test_cli_names_a_missing_backing_file_once(tmp_path):
    _chain_without_base(tmp_path)
    _assert_names_once(_cli(["convert", "-O", "raw", "top.qcow2", "out.raw"], tmp_path),
                       "base.qcow2")


# ------------------------------------------------------------------------------------------
# Cluster kinds


def test_cluster_kinds_are_an_int_enum_with_the_old_names():
    assert issubclass(ClusterKind, int) and T.ClusterKind is ClusterKind
    assert [T.UNALLOCATED, T.ZERO, T.DATA, T.COMPRESSED, T.INVALID] == [0, 1, 2, 3, 4]
    assert T.DATA is ClusterKind.DATA and ClusterKind(3) is ClusterKind.COMPRESSED
    assert T.KIND_NAMES[ClusterKind.ZERO] == "zero" == ClusterKind.ZERO.label
    assert T.KIND_NAMES[1] == "zero"                                # plain ints still index it
    arr = np.array([0, 2, 3], dtype=np.uint8)
    assert (arr == T.DATA).tolist() == [False, True, False]
    assert [T.KINDS[v] for v in arr] == [ClusterKind.UNALLOCATED, ClusterKind.DATA,
                                         ClusterKind.COMPRESSED]


def test_segments_and_block_status_carry_enum_members():
    with qcow2kit.open(FIXTURES / "v2_overlay.qcow2") as img:
        segs = list(img.segments(0, img.size))
        assert segs and all(type(s.kind) is ClusterKind for s in segs)
        assert "ClusterKind." in repr(segs[0])
        status = list(block_status(img, 0, img.size))
        assert status and all(type(s.kind) is ClusterKind for s in status)
        assert {s.kind for s in status} >= {ClusterKind.DATA}


# ------------------------------------------------------------------------------------------
# Reads that cannot be satisfied are refused before anything is allocated


def test_huge_read_is_a_value_error_naming_the_size():
    with qcow2kit.open(FIXTURES / "plain4k.qcow2") as img:
        for offset, length in [(0, 1 << 62), (0, img.size + 1), (img.size, 1), (-1, 1),
                               (0, -1), (1 << 63, 1)]:
            with pytest.raises(ValueError, match=f"virtual size {img.size}"):
                img.read(offset, length)
        assert img.read(img.size, 0) == b""
        assert img.read(0, img.size) == img.read(0, img.size)


# ------------------------------------------------------------------------------------------
# Closed images


def _io_calls(img: qcow2kit.Image) -> dict[str, object]:
    return {
        "read": lambda: img.read(0, 1),
        "readinto": lambda: img.readinto(0, bytearray(1)),
        "segments": lambda: img.segments(0, 4096),
        "l1_table": lambda: img.l1_table,
        "l2_table": lambda: img.l2_table(0),
        "snapshots": lambda: img.snapshots,
        "bitmaps": lambda: img.bitmaps,
        "backing": lambda: img.backing,
        "chain": lambda: img.chain(),
        "data_source": lambda: img.data_source,
        "refcount_blocks": lambda: img.refcount_blocks(),
        "inflate": lambda: img.inflate(0, 512),
        "block_status": lambda: list(block_status(img, 0, 4096)),
    }


@pytest.mark.parametrize("fixture", ["plain4k.qcow2", "v2_overlay.qcow2", "zstd.qcow2"])
def test_every_io_after_close_is_a_value_error(fixture):
    img = qcow2kit.open(FIXTURES / fixture)
    for call in _io_calls(img).values():            # fill every cache first
        try:
            call()
        except (Qcow2Error, ValueError):
            pass
    img.close()
    img.close()                                      # twice is fine
    assert img.closed
    for name, call in _io_calls(img).items():
        with pytest.raises(ValueError, match="^I/O operation on closed image$"):
            call()
            pytest.fail(f"{name} after close() did not raise")
    assert img.size > 0 and img.header.version in (2, 3)   # no I/O: still there
    assert "Image" in repr(img)


def test_closing_closes_the_backing_chain():
    img = qcow2kit.open(FIXTURES / "v2_overlay.qcow2")
    layers = img.chain()
    assert len(layers) == 2 and not any(layer.closed for layer in layers)
    img.close()
    assert all(layer.closed for layer in layers)
    with pytest.raises(ValueError, match="closed image"):
        layers[1].read(0, 1)


def test_mapping_of_a_closed_image_is_a_value_error():
    from qcow2kit.hostorder import read_host_order
    from qcow2kit.mapping import iter_extents, map_batches
    img = qcow2kit.open(FIXTURES / "v2_overlay.qcow2")
    img.close()
    for call in (lambda: list(iter_extents(img, 0, img.size)), lambda: list(map_batches(img)),
                 lambda: list(read_host_order(img))):
        with pytest.raises(ValueError, match="closed image"):
            call()


def test_a_segments_iterator_stops_when_its_image_closes(tmp_path):
    # 512 B clusters: an L2 table per 32 KiB, so the iterator needs the file again soon
    info = make_fragmented_image(tmp_path / "s.qcow2", virtual_size=1 << 20, cluster_bits=9,
                                 fill=0.5, seed=3)
    img = qcow2kit.open(info.path)
    it = img.segments(0, img.size)
    next(it)
    img.close()
    with pytest.raises(ValueError, match="closed image"):
        list(it)


# ------------------------------------------------------------------------------------------
# qcow2kit.open


def test_open_has_typed_keyword_options():
    sig = inspect.signature(qcow2kit.open)
    params = sig.parameters
    assert list(params) == ["path", "source", "follow_backing", "l2_cache_bytes",
                            "max_backing_depth", "force_share", "consistent_read", "locking",
                            "snapshot", "snapshot_size"]
    for name in list(params)[1:]:
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[name].annotation != "object"
    assert sig.return_annotation in ("Image", qcow2kit.Image)
    img_sig = inspect.signature(qcow2kit.Image.open)
    for name in list(params)[1:]:
        assert params[name].default == img_sig.parameters[name].default
    with pytest.raises(TypeError):
        qcow2kit.open(FIXTURES / "plain4k.qcow2", cache=1)    # type: ignore[call-arg]
    with pytest.raises(TypeError):
        qcow2kit.open(FIXTURES / "plain4k.qcow2", "mmap")     # type: ignore[misc]


def test_open_passes_every_option_on():
    with qcow2kit.open(FIXTURES / "v2_overlay.qcow2", source="mmap", follow_backing=False,
                       l2_cache_bytes=1, max_backing_depth=3) as img:
        assert type(img.src).__name__ == "MmapSource"
        assert img.backing is None and img._max_depth == 3
        assert img._l2_cache_bytes == img.cluster_size          # at least one table
    with qcow2kit.open(FIXTURES / "v2_overlay.qcow2", max_backing_depth=0) as img:
        with pytest.raises(BackingChainError, match="deeper than 0"):
            img.read(0, img.size)


# ------------------------------------------------------------------------------------------
# The package's names


def test_package_exports_the_new_names():
    for name in ("GuestFile", "open_guest", "ClusterKind", "ImageNotFoundError",
                 "ImageOpenError", "BackingFileNotFoundError", "DataFileNotFoundError", "Status"):
        assert name in qcow2kit.__all__ and hasattr(qcow2kit, name)
