"""qcow2kit.layout.luks against images made by qemu-img.

For qcow2 images the LUKS header is found through the full-disk-encryption
header extension (parsed by a few lines here, on purpose independent of the
library's own header code); luks_info() must equal what
``qemu-img info --output=json`` prints under format-specific.data.encrypt.
Corrupted headers must be refused with the message QEMU gives for them.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from qcow2kit.errors import InvalidHeaderError, Qcow2Error
from qemu import QEMU_ENV, QEMU_IMG, create_encrypted, qemu_img
from qcow2kit.layout.luks import (
    LUKS_HEADER_SIZE,
    LUKS_KEY_SLOT_DISABLED,
    LUKS_KEY_SLOT_ENABLED,
    LuksHeader,
    luks_info,
    parse_luks_header,
)

pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img not installed")

EXT_CRYPTO_HEADER = 0x0537BE77
SLOTS = 208          # offset of key slot 0 in the LUKS header
SLOT_SIZE = 48


def _create_encrypted(cwd: Path, name: str, fmt: str, opts: str, size: str = "16M") -> Path:
    """qemu-img create with a LUKS secret (see qemu.create_encrypted)."""
    if not create_encrypted(cwd / name, size, opts, fmt=fmt, env=QEMU_ENV):
        pytest.skip("qemu-img could not calibrate PBKDF on this machine")
    return cwd / name


def _crypto_extension(image: bytes) -> tuple[int, int]:
    """(offset, length) of the LUKS header from the qcow2 header extension."""
    assert image[:4] == b"QFI\xfb"
    version = struct.unpack_from(">I", image, 4)[0]
    pos = struct.unpack_from(">I", image, 100)[0] if version >= 3 else 72
    while pos + 8 <= len(image):
        ext_type, ext_len = struct.unpack_from(">II", image, pos)
        if ext_type == 0:
            break
        if ext_type == EXT_CRYPTO_HEADER:
            return struct.unpack_from(">QQ", image, pos + 8)
        pos += 8 + ((ext_len + 7) & ~7)
    raise AssertionError("no full disk encryption header extension")


def _qcow2_luks_header(path: Path) -> tuple[bytes, int]:
    data = path.read_bytes()
    offset, length = _crypto_extension(data)
    assert length >= LUKS_HEADER_SIZE
    return data[offset:offset + length], offset


def _qemu_encrypt(path: Path) -> dict:
    r = qemu_img("info", "--output=json", path.name, cwd=path.parent, ok=None, env=QEMU_ENV)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["format-specific"]["data"]["encrypt"]


COMBOS = {
    "default": "",
    "aes128-xts": "cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha256",
    # (QEMU 7.2 aborts creating a 24-byte key without xts: 24 * 4000 stripes
    # is not a whole number of sectors, so aes-192 is tested with xts)
    "aes192-xts-essiv": ("cipher-alg=aes-192,cipher-mode=xts,ivgen-alg=essiv,"
                         "ivgen-hash-alg=sha256,hash-alg=sha1"),
    "aes256-cbc-essiv": ("cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,"
                         "ivgen-hash-alg=sha256,hash-alg=sha256"),
    "aes256-ecb": "cipher-alg=aes-256,cipher-mode=ecb,ivgen-alg=plain,hash-alg=sha384",
    "twofish256-xts": "cipher-alg=twofish-256,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha512",
    "serpent128-cbc": "cipher-alg=serpent-128,cipher-mode=cbc,ivgen-alg=plain,hash-alg=sha256",
    "serpent192-xts": "cipher-alg=serpent-192,cipher-mode=xts,ivgen-alg=plain64,hash-alg=sha224",
    "cast5-cbc": "cipher-alg=cast5-128,cipher-mode=cbc,ivgen-alg=plain64,hash-alg=sha1",
    "twofish128-essiv-md5": ("cipher-alg=twofish-128,cipher-mode=cbc,ivgen-alg=essiv,"
                             "ivgen-hash-alg=md5,hash-alg=ripemd160"),
}


def _qcow2_opts(spec: str) -> str:
    opts = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"
    for item in filter(None, spec.split(",")):
        opts += ",encrypt." + item
    return opts


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("luks")


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_luks_info_matches_qemu(workdir: Path, combo: str) -> None:
    path = _create_encrypted(workdir, f"{combo}.qcow2", "qcow2", _qcow2_opts(COMBOS[combo]))
    header, offset = _qcow2_luks_header(path)
    expected = _qemu_encrypt(path)
    info = luks_info(header, base_offset=offset)
    assert info == expected
    # the dict is built in QAPI order (QEMU's insertion order)
    keys = ["format", "cipher-alg", "cipher-mode", "ivgen-alg", "ivgen-hash-alg", "hash-alg",
            "payload-offset", "master-key-iters", "uuid", "slots"]
    assert list(info) == [k for k in keys if k in info]
    # only the first slot is in use, and its material follows the 4 KiB header
    assert [s["active"] for s in info["slots"]] == [True] + [False] * 7
    assert set(info["slots"][0]) == {"active", "iters", "stripes", "key-offset"}
    assert all(set(s) == {"active", "key-offset"} for s in info["slots"][1:])


def test_construct_declaration(workdir: Path) -> None:
    path = _create_encrypted(workdir, "decl.qcow2", "qcow2", _qcow2_opts(""))
    header, _ = _qcow2_luks_header(path)
    hdr = LuksHeader.parse(header)
    assert LUKS_HEADER_SIZE == 592
    assert hdr.magic == b"LUKS\xba\xbe" and hdr.version == 1
    assert hdr.cipher_name.rstrip(b"\0") == b"aes"
    assert hdr.cipher_mode.rstrip(b"\0") == b"xts-plain64"
    assert hdr.key_bytes == 64
    assert hdr.key_slots[0].active == LUKS_KEY_SLOT_ENABLED
    assert all(s.active == LUKS_KEY_SLOT_DISABLED for s in hdr.key_slots[1:])
    assert all(s.stripes == 4000 for s in hdr.key_slots)
    # round trip: the declaration rebuilds the same bytes
    assert LuksHeader.build(hdr) == header[:LUKS_HEADER_SIZE]


# ---------------------------------------------------------------- raw LUKS

@pytest.fixture(scope="module")
def raw_luks(workdir: Path) -> Path:
    return _create_encrypted(workdir, "raw.luks", "luks", "key-secret=sec0,iter-time=10", "1M")


def test_raw_luks_format_specific(raw_luks: Path) -> None:
    r = qemu_img("info", "--output=json", raw_luks.name, cwd=raw_luks.parent, ok=None, env=QEMU_ENV)
    data = json.loads(r.stdout)["format-specific"]["data"]
    info = luks_info(raw_luks.read_bytes()[:4096])
    assert info.pop("format") == "luks"
    assert info == data


def _u32(off: int, value: int):
    return lambda b: struct.pack_into(">I", b, off, value)


def _raw(off: int, value: bytes):
    def patch(b: bytearray) -> None:
        b[off:off + len(value)] = value
    return patch


def _copy_slot_offset(src: int, dst: int):
    def patch(b: bytearray) -> None:
        value = struct.unpack_from(">I", b, SLOTS + src * SLOT_SIZE + 40)[0]
        struct.pack_into(">I", b, SLOTS + dst * SLOT_SIZE + 40, value)
    return patch


# (patch, field reported, offset reported); qemu-img's message is the oracle
CORRUPTIONS = {
    "magic": (_raw(0, b"LUKX"), "magic", 0),
    "version": (lambda b: struct.pack_into(">H", b, 6, 2), "version", 6),
    "cipher-name-unterminated": (_raw(8, b"a" * 32), "cipher_name", 8),
    "cipher-mode-unterminated": (_raw(40, b"b" * 32), "cipher_mode", 40),
    "hash-spec-unterminated": (_raw(72, b"c" * 32), "hash_spec", 72),
    "payload-over-header": (_u32(104, 2), "payload_offset", 104),
    "mk-iterations-zero": (_u32(164, 0), "mk_digest_iter", 164),
    "stripes": (_u32(SLOTS + 44, 3999), "key_slots[0].stripes", SLOTS + 44),
    "active-marker": (_u32(SLOTS + 2 * SLOT_SIZE, 1), "key_slots[2].active", SLOTS + 96),
    "slot-iterations-zero": (_u32(SLOTS + 4, 0), "key_slots[0].iterations", SLOTS + 4),
    "slot-over-header": (_u32(SLOTS + 40, 1), "key_slots[0].key_material_offset", SLOTS + 40),
    "slot-over-payload": (_u32(SLOTS + 7 * SLOT_SIZE + 40, 4000),
                          "key_slots[7].key_material_offset", SLOTS + 7 * SLOT_SIZE + 40),
    "slots-overlap": (_copy_slot_offset(4, 5), "key_slots[4].key_material_offset",
                      SLOTS + 4 * SLOT_SIZE + 40),
    "unknown-cipher": (_raw(8, b"foo\0"), "cipher_name", 8),
    "mode-without-ivgen": (_raw(40, b"xts\0"), "cipher_mode", 40),
    "unknown-mode": (_raw(40, b"xyz-plain64\0"), "cipher_mode", 40),
    "unknown-ivgen": (_raw(40, b"xts-plain65\0"), "cipher_mode", 40),
    "essiv-without-hash": (_raw(40, b"xts-essiv\0"), "cipher_mode", 40),
    "essiv-bad-digest": (_raw(40, b"xts-essiv:sha1\0"), "cipher_mode", 40),
    "empty-ivgen-hash": (_raw(40, b"xts-plain64:\0"), "cipher_mode", 40),
    "unknown-hash": (_raw(72, b"sha2566\0"), "hash_spec", 72),
    "unknown-key-size": (_u32(108, 40), "cipher_name", 8),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_corrupt_header_refused_like_qemu(raw_luks: Path, tmp_path: Path, name: str) -> None:
    patch, field, offset = CORRUPTIONS[name]
    data = bytearray(raw_luks.read_bytes())
    patch(data)
    bad = tmp_path / "bad.luks"
    bad.write_bytes(bytes(data))
    r = qemu_img("info", "-f", "luks", bad.name, cwd=tmp_path, ok=None, env=QEMU_ENV)
    assert r.returncode != 0
    prefix = "qemu-img: Could not open 'bad.luks': "
    assert r.stderr.startswith(prefix), r.stderr
    qemu_message = r.stderr[len(prefix):].strip()

    with pytest.raises(InvalidHeaderError) as exc:
        luks_info(bytes(data[:4096]), base_offset=0x10000)
    assert exc.value.message == qemu_message
    assert exc.value.field == field
    assert exc.value.offset == 0x10000 + offset
    assert isinstance(exc.value, Qcow2Error)


def test_truncated_and_empty() -> None:
    with pytest.raises(InvalidHeaderError) as exc:
        luks_info(b"")
    assert exc.value.field == "magic" and exc.value.offset == 0
    with pytest.raises(InvalidHeaderError) as exc:
        parse_luks_header(b"LUKS\xba\xbe\x00\x01" + b"\0" * 100, base_offset=512)
    assert "truncated" in exc.value.message and exc.value.offset == 512


def test_plain_ivgen_ignores_hash_suffix(raw_luks: Path) -> None:
    # like dm-crypt, a hash after plain/plain64 is parsed but not reported
    data = bytearray(raw_luks.read_bytes()[:4096])
    data[40:72] = b"xts-plain64:sha1".ljust(32, b"\0")
    info = luks_info(bytes(data))
    assert info["ivgen-alg"] == "plain64" and "ivgen-hash-alg" not in info
