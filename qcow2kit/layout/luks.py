"""The LUKS1 on-disk header, as qcow2 stores it for ``encrypt.format=luks``.

A qcow2 image with ``crypt_method == 2`` keeps a complete LUKS1 header (plus
its key material) in a run of host clusters named by the full-disk-encryption
header extension (type ``0x0537be77``: ``offset(8) length(8)``, big-endian).
This module declares that header with construct and turns it into the dict
``qemu-img info --output=json`` shows under ``format-specific.data.encrypt``.

Field names are those of the LUKS1 On-Disk Format Specification written in
snake_case; the comments give QEMU's name (``QCryptoBlockLUKSHeader`` in
crypto/block-luks-priv.h).  All integers are big-endian.

The validation mirrors QEMU 7.2's ``qcrypto_block_luks_check_header()`` and
``qcrypto_block_luks_parse_header()`` (crypto/block-luks.c), so a header QEMU
refuses to open is refused here too, with the name and offset of the field.
No I/O happens here: callers hand in the bytes.
"""

from __future__ import annotations

from typing import Any

from construct import (
    Array,
    Bytes,
    Const,
    Int16ub,
    Int32ub,
    Struct,
)

from qcow2kit.errors import InvalidHeaderError

from . import parse

__all__ = [
    "LUKS_MAGIC",
    "LUKS_VERSION",
    "LUKS_HEADER_SIZE",
    "LUKS_KEY_SLOT_SIZE",
    "LUKS_NUM_KEY_SLOTS",
    "LUKS_SECTOR_SIZE",
    "LUKS_STRIPES",
    "LUKS_KEY_SLOT_ENABLED",
    "LUKS_KEY_SLOT_DISABLED",
    "LuksKeySlot",
    "LuksHeader",
    "parse_luks_header",
    "luks_info",
]

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS_VERSION = 1
LUKS_SECTOR_SIZE = 512            # QCRYPTO_BLOCK_LUKS_SECTOR_SIZE: offsets are in these
LUKS_NUM_KEY_SLOTS = 8
LUKS_STRIPES = 4000               # QCRYPTO_BLOCK_LUKS_STRIPES: the only value QEMU accepts
LUKS_KEY_SLOT_ENABLED = 0x00AC71F3
LUKS_KEY_SLOT_DISABLED = 0x0000DEAD
# QCRYPTO_BLOCK_LUKS_KEY_SLOT_OFFSET: no key material (and no payload) before this
LUKS_KEY_SLOT_OFFSET = 4096

LUKS_STRING_LEN = 32              # cipher-name, cipher-mode, hash-spec
LUKS_DIGEST_LEN = 20
LUKS_SALT_LEN = 32
LUKS_UUID_LEN = 40

#: One key slot ("key-slot-N" in the spec), 48 bytes.
LuksKeySlot = Struct(
    "active" / Int32ub,                    # active: LUKS_KEY_SLOT_ENABLED / _DISABLED
    "iterations" / Int32ub,                # iterations (PBKDF2)
    "salt" / Bytes(LUKS_SALT_LEN),         # salt
    "key_material_offset" / Int32ub,       # key_offset_sector, in 512-byte sectors
    "stripes" / Int32ub,                   # stripes (anti-forensic splitter)
)

#: The LUKS1 phdr, 592 bytes.
LuksHeader = Struct(
    "magic" / Const(LUKS_MAGIC),                     # magic
    "version" / Int16ub,                             # version
    "cipher_name" / Bytes(LUKS_STRING_LEN),          # cipher_name, NUL-terminated
    "cipher_mode" / Bytes(LUKS_STRING_LEN),          # cipher_mode, e.g. "xts-plain64"
    "hash_spec" / Bytes(LUKS_STRING_LEN),            # hash_spec, e.g. "sha256"
    "payload_offset" / Int32ub,                      # payload_offset_sector, in sectors
    "key_bytes" / Int32ub,                           # master_key_len
    "mk_digest" / Bytes(LUKS_DIGEST_LEN),            # master_key_digest
    "mk_digest_salt" / Bytes(LUKS_SALT_LEN),         # master_key_salt
    "mk_digest_iter" / Int32ub,                      # master_key_iterations
    "uuid" / Bytes(LUKS_UUID_LEN),                   # uuid, NUL-padded ASCII
    "key_slots" / Array(LUKS_NUM_KEY_SLOTS, LuksKeySlot),
)

LUKS_KEY_SLOT_SIZE = LuksKeySlot.sizeof()   # 48
LUKS_HEADER_SIZE = LuksHeader.sizeof()      # 592

# Byte offsets of the fields inside the header, for error reports.
_OFF = {
    "magic": 0,
    "version": 6,
    "cipher_name": 8,
    "cipher_mode": 40,
    "hash_spec": 72,
    "payload_offset": 104,
    "key_bytes": 108,
    "mk_digest": 112,
    "mk_digest_salt": 132,
    "mk_digest_iter": 164,
    "uuid": 168,
    "key_slots": 208,
}
_SLOT_OFF = {"active": 0, "iterations": 4, "salt": 8, "key_material_offset": 40, "stripes": 44}

# QEMU 7.2's tables (crypto/block-luks.c, qapi/crypto.json).
# cipher name -> {key bytes (per half for xts): QCryptoCipherAlgorithm}
_CIPHER_SIZES: dict[str, dict[int, str]] = {
    "aes": {16: "aes-128", 24: "aes-192", 32: "aes-256"},
    "cast5": {16: "cast5-128"},
    "serpent": {16: "serpent-128", 24: "serpent-192", 32: "serpent-256"},
    "twofish": {16: "twofish-128", 24: "twofish-192", 32: "twofish-256"},
}
_CIPHER_MODES = ("ecb", "cbc", "xts", "ctr")                 # QCryptoCipherMode
_IVGEN_ALGS = ("plain", "plain64", "essiv")                   # QCryptoIVGenAlgorithm
_HASH_DIGEST_LEN = {                                          # QCryptoHashAlgorithm
    "md5": 16, "sha1": 20, "sha224": 28, "sha256": 32,
    "sha384": 48, "sha512": 64, "ripemd160": 20,
}
# essiv encrypts the sector number with a cipher of the same family keyed by
# the hash of the master key, so the digest length must be a key size of it.
_ESSIV_FAMILIES = {"aes": ("AES", (16, 24, 32)), "serpent": ("Serpent", (16, 24, 32)),
                   "twofish": ("Twofish", (16, 24, 32))}


def _err(message: str, field: str, offset: int, base_offset: int) -> InvalidHeaderError:
    return InvalidHeaderError(message, field=field, offset=base_offset + offset)


def _cstring(raw: bytes, field: str, base_offset: int) -> str:
    """A NUL-terminated field; QEMU refuses one that fills its whole buffer."""
    end = raw.find(b"\0")
    if end < 0:
        raise _err(f"LUKS header {field.replace('_', ' ')} is not NUL terminated",
                   field, _OFF[field], base_offset)
    return raw[:end].decode("latin-1")


def parse_luks_header(header_bytes: bytes, *, base_offset: int = 0) -> Any:
    """Parse and validate a LUKS1 header; return the construct ``Container``.

    ``base_offset`` is where ``header_bytes`` starts in its file; it is added
    to the offsets carried by errors.  Raises :class:`InvalidHeaderError` for
    anything QEMU 7.2's header check refuses (magic, version, unterminated
    strings, zero iteration counts, stripes, key material placement).
    """
    data = bytes(header_bytes)
    if len(data) < len(LUKS_MAGIC) or not data.startswith(LUKS_MAGIC):
        raise _err("Volume is not in LUKS format", "magic", 0, base_offset)
    if len(data) < LUKS_HEADER_SIZE:
        raise _err(f"LUKS header is truncated ({len(data)} of {LUKS_HEADER_SIZE} bytes)",
                   "luks_header", 0, base_offset)
    # magic and size are checked above: the funnel's errors cannot happen here
    hdr = parse(LuksHeader, data[:LUKS_HEADER_SIZE], what="luks_header", offset=base_offset)

    if hdr.version != LUKS_VERSION:
        raise _err(f"LUKS version {hdr.version} is not supported", "version",
                   _OFF["version"], base_offset)
    for name in ("cipher_name", "cipher_mode", "hash_spec"):
        _cstring(hdr[name], name, base_offset)

    header_sectors = LUKS_KEY_SLOT_OFFSET // LUKS_SECTOR_SIZE
    if hdr.payload_offset < header_sectors:
        raise _err("LUKS payload is overlapping with the header", "payload_offset",
                   _OFF["payload_offset"], base_offset)
    if hdr.mk_digest_iter == 0:
        raise _err("LUKS key iteration count is zero", "mk_digest_iter",
                   _OFF["mk_digest_iter"], base_offset)

    def material_sectors(stripes: int) -> int:
        # key material: key_bytes * stripes bytes, in sectors rounded up to the
        # 4 KiB alignment QEMU uses between slots
        sectors = -(-hdr.key_bytes * stripes // LUKS_SECTOR_SIZE)
        return -(-sectors // header_sectors) * header_sectors

    for i, slot in enumerate(hdr.key_slots):
        slot_off = _OFF["key_slots"] + i * LUKS_KEY_SLOT_SIZE
        field = f"key_slots[{i}]"
        if slot.stripes != LUKS_STRIPES:
            raise _err(f"Keyslot {i} is corrupted (stripes {slot.stripes} != {LUKS_STRIPES})",
                       field + ".stripes", slot_off + _SLOT_OFF["stripes"], base_offset)
        if slot.active not in (LUKS_KEY_SLOT_ENABLED, LUKS_KEY_SLOT_DISABLED):
            raise _err(f"Keyslot {i} state (active/disable) is corrupted",
                       field + ".active", slot_off + _SLOT_OFF["active"], base_offset)
        if slot.active == LUKS_KEY_SLOT_ENABLED and slot.iterations == 0:
            raise _err(f"Keyslot {i} iteration count is zero",
                       field + ".iterations", slot_off + _SLOT_OFF["iterations"], base_offset)
        start = slot.key_material_offset
        length = material_sectors(slot.stripes)
        where = slot_off + _SLOT_OFF["key_material_offset"]
        if start < header_sectors:
            raise _err(f"Keyslot {i} is overlapping with the LUKS header",
                       field + ".key_material_offset", where, base_offset)
        if start + length > hdr.payload_offset:
            raise _err(f"Keyslot {i} is overlapping with the encrypted payload",
                       field + ".key_material_offset", where, base_offset)
        for j in range(i + 1, LUKS_NUM_KEY_SLOTS):
            other = hdr.key_slots[j]
            ostart = other.key_material_offset
            olength = material_sectors(other.stripes)
            if length and olength and start < ostart + olength and ostart < start + length:
                raise _err(f"Keyslots {i} and {j} are overlapping in the header",
                           field + ".key_material_offset", where, base_offset)
    return hdr


def luks_info(header_bytes: bytes, *, base_offset: int = 0) -> dict:
    """The ``QCryptoBlockInfoLUKS`` dict qemu-img shows for this header.

    Keys (in QAPI declaration order, which is QEMU's insertion order):
    ``format`` ("luks"), ``cipher-alg``, ``cipher-mode``, ``ivgen-alg``,
    ``ivgen-hash-alg`` (essiv only), ``hash-alg``, ``payload-offset`` (bytes),
    ``master-key-iters``, ``uuid``, ``slots`` (8 dicts: ``active``, then
    ``iters`` and ``stripes`` for active slots only, and ``key-offset`` in bytes).

    The cipher algorithm name is derived as QEMU does it: from the cipher
    name and the master key size, halved for xts (which uses two keys).
    """
    hdr = parse_luks_header(header_bytes, base_offset=base_offset)
    cipher_name = _cstring(hdr.cipher_name, "cipher_name", base_offset)
    cipher_mode_spec = _cstring(hdr.cipher_mode, "cipher_mode", base_offset)
    hash_spec = _cstring(hdr.hash_spec, "hash_spec", base_offset)

    def bad(message: str, field: str) -> InvalidHeaderError:
        return _err(message, field, _OFF[field], base_offset)

    # cipher_mode is "<mode>-<ivgen>[:<ivgen hash>]", e.g. "cbc-essiv:sha256"
    mode, dash, ivgen = cipher_mode_spec.partition("-")
    if not dash:
        raise bad(f"Unexpected cipher mode string format '{cipher_mode_spec}'", "cipher_mode")
    ivgen, colon, ivhash = ivgen.partition(":")
    if colon and ivhash not in _HASH_DIGEST_LEN:
        raise bad(f"Hash algorithm '{ivhash}' not supported", "cipher_mode")
    if mode not in _CIPHER_MODES:
        raise bad(f"Cipher mode '{mode}' not supported", "cipher_mode")

    key_bytes = hdr.key_bytes
    if mode == "xts":
        key_bytes //= 2
    cipher_alg = _CIPHER_SIZES.get(cipher_name, {}).get(key_bytes)
    if cipher_alg is None:
        raise bad(f"Algorithm '{cipher_name}' with key size {key_bytes} bytes not supported",
                  "cipher_name")
    if hash_spec not in _HASH_DIGEST_LEN:
        raise bad(f"Hash algorithm '{hash_spec}' not supported", "hash_spec")
    if ivgen not in _IVGEN_ALGS:
        raise bad(f"IV generator '{ivgen}' not supported", "cipher_mode")
    if ivgen == "essiv":
        if not colon:
            raise bad("Missing IV generator hash specification", "cipher_mode")
        digest_len = _HASH_DIGEST_LEN[ivhash]
        family = _ESSIV_FAMILIES.get(cipher_name)
        if digest_len != key_bytes and (family is None or digest_len not in family[1]):
            if family is None:
                msg = f"Cipher {cipher_alg} not supported with essiv"
            else:
                msg = f"No {family[0]} cipher with key size {digest_len} available"
            raise bad(msg, "cipher_mode")

    info: dict[str, Any] = {
        "format": "luks",
        "cipher-alg": cipher_alg,
        "cipher-mode": mode,
        "ivgen-alg": ivgen,
    }
    if ivgen == "essiv":
        info["ivgen-hash-alg"] = ivhash
    info["hash-alg"] = hash_spec
    info["payload-offset"] = hdr.payload_offset * LUKS_SECTOR_SIZE
    info["master-key-iters"] = hdr.mk_digest_iter
    # QEMU copies at most the 40 bytes and stops at the first NUL
    info["uuid"] = hdr.uuid.split(b"\0", 1)[0].decode("utf-8", "replace")
    slots = []
    for slot in hdr.key_slots:
        entry: dict[str, Any] = {"active": slot.active == LUKS_KEY_SLOT_ENABLED}
        if entry["active"]:
            entry["iters"] = slot.iterations
            entry["stripes"] = slot.stripes
        entry["key-offset"] = slot.key_material_offset * LUKS_SECTOR_SIZE
        slots.append(entry)
    info["slots"] = slots
    return info
