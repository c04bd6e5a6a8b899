"""New qcow2 images, byte for byte the files ``qemu-img create -f qcow2`` (QEMU 7.2) writes.

``qemu-img create`` is deterministic: it writes a minimal image (header, a
refcount table and an empty refcount block), then grows it to the requested
size through QEMU's ordinary allocator (``qcow2_co_create`` and
``qcow2_co_truncate`` in block/qcow2.c, with ``qcow2_alloc_clusters``,
``alloc_refcount_block`` and ``qcow2_refcount_area`` of block/qcow2-refcount.c
and ``qcow2_alloc_host_offset`` of block/qcow2-cluster.c).  Where clusters
land, which ones are left free, what stale bytes a freed refcount table leaves
behind and how long the file ends up all follow from that sequence, so this
module replays it on a model of the image (:class:`_Allocator`, one Python
step per allocation run, never per cluster) and only then writes the file.

Everything is validated and the whole layout computed before any file is
touched, so invalid arguments never truncate an existing file.  Nothing here
prints: :func:`formatting_line` and :func:`options_help` return the text
``qemu-img`` prints, the CLI (``qcow2kit.cli.create_cmd``) prints it.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import spec
from . import tables as T
from .errors import Qcow2Error
from .units import strtoull_prefix, qemu_strtosz
from .layout import header as H

if TYPE_CHECKING:
    from .writer import ImageWriter

# --------------------------------------------------------------------------- errors


class CreateError(Qcow2Error, ValueError):
    """Invalid ``create`` arguments (or an image QEMU would refuse to create).

    ``option`` names the option at fault when there is one.  The message text
    follows qemu-img's where that is reasonable.
    """

    def __init__(self, message: str, *, option: str | None = None,
                 path: str | None = None) -> None:
        super().__init__(message, path=path)
        self.option = option
        #: the "Formatting ..." line when qemu-img prints it before failing this way
        self.formatting: str | None = None


class ImageTooLargeError(CreateError):
    """The virtual size needs more metadata than QEMU allows (its ``-EFBIG``)."""


# --------------------------------------------------------------------------- constants

DEFAULT_CLUSTER_SIZE = 65536
_INT_MAX = (1 << 31) - 1
_INT64_MAX = (1 << 63) - 1
_BDRV_REQUEST_MAX_BYTES = _INT_MAX & ~511          # BDRV_REQUEST_MAX_BYTES
_MAX_L1_ENTRIES = spec.MAX_L1_SIZE // 8             # QCOW_MAX_L1_SIZE / sizeof(uint64_t)
_MAX_REFTABLE = spec.MAX_REFTABLE_SIZE              # QCOW_MAX_REFTABLE_SIZE (compared as QEMU does)

PREALLOC_MODES = ("off", "metadata", "falloc", "full")

#: BlockdevDriver values of QEMU 7.2 (Debian build): what backing_fmt accepts.
BACKING_FORMATS = frozenset([
    "blkdebug", "blklogwrites", "blkreplay", "blkverify", "bochs", "cloop", "compress",
    "copy-before-write", "copy-on-read", "dmg", "file", "snapshot-access", "ftp", "ftps", "gluster",
    "host_cdrom", "host_device", "http", "https", "iscsi", "luks", "nbd", "nfs", "null-aio",
    "null-co", "nvme", "parallels", "preallocate", "qcow", "qcow2", "qed", "quorum", "raw", "rbd",
    "replication", "ssh", "throttle", "vdi", "vhdx", "vmdk", "vpc", "vvfat"
])

#: Backing formats whose size qcow2kit can read (without ``-u``).
READABLE_BACKING_FORMATS = ("qcow2", "raw", "file")


# --------------------------------------------------------------------------- size parsing


def parse_image_size(text: str) -> tuple[int, list[str]]:
    """The SIZE argument of ``create`` (qemu-img's ``cvtnum``): value and warnings."""
    try:
        value, hex_suffix = qemu_strtosz(text)
    except OverflowError:
        value, hex_suffix = 1 << 64, False
    except ValueError:
        raise CreateError("Invalid image size specified. You may use k, M, G, T, P or E "
                          "suffixes for kilobytes, megabytes, gigabytes, terabytes, "
                          "petabytes and exabytes.", option="size") from None
    if value > _INT64_MAX:
        raise CreateError(f"Invalid image size specified. Must be between 0 and "
                          f"{_INT64_MAX}.", option="size")
    warnings = [f"Using a multiplier suffix on hex numbers is deprecated: {text}"] \
        if hex_suffix else []
    return value, warnings


# --------------------------------------------------------------------------- -o options


@dataclass(frozen=True)
class _OptDesc:
    name: str
    type: str          # "str", "bool", "size", "num"
    help: str
    default: str | None = None


# qcow2's create options in QEMU 7.2's declaration order (the order of the
# "Formatting" line); encryption options and the file protocol's nocow and
# extent_size_hint are QEMU options qcow2kit does not implement.
_OPTIONS: tuple[_OptDesc, ...] = (
    _OptDesc("cluster_size", "size", "qcow2 cluster size", str(DEFAULT_CLUSTER_SIZE)),
    _OptDesc("extended_l2", "bool", "Extended L2 tables", "off"),
    _OptDesc("preallocation", "str",
             "Preallocation mode (allowed values: off, metadata, falloc, full)"),
    _OptDesc("compression_type", "str", "Compression method used for image cluster "
             "compression", "zlib"),
    _OptDesc("size", "size", "Virtual disk size"),
    _OptDesc("compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"),
    _OptDesc("backing_file", "str", "File name of a base image"),
    _OptDesc("backing_fmt", "str", "Image format of the base image"),
    _OptDesc("data_file", "str", "File name of an external data file"),
    _OptDesc("data_file_raw", "bool", "The external data file must stay valid as a raw image"),
    _OptDesc("lazy_refcounts", "bool", "Postpone refcount updates", "off"),
    _OptDesc("refcount_bits", "num", "Width of a reference count entry in bits", "16"),
)
_OPTION_BY_NAME = {d.name: d for d in _OPTIONS}
_UNSUPPORTED_OPTIONS = ("encryption", "encrypt.format", "encrypt.key-secret",
                        "encrypt.cipher-alg", "encrypt.cipher-mode", "encrypt.ivgen-alg",
                        "encrypt.ivgen-hash-alg", "encrypt.hash-alg", "encrypt.iter-time",
                        "nocow", "extent_size_hint")
_TYPE_NAMES = {"str": "str", "bool": "bool (on/off)", "size": "size", "num": "num"}


def options_help(with_filename: bool = True) -> str:
    """The option list ``qemu-img create -f qcow2 -o help [FILE]`` prints (qcow2kit's options).

    qemu-img says "Supported options:" when a file name is given and "Supported
    qcow2 options:" plus a note about protocol options when not.
    """
    lines = ["Supported options:" if with_filename else "Supported qcow2 options:"]
    for d in sorted(_OPTIONS, key=lambda d: d.name):
        lines.append(f"  {d.name + '=<' + _TYPE_NAMES[d.type] + '>':<22} - {d.help}")
    if not with_filename:
        lines += ["", "The protocol level may support further options.",
                  "Specify the target filename to include those options."]
    return "\n".join(lines) + "\n"


def is_valid_option_list(text: str) -> bool:
    """qemu-img's check of one ``-o`` argument: not empty, no leading or unescaped trailing comma."""
    if not text or text[0] == ",":
        return False
    i = len(text)
    while i > 0 and text[i - 1] == ",":
        i -= 1
    return (len(text) - i) % 2 == 0


def _split_option_list(text: str) -> list[tuple[str, str]]:
    """QemuOpts syntax: ``name=value,...``; ``,,`` is a literal comma; ``name`` alone means
    ``on``, ``noname`` means ``name=off``, and a bare ``help`` or ``?`` asks for help."""
    out: list[tuple[str, str]] = []
    i = 0
    n = len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        name = text[i:j]
        if j < n and text[j] == "=":
            k = j + 1
            buf = []
            while k < n:
                if text[k] == ",":
                    if text[k + 1:k + 2] == ",":
                        buf.append(",")
                        k += 2
                        continue
                    break
                buf.append(text[k])
                k += 1
            value = "".join(buf)
            i = k + 1
        else:
            if name in ("help", "?"):
                value = _HELP
            elif name.startswith("no"):
                name, value = name[2:], "off"
            else:
                value = "on"
            i = j + 1
        out.append((name, value))
    return out


_HELP = "\0help"     # the value of a bare "help" or "?" (never a real value)


def has_help_option(option_lists: Sequence[str]) -> bool:
    """Whether a bare ``help`` (or ``?``) is among the ``-o`` options."""
    return any(value == _HELP for text in option_lists
               for _, value in _split_option_list(text))


def _parse_bool(name: str, value: str) -> bool:
    if value in ("on", "yes", "true", "y"):
        return True
    if value in ("off", "no", "false", "n"):
        return False
    raise CreateError(f"Parameter '{name}' expects 'on' or 'off'", option=name)


def _parse_opt_size(name: str, value: str) -> int:
    try:
        return qemu_strtosz(value)[0]
    except (ValueError, OverflowError):
        raise CreateError(f"Parameter '{name}' expects a non-negative number below 2^64 "
                          f"(optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, "
                          f"tera-, peta- and exabytes, respectively)", option=name) from None


def _parse_number(name: str, value: str) -> int:
    # qemu_strtou64(value, NULL, 0): C's strtoull with base 0 (hex, octal, decimal)
    text = value.strip(" \t\n\v\f\r")
    body = text.lstrip("+-")
    base = 16 if body[:2].lower() == "0x" else 8 if body[:1] == "0" and len(body) > 1 else 10
    val, end, overflow = strtoull_prefix(value, base)
    if val is None or end != len(value) or overflow:
        raise CreateError(f"Parameter '{name}' expects a number", option=name)
    return val


@dataclass
class ParsedOptions:
    """The ``-o`` options as QemuOpts holds them: raw strings (last one wins) and values."""

    raw: dict[str, str] = field(default_factory=dict)
    values: dict[str, object] = field(default_factory=dict)

    def get(self, name: str) -> object:
        return self.values.get(name)

    def has(self, name: str) -> bool:
        return name in self.raw


def parse_option_lists(option_lists: Sequence[str]) -> ParsedOptions:
    """Parse the ``-o`` arguments (each already accepted by :func:`is_valid_option_list`)."""
    opts = ParsedOptions()
    for text in option_lists:
        for name, value in _split_option_list(text):
            d = _OPTION_BY_NAME.get(name)
            if d is None:
                if name in _UNSUPPORTED_OPTIONS:
                    raise CreateError(f"Parameter '{name}' is not supported by qcow2kit "
                                      f"create", option=name)
                raise CreateError(f"Invalid parameter '{name}'", option=name)
            parsed: object
            if d.type == "bool":
                parsed = _parse_bool(name, value)
            elif d.type == "size":
                parsed = _parse_opt_size(name, value)
            elif d.type == "num":
                parsed = _parse_number(name, value)
            else:
                parsed = value
            opts.raw[name] = value
            opts.values[name] = parsed
    return opts


def _print_value(d: _OptDesc, opts: ParsedOptions) -> str | None:
    if d.name not in opts.raw:
        return d.default
    if d.type == "size":
        return str(opts.values[d.name])
    if d.type == "num":
        v = int(opts.values[d.name])  # type: ignore[call-overload]
        return str(v - (1 << 64) if v >= 1 << 63 else v)
    return opts.raw[d.name].replace(",", ",,")


def formatting_line(filename: str, opts: ParsedOptions) -> str:
    """The line qemu-img create prints before creating (without the newline)."""
    parts = [f"Formatting '{filename}', fmt=qcow2"]
    for d in _OPTIONS:
        v = _print_value(d, opts)
        if v is not None:
            parts.append(f"{d.name}={v}")
    return " ".join(parts)


# --------------------------------------------------------------------------- validated options


@dataclass(frozen=True)
class CreateOptions:
    """Validated options of one ``create`` (after qemu-img's defaults and rules)."""

    size: int                      # virtual size, rounded up to 512 as QEMU does
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    version: int = 3
    lazy_refcounts: bool = False
    refcount_bits: int = 16
    extended_l2: bool = False
    compression_type: int = spec.COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_fmt: str | None = None
    data_file: str | None = None
    data_file_raw: bool = False
    preallocation: str = "off"     # after data_file_raw's implied "metadata"

    @property
    def cluster_bits(self) -> int:
        return self.cluster_size.bit_length() - 1

    @property
    def refcount_order(self) -> int:
        return self.refcount_bits.bit_length() - 1


def _file_error(filename: str, message: str, option: str | None = None) -> CreateError:
    return CreateError(f"{filename}: {message}", option=option, path=filename)


def _has_protocol(name: str) -> bool:
    colon = name.find(":")
    slash = name.find("/")
    return colon > 0 and (slash < 0 or colon < slash)


@dataclass(frozen=True)
class _Sized:
    """What bdrv_img_create settles before printing: the size and the backing file."""

    size: int
    backing_file: str | None
    backing_fmt: str | None


def _check_img_create(filename: str, opts: ParsedOptions, size: int | None,
                      backing_file: str | None, backing_fmt: str | None, open_backing: bool,
                      backing_size: Callable[[str, str], tuple[int, str]] | None) -> _Sized:
    """qemu-img's checks before it prints the Formatting line (bdrv_img_create)."""
    if _has_protocol(filename):
        raise _file_error(filename, "protocol prefixes are not supported by qcow2kit create")
    if opts.has("size") and size is not None:
        raise _file_error(filename, "The image size must be specified only once", "size")
    if opts.has("size"):
        size = int(opts.values["size"])  # type: ignore[call-overload]
    if backing_file is not None:
        opts.raw["backing_file"] = opts.values["backing_file"] = backing_file
    if backing_fmt is not None:
        opts.raw["backing_fmt"] = opts.values["backing_fmt"] = backing_fmt
    bfile = opts.raw.get("backing_file")
    bfmt = opts.raw.get("backing_fmt")
    if bfile is not None:
        if bfile == filename:
            raise _file_error(filename, "Error: Trying to create an image with the same "
                                        "filename as the backing file", "backing_file")
        if bfile == "":
            raise _file_error(filename, "Expected backing file name, got empty string",
                              "backing_file")
    if bfile is not None and open_backing:
        full = _full_backing_name(filename, bfile)
        if bfmt is not None and bfmt not in BACKING_FORMATS:
            raise _file_error(filename, f"Unknown driver '{bfmt}'", "backing_fmt")
        if bfmt is not None and bfmt not in READABLE_BACKING_FORMATS:
            raise _file_error(filename, f"backing format '{bfmt}' cannot be opened by "
                                        f"qcow2kit; use -u and give the size", "backing_fmt")
        if backing_size is None:
            raise _file_error(filename, "cannot open the backing file", "backing_file")
        probed, detected = backing_size(full, bfmt or "")
        if bfmt is None:
            raise _file_error(filename, f"Backing file specified without backing format "
                                        f"(detected format of {detected})", "backing_fmt")
        if size is None:
            size = probed
    elif bfile is not None and bfmt is None:
        raise _file_error(filename, "Backing file specified without backing format",
                          "backing_fmt")
    if size is None:
        raise _file_error(filename, "Image creation needs a size parameter", "size")
    opts.raw["size"] = str(size)
    opts.values["size"] = size
    return _Sized(size, bfile, bfmt)


def validate(filename: str, opts: ParsedOptions, *, size: int | None = None,
             backing_file: str | None = None, backing_fmt: str | None = None,
             open_backing: bool = True,
             backing_size: Callable[[str, str], tuple[int, str]] | None = None
             ) -> CreateOptions:
    """Apply qemu-img's rules, in qemu-img's order, to the parsed arguments.

    ``size`` is the SIZE argument (None when absent); ``backing_file`` and
    ``backing_fmt`` the ``-b`` and ``-F`` arguments, which override the
    options of the same name.  ``backing_size(path, fmt)`` returns the size
    of a backing file and its (probed) format; ``open_backing=False`` is
    ``-u``.  Messages carry the image name as qemu-img's do.
    """
    sized = _check_img_create(filename, opts, size, backing_file, backing_fmt, open_backing,
                              backing_size)
    return _check_qcow2_create(filename, opts, sized)


def _check_qcow2_create(filename: str, opts: ParsedOptions, sized: _Sized) -> CreateOptions:
    """The checks of qcow2_co_create_opts and qcow2_co_create (after the Formatting line)."""
    size = sized.size
    bfile, bfmt = sized.backing_file, sized.backing_fmt
    # ---- qcow2_co_create_opts: the QAPI visitor (enum values), in member order
    compat = opts.raw.get("compat")
    version = 3
    if compat is not None:
        if compat in ("0.10", "v2"):
            version = 2
        elif compat in ("1.1", "v3"):
            version = 3
        else:
            raise _file_error(filename, f"Parameter 'version' does not accept value "
                                        f"'{compat}'", "compat")
    if bfmt is not None and bfmt not in BACKING_FORMATS:
        raise _file_error(filename, f"Parameter 'backing-fmt' does not accept value '{bfmt}'",
                          "backing_fmt")
    prealloc = opts.raw.get("preallocation")
    if prealloc is not None and prealloc not in PREALLOC_MODES:
        raise _file_error(filename, f"Parameter 'preallocation' does not accept value "
                                    f"'{prealloc}'", "preallocation")
    ctype_name = opts.raw.get("compression_type")
    if ctype_name is not None and ctype_name not in ("zlib", "zstd"):
        raise _file_error(filename, f"Parameter 'compression-type' does not accept value "
                                    f"'{ctype_name}'", "compression_type")
    size = (size + 511) // 512 * 512          # "Silently round up size"

    # ---- qcow2_co_create
    extended_l2 = bool(opts.values.get("extended_l2", False))
    cluster_size = int(opts.values.get("cluster_size", DEFAULT_CLUSTER_SIZE))  # type: ignore[call-overload]
    if extended_l2 and version < 3:
        raise _file_error(filename, "Extended L2 entries are only supported with "
                                    "compatibility level 1.1 and above (use version=v3 or "
                                    "greater)", "extended_l2")
    cbits = cluster_size.bit_length() - 1
    if not (spec.MIN_CLUSTER_BITS <= cbits <= spec.MAX_CLUSTER_BITS) or cluster_size != 1 << cbits:
        raise _file_error(filename, "Cluster size must be a power of two between 512 and "
                                    "2048k", "cluster_size")
    if extended_l2 and cluster_size < 1 << spec.MIN_CLUSTER_BITS_EXTENDED_L2:
        raise _file_error(filename, "Extended L2 entries are only supported with cluster "
                                    f"sizes of at least {1 << spec.MIN_CLUSTER_BITS_EXTENDED_L2} "
                                    "bytes", "extended_l2")
    prealloc = prealloc or "off"
    if bfile is not None and prealloc != "off" and not extended_l2:
        raise _file_error(filename, "Backing file and preallocation can only be used at the "
                                    "same time if extended_l2 is on", "preallocation")
    if bfmt is not None and bfile is None:
        raise _file_error(filename, "Backing format cannot be used without backing file",
                          "backing_fmt")
    lazy = bool(opts.values.get("lazy_refcounts", False))
    if version < 3 and lazy:
        raise _file_error(filename, "Lazy refcounts only supported with compatibility level "
                                    "1.1 and above (use version=v3 or greater)",
                          "lazy_refcounts")
    rbits = int(opts.values.get("refcount_bits", 16))  # type: ignore[call-overload]
    if rbits > 64 or rbits <= 0 or rbits & (rbits - 1):
        raise _file_error(filename, "Refcount width must be a power of two and may not "
                                    "exceed 64 bits", "refcount_bits")
    if version < 3 and rbits != 16:
        raise _file_error(filename, "Different refcount widths than 16 bits require "
                                    "compatibility level 1.1 or above (use version=v3 or "
                                    "greater)", "refcount_bits")
    data_file = opts.raw.get("data_file")
    raw = bool(opts.values.get("data_file_raw", False))
    if raw and data_file is None:
        raise _file_error(filename, "data-file-raw requires data-file", "data_file_raw")
    if raw and bfile is not None:
        raise _file_error(filename, "Backing file and data-file-raw cannot be used at the "
                                    "same time", "data_file_raw")
    if raw and prealloc == "off":
        prealloc = "metadata"
    if data_file is not None:
        if version < 3:
            raise _file_error(filename, "External data files are only supported with "
                                        "compatibility level 1.1 and above (use version=v3 "
                                        "or greater)", "data_file")
        if _has_protocol(data_file):
            raise _file_error(filename, "protocol prefixes are not supported by qcow2kit "
                                        "create", "data_file")
        if data_file == "":
            raise _file_error(filename, "The 'file' block driver requires a file name",
                              "data_file")
    ctype = spec.COMPRESSION_ZLIB
    if ctype_name == "zstd":
        if version < 3:
            raise _file_error(filename, "Non-zlib compression type is only supported with "
                                        "compatibility level 1.1 and above (use version=v3 "
                                        "or greater)", "compression_type")
        ctype = spec.COMPRESSION_ZSTD
    if bfile is not None and len(bfile.encode("utf-8", "surrogateescape")) > 1023:
        raise _file_error(filename, f"Could not assign backing file '{bfile}' with format "
                                    f"'{bfmt}': Invalid argument", "backing_file")
    return CreateOptions(size=size, cluster_size=cluster_size, version=version,
                         lazy_refcounts=lazy, refcount_bits=rbits, extended_l2=extended_l2,
                         compression_type=ctype, backing_file=bfile, backing_fmt=bfmt,
                         data_file=data_file, data_file_raw=raw, preallocation=prealloc)


def _full_backing_name(filename: str, backing: str) -> str:
    """The backing file as QEMU opens it: relative names are relative to the image's directory."""
    if os.path.isabs(backing):
        return backing
    slash = filename.rfind("/")
    return filename[:slash + 1] + backing if slash >= 0 else backing


def backing_virtual_size(path: str, fmt: str) -> tuple[int, str]:
    """Size and format of a backing file as ``qemu-img create`` takes them.

    The size is what QEMU's bdrv_getlength gives: whole 512-byte sectors, the
    virtual size of a qcow2 image rounded down, the length of anything else
    rounded up.  With no format, qcow2 is probed by its magic (else raw).
    The backing chain below a qcow2 backing file is opened too, as QEMU does.
    """
    from .image import Image

    try:
        with open(path, "rb") as f:
            magic = f.read(4)
            length = os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise CreateError(f"Could not open '{path}': {exc.strerror}",
                          option="backing_file", path=path) from None
    detected = "qcow2" if magic == spec.QCOW_MAGIC else "raw"
    if fmt == "qcow2" or (fmt == "" and detected == "qcow2"):
        # qemu-img create opens the backing file shared and without I/O: no locks, so a
        # backing file a VM is writing to is fine
        with Image.open(path, follow_backing=True, locking=False) as img:
            img.chain()
            return img.size // 512 * 512, detected
    return (length + 511) // 512 * 512, detected


# --------------------------------------------------------------------------- the allocator


class _EAgain(Exception):
    """QEMU's -EAGAIN from alloc_refcount_block: metadata moved, search again."""


def _efbig() -> ImageTooLargeError:
    return ImageTooLargeError("The image size is too large for file format 'qcow2' (try "
                              "using a larger cluster size)", option="size")


class _Used:
    """The set of clusters with refcount 1, as sorted disjoint half-open intervals.

    ``qemu-img create`` never shares a cluster, so a refcount is 0 or 1 and a set
    of runs describes every refcount block exactly.
    """

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []
        # when a list, every changed range [a, b) is recorded (the builder rewrites the
        # refcount blocks that cover them)
        self.touched: list[tuple[int, int]] | None = None

    def first_overlap(self, a: int, b: int) -> int | None:
        """Index of the first interval meeting [a, b), or None."""
        i = bisect.bisect_right(self.ends, a)
        if i < len(self.starts) and self.starts[i] < b:
            return i
        return None

    def contains(self, c: int) -> bool:
        return self.first_overlap(c, c + 1) is not None

    def add(self, a: int, b: int) -> None:
        if a >= b:
            return
        if self.first_overlap(a, b) is not None:
            raise AssertionError(f"cluster range [{a}, {b}) already in use")
        if self.touched is not None:
            self.touched.append((a, b))
        i = bisect.bisect_left(self.starts, a)
        if i > 0 and self.ends[i - 1] == a:
            self.ends[i - 1] = b
            if i < len(self.starts) and self.starts[i] == b:
                self.ends[i - 1] = self.ends[i]
                del self.starts[i], self.ends[i]
        elif i < len(self.starts) and self.starts[i] == b:
            self.starts[i] = a
        else:
            self.starts.insert(i, a)
            self.ends.insert(i, b)

    def remove(self, a: int, b: int) -> None:
        if self.touched is not None:
            self.touched.append((a, b))
        while True:
            i = self.first_overlap(a, b)
            if i is None:
                return
            s, e = self.starts[i], self.ends[i]
            del self.starts[i], self.ends[i]
            if s < a:
                self.starts.insert(i, s)
                self.ends.insert(i, a)
                i += 1
            if e > b:
                self.starts.insert(i, b)
                self.ends.insert(i, e)

    def free_run(self, start: int, n: int) -> int:
        """First p >= start with [p, p+n) free (the search of alloc_clusters_noref)."""
        p = start
        while True:
            i = self.first_overlap(p, p + n)
            if i is None:
                return p
            p = self.ends[i]

    def free_prefix(self, start: int, n: int) -> int:
        """How many clusters from ``start`` on (at most n) are free."""
        i = self.first_overlap(start, start + n)
        return n if i is None else max(0, self.starts[i] - start)

    def last_below(self, n: int) -> int:
        """The highest used cluster below n, or -1."""
        i = bisect.bisect_left(self.starts, n) - 1
        if i < 0:
            return -1
        return min(self.ends[i], n) - 1

    def runs_in(self, a: int, b: int) -> Iterator[tuple[int, int]]:
        i = bisect.bisect_right(self.ends, a)
        while i < len(self.starts) and self.starts[i] < b:
            yield max(self.starts[i], a), min(self.ends[i], b)
            i += 1


@dataclass
class _Run:
    """Guest clusters [guest, guest+count) mapped to host clusters from ``host`` on."""

    guest: int
    host: int
    count: int


class _Allocator:
    """A replay of the parts of QEMU's qcow2 driver that ``qemu-img create`` runs.

    Sizes are in clusters unless named ``*_offset``/``*_bytes``.  The model
    keeps: refcounts (:class:`_Used`), the refcount table, QEMU's
    ``free_cluster_index``, the L1 table, where each L2 table is and which guest
    clusters map where; and, for the bytes of the file, the length of the image
    and data files, the stale contents freed refcount tables leave behind and
    the zeros copy-on-write writes.
    """

    def __init__(self, o: CreateOptions) -> None:
        self.o = o
        self.cb = o.cluster_bits
        self.cs = o.cluster_size
        self.order = o.refcount_order
        self.rb_bits = self.cb + 3 - self.order          # refcount_block_bits
        self.rb_size = 1 << self.rb_bits                  # entries per refcount block
        self.entry_size = 16 if o.extended_l2 else 8
        self.l2_size = self.cs // self.entry_size         # entries per L2 table (= slice)
        self.l2_bits = self.l2_size.bit_length() - 1
        self.sc_size = self.cs >> 5 if o.extended_l2 else self.cs
        self.has_data_file = o.data_file is not None

        self.used = _Used()
        self.free_index = 0
        self.reftable = np.zeros(self.cs // 8, dtype=np.uint64)
        self.reftable[0] = 2 * self.cs
        self.reftable_offset = self.cs
        self.max_rt_index = 0
        self.refblocks: set[int] = {2}                    # clusters holding refcount blocks
        self.l1 = np.zeros(0, dtype=np.uint64)
        self.l1_offset = 0
        self.l2_tables: dict[int, int] = {}               # l1 index -> L2 table cluster
        self.runs: list[_Run] = []                        # guest -> host (sorted by guest)
        self.run_starts: list[int] = []
        # the files
        self.file_length = 3 * self.cs                    # header, reftable, refblock written
        self.data_length = 0
        self.stale: dict[int, bytearray] = {}             # freed clusters' remaining bytes
        self.zero_writes: list[tuple[int, int]] = []      # (offset, length), image file
        self.data_zero_writes: list[tuple[int, int]] = []
        self.fill: tuple[int, int, str] | None = None     # falloc/full range, image file
        self.data_fill: tuple[int, int, str] | None = None
        # when a list, a replaced refcount table is not freed but recorded here as
        # (offset, bytes): the builder frees it once the header points at the new one
        self.defer_free: list[tuple[int, int]] | None = None

    # -- writes -------------------------------------------------------------

    def _wrote(self, offset: int, length: int) -> None:
        """A write of whole clusters that end up holding live metadata."""
        self.file_length = max(self.file_length, offset + length)
        self._unstale(offset >> self.cb, (offset + length + self.cs - 1) >> self.cb)

    def _unstale(self, first: int, end: int) -> None:
        """Clusters [first, end) now hold something new: forget their stale bytes."""
        for c in [c for c in self.stale if first <= c < end]:
            del self.stale[c]

    def _zero_write(self, offset: int, length: int, data_file: bool) -> None:
        if length <= 0:
            return
        if data_file:
            self.data_zero_writes.append((offset, length))
            self.data_length = max(self.data_length, offset + length)
            return
        self.zero_writes.append((offset, length))
        self.file_length = max(self.file_length, offset + length)
        end = offset + length
        for c in [c for c in self.stale if offset >> self.cb <= c < -(-end // self.cs)]:
            a = max(offset, c << self.cb) - (c << self.cb)
            b = min(end, (c + 1) << self.cb) - (c << self.cb)
            self.stale[c][a:b] = bytes(b - a)

    # -- refcounts (block/qcow2-refcount.c) ----------------------------------

    def alloc_clusters_noref(self, n: int) -> int:
        p = self.used.free_run(self.free_index, n)
        self.free_index = p + n
        if self.free_index > 0 and self.free_index - 1 > (_INT64_MAX >> self.cb):
            raise _efbig()
        return p

    def update_refcount(self, offset: int, length: int, decrease: bool) -> None:
        """Add or drop one reference to every cluster of the byte range; raises _EAgain
        (after undoing what it did, as QEMU does) when a refcount block had to be made."""
        if length <= 0:
            return
        start = offset >> self.cb
        last = (offset + length - 1) >> self.cb
        c = start
        try:
            while c <= last:
                ti = c >> self.rb_bits
                try:
                    self.alloc_refcount_block(c)
                except _EAgain:
                    # the caller searches again, starting with the same clusters
                    self.free_index = min(self.free_index, start)
                    raise
                seg_end = min(last + 1, (ti + 1) << self.rb_bits)
                if decrease:
                    self.used.remove(c, seg_end)
                    self.free_index = min(self.free_index, c)
                else:
                    self.used.add(c, seg_end)
                c = seg_end
        except _EAgain:
            done = (c << self.cb) - offset
            if done > 0:
                try:
                    self.update_refcount(offset, done, not decrease)
                except _EAgain:   # pragma: no cover - the blocks of the undone range exist
                    pass
            raise

    def alloc_refcount_block(self, c: int) -> None:
        rti = c >> self.rb_bits
        if rti < self.reftable.shape[0] and int(self.reftable[rti]):
            return
        new_block = self.alloc_clusters_noref(1)
        if new_block >> self.rb_bits == rti:
            self.used.add(new_block, new_block + 1)        # describes itself
        else:
            self.update_refcount(new_block << self.cb, self.cs, False)
        self.refblocks.add(new_block)
        self._wrote(new_block << self.cb, self.cs)
        if rti < self.reftable.shape[0]:
            self.reftable[rti] = new_block << self.cb
            self.max_rt_index = max(self.max_rt_index, rti)
            raise _EAgain()
        blocks_used = -(-max(c + 1, new_block + 1) // self.rb_size)
        meta_offset = blocks_used * self.rb_size * self.cs
        self.refcount_area(meta_offset, 0, False, rti, new_block << self.cb)
        raise _EAgain()

    def refcount_counts(self, rti: int) -> np.ndarray:
        """The refcounts (0 or 1) of the clusters refcount block ``rti`` describes."""
        counts = np.zeros(self.rb_size, dtype=np.uint64)
        first = rti * self.rb_size
        for s, e in self.used.runs_in(first, first + self.rb_size):
            counts[s - first:e - first] = 1
        return counts

    def refcount_metadata_size(self, clusters: int, generous: bool) -> int:
        """Number of refcount blocks (qcow2_refcount_metadata_size's refblock_count)."""
        per_table_cluster = self.cs // 8
        table = blocks = n = 0
        while True:
            last = n
            blocks = -(-(clusters + table + blocks) // self.rb_size)
            table = -(-blocks // per_table_cluster)
            n = clusters + blocks + table
            if n == last and generous:
                clusters += -(-table // 2)
                n = 0
                generous = False
                continue
            if n == last:
                return blocks

    def refcount_area(self, start_offset: int, additional: int, exact: bool,
                      new_index: int, new_offset: int) -> int:
        """New self-describing refcount structures from ``start_offset`` on; the end offset."""
        cs = self.cs
        total = self.refcount_metadata_size(start_offset // cs + additional, not exact)
        if total > _MAX_REFTABLE:
            raise _efbig()
        area_index = (start_offset // cs) // self.rb_size
        table_size = total if exact else total + -(-total // 2)
        per = cs // 8
        table_size = -(-table_size // per) * per
        table_clusters = table_size * 8 // cs
        if table_size > _MAX_REFTABLE:
            raise _efbig()
        new = np.zeros(table_size, dtype=np.uint64)
        if table_size > self.max_rt_index:
            keep = self.max_rt_index + 1
        else:
            keep = table_size
        new[:keep] = self.reftable[:keep]
        if new_offset:
            new[new_index] = new_offset
        missing = np.flatnonzero(new[area_index:total] == 0) + area_index
        table_offset = start_offset + missing.shape[0] * cs
        end_offset = table_offset + table_clusters * cs
        new[missing] = (start_offset + np.arange(missing.shape[0], dtype=np.uint64) * cs
                        ).astype(np.uint64)
        first_c = start_offset // cs
        for c in range(first_c, first_c + missing.shape[0]):
            self.refblocks.add(c)
        # every new structure has refcount 1 (from start_offset to end_offset)
        self.used.add(first_c, end_offset // cs)
        if missing.shape[0]:
            self._wrote(start_offset, missing.shape[0] * cs)
        self._wrote(table_offset, table_clusters * cs)
        old_offset, old_table = self.reftable_offset, self.reftable
        self.reftable = new
        self.reftable_offset = table_offset
        nz = np.flatnonzero(new)
        self.max_rt_index = int(nz[-1]) if nz.shape[0] else 0
        # the old table stays in the file as it was, until something overwrites it
        old_bytes = T.encode_u64_table(old_table)
        for k in range(old_bytes.__len__() // cs):
            self.stale[(old_offset >> self.cb) + k] = bytearray(old_bytes[k * cs:(k + 1) * cs])
        if self.defer_free is not None:
            self.defer_free.append((old_offset, old_table.shape[0] * 8))
        else:
            self.free_clusters(old_offset, old_table.shape[0] * 8)
        return end_offset

    def free_clusters(self, offset: int, length: int) -> None:
        try:
            self.update_refcount(offset, length, True)
        except _EAgain:   # pragma: no cover - QEMU only logs a failed free
            pass

    def alloc_clusters(self, nbytes: int) -> int:
        """qcow2_alloc_clusters: a byte offset of ``nbytes`` worth of new clusters."""
        n = -(-nbytes // self.cs)
        while True:
            p = self.alloc_clusters_noref(n)
            try:
                self.update_refcount(p << self.cb, n * self.cs, False)
            except _EAgain:
                continue
            return p << self.cb

    def alloc_clusters_at(self, offset: int, n: int) -> int:
        """qcow2_alloc_clusters_at: how many of the n clusters at ``offset`` were free."""
        if n == 0:
            return 0
        while True:
            i = self.used.free_prefix(offset >> self.cb, n)
            try:
                self.update_refcount(offset, i << self.cb, False)
            except _EAgain:
                continue
            return i

    def last_cluster(self, file_size: int) -> int:
        return self.used.last_below(-(-file_size // self.cs))

    # -- L1 and L2 (block/qcow2-cluster.c) -----------------------------------

    def grow_l1(self, min_size: int) -> None:
        if min_size <= self.l1.shape[0]:
            return
        if min_size > _INT_MAX // 8 or min_size > _MAX_L1_ENTRIES:
            raise _efbig()
        off = self.alloc_clusters(8 * min_size)
        self.l1 = np.zeros(min_size, dtype=np.uint64)
        self.l1_offset = off
        self.file_length = max(self.file_length, off + 8 * min_size)
        # the L1 table covers whole clusters only up to its last entry
        self._unstale(off >> self.cb, (off + 8 * min_size) >> self.cb)

    def get_cluster_table(self, guest: int) -> int:
        l1_index = guest >> (self.cb + self.l2_bits)
        if l1_index not in self.l2_tables:
            off = self.alloc_clusters(self.cs)
            self._wrote(off, self.cs)
            self.l2_tables[l1_index] = off >> self.cb
            self.l1[l1_index] = np.uint64(off | spec.OFLAG_COPIED)
        return l1_index

    def _slice_left(self, guest: int) -> int:
        return self.l2_size - ((guest >> self.cb) & (self.l2_size - 1))

    def alloc_host_offset(self, offset: int, nbytes: int) -> tuple[int, int]:
        """qcow2_alloc_host_offset for a fresh (unallocated) range: (host offset, bytes done).

        Links the L2 entries and does the copy-on-write of the new clusters
        right away (qcow2_handle_l2meta, as preallocate_co does after each call).
        """
        cs = self.cs
        start = offset
        remaining = nbytes
        cluster_offset: int | None = None
        host_offset: int | None = None
        metas: list[tuple[int, int, int, int]] = []   # guest, host, clusters, bytes
        cur = 0
        while True:
            if host_offset is None and cluster_offset is not None:
                host_offset = cluster_offset
            start += cur
            remaining -= cur
            if cluster_offset is not None:
                cluster_offset += cur
            if remaining == 0:
                break
            cur = remaining
            # handle_copied: loads (allocating) the L2 table; fresh entries need allocation
            self.get_cluster_table(start)
            # handle_alloc
            oic = start & (cs - 1)
            n = -(-(oic + cur) // cs)
            n = min(n, _BDRV_REQUEST_MAX_BYTES >> self.cb, self._slice_left(start))
            if self.has_data_file:
                alloc = start - oic
            elif cluster_offset is None:
                alloc = self.alloc_clusters(n * cs)
            else:
                alloc = cluster_offset - (cluster_offset & (cs - 1))
                n = self.alloc_clusters_at(alloc, n)
                if n == 0:
                    break
            nb = min(oic + cur, n * cs)
            cluster_offset = alloc + oic
            cur = min(cur, nb - oic)
            metas.append((start - oic, alloc, n, oic + cur))
        done = nbytes - remaining
        assert host_offset is not None and done > 0
        for guest, host, n, end_in_run in metas:
            self._link(guest, host, n, end_in_run)
        return host_offset, done

    def _link(self, guest: int, host: int, n: int, written_end: int) -> None:
        """qcow2_alloc_cluster_link_l2 of a preallocated run: COW of the tail, then entries."""
        cow_to = -(-written_end // self.sc_size) * self.sc_size
        self._zero_write(host + written_end, cow_to - written_end, self.has_data_file)
        self._add_run(guest, host, n)

    def _add_run(self, guest: int, host: int, n: int) -> None:
        self.runs.append(_Run(guest >> self.cb, host >> self.cb, n))
        self.run_starts.append(guest >> self.cb)

    # -- qcow2_co_truncate ----------------------------------------------------

    def truncate(self, size: int, prealloc: str) -> None:
        shift = self.cb + self.l2_bits
        self.grow_l1((size + (1 << shift) - 1) >> shift)
        if prealloc == "off":
            if self.has_data_file:
                self.data_length = size
        elif prealloc == "metadata" or self.has_data_file:
            self.preallocate(size, prealloc)
        else:
            self.preallocate_image(size, prealloc)

    def preallocate(self, size: int, mode: str) -> None:
        """preallocate_co from 0 to ``size``."""
        offset = 0
        remaining = size
        host = cur = 0
        step = _INT_MAX - (_INT_MAX % self.cs)
        while remaining:
            host, cur = self.alloc_host_offset(offset, min(remaining, step))
            remaining -= cur
            offset += cur
        end = host + cur
        if self.has_data_file:
            if end > self.data_length:
                if mode != "metadata":
                    self.data_fill = (self.data_length, end, mode)
                self.data_length = end
        elif end > self.file_length:
            self.file_length = end

    def preallocate_image(self, size: int, mode: str) -> None:
        """The falloc/full branch of qcow2_co_truncate (no external data file)."""
        cs = self.cs
        last = self.last_cluster(self.file_length)
        old_file_size = (last + 1) * cs if last >= 0 else -(-self.file_length // cs) * cs
        nb_data = -(-size // cs)
        nb_l2 = -(-nb_data // self.l2_size) + 1
        allocation_start = self.refcount_area(old_file_size, nb_data + nb_l2, True, 0, 0)
        got = self.alloc_clusters_at(allocation_start, nb_data)
        assert got == nb_data
        new_file_size = allocation_start + nb_data * cs
        if new_file_size > self.file_length:
            self.fill = (self.file_length, new_file_size, mode)
            self.file_length = new_file_size
        host = allocation_start
        guest = 0
        left = nb_data
        while left:
            n = min(left, self._slice_left(guest))
            self.get_cluster_table(guest)
            self._add_run(guest, host, n)
            guest += n * cs
            host += n * cs
            left -= n


# --------------------------------------------------------------------------- the plan


@dataclass
class CreatePlan:
    """Everything ``create`` writes, computed before anything is written."""

    path: str
    options: CreateOptions
    header: bytes                        # cluster 0
    file_length: int
    data_file_path: str | None
    data_file_length: int
    _alloc: _Allocator
    _block_index: dict[int, int] | None = None

    # -- content of the image file, in writing order ---------------------------

    def metadata_chunks(self) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) of everything but cluster 0 and data: stale bytes first, then the
        refcount blocks, the refcount table, the L1 and the L2 tables."""
        a = self._alloc
        for c in sorted(a.stale):
            yield c << a.cb, bytes(a.stale[c])
        for c in sorted(a.refblocks):
            yield c << a.cb, self.refcount_block(c)
        yield a.reftable_offset, T.encode_u64_table(a.reftable)
        if a.l1.shape[0]:
            yield a.l1_offset, T.encode_u64_table(a.l1)
        for l1_index in sorted(a.l2_tables):
            yield a.l2_tables[l1_index] << a.cb, self.l2_table(l1_index)

    def refcount_block(self, cluster: int) -> bytes:
        """The final content of the refcount block stored in ``cluster``."""
        a = self._alloc
        if self._block_index is None:
            self._block_index = {int(off) >> a.cb: i for i, off in enumerate(a.reftable.tolist())
                                 if off}
        i = self._block_index.get(cluster)
        counts = (a.refcount_counts(i) if i is not None
                  else np.zeros(a.rb_size, dtype=np.uint64))
        return T.encode_refcount_block(counts, a.order)

    def l2_table(self, l1_index: int) -> bytes:
        """The final content of the L2 table under ``l1_index``."""
        a = self._alloc
        first = l1_index << a.l2_bits
        end = first + a.l2_size
        entries = np.zeros(a.l2_size, dtype=np.uint64)
        i = max(0, bisect.bisect_right(a.run_starts, first) - 1)
        while i < len(a.runs) and a.runs[i].guest < end:
            run = a.runs[i]
            i += 1
            s = max(run.guest, first)
            e = min(run.guest + run.count, end)
            if s >= e:
                continue
            host = (np.arange(s, e, dtype=np.uint64) - np.uint64(run.guest)
                    + np.uint64(run.host)) << np.uint64(a.cb)
            entries[s - first:e - first] = host | np.uint64(spec.OFLAG_COPIED)
        bitmaps = np.zeros(a.l2_size, dtype=np.uint64) if a.o.extended_l2 else None
        return T.encode_l2(entries, bitmaps)

    @property
    def zero_writes(self) -> list[tuple[int, int]]:
        return list(self._alloc.zero_writes)

    @property
    def fill(self) -> tuple[int, int, str] | None:
        return self._alloc.fill

    @property
    def data_zero_writes(self) -> list[tuple[int, int]]:
        return list(self._alloc.data_zero_writes)

    @property
    def data_fill(self) -> tuple[int, int, str] | None:
        return self._alloc.data_fill

    def image_bytes(self) -> bytes:
        """The whole image file in memory (for tests and small images)."""
        buf = bytearray(self.file_length)
        for off, chunk in self.metadata_chunks():
            buf[off:off + len(chunk)] = chunk
        buf[:len(self.header)] = self.header
        return bytes(buf[:self.file_length])


def header_cluster(o: CreateOptions, a: _Allocator) -> bytes:
    """Cluster 0 as QEMU's qcow2_update_header writes it at the end of create."""
    incompat = 0
    if o.data_file is not None:
        incompat |= spec.INCOMPAT_DATA_FILE
    if o.compression_type != spec.COMPRESSION_ZLIB:
        incompat |= spec.INCOMPAT_COMPRESSION
    if o.extended_l2:
        incompat |= spec.INCOMPAT_EXTL2
    fields = {
        "version": o.version, "backing_file_offset": 0, "backing_file_size": 0,
        "cluster_bits": o.cluster_bits, "size": o.size, "crypt_method": spec.CRYPT_NONE,
        "l1_size": a.l1.shape[0], "l1_table_offset": a.l1_offset,
        "refcount_table_offset": a.reftable_offset,
        "refcount_table_clusters": a.reftable.shape[0] * 8 // a.cs,
        "nb_snapshots": 0, "snapshots_offset": 0,
        "incompatible_features": incompat,
        "compatible_features": spec.COMPAT_LAZY_REFCOUNTS if o.lazy_refcounts else 0,
        "autoclear_features": spec.AUTOCLEAR_DATA_FILE_RAW if o.data_file_raw else 0,
        "refcount_order": o.refcount_order, "header_length": spec.V3_HEADER_SIZE,
        "compression_type": o.compression_type}
    # qcow2_update_header's order: backing format, data file, feature-name table (which
    # QEMU leaves out of images with clusters of 4 KiB or less)
    exts: list[tuple[int, bytes]] = []
    if o.data_file is not None:
        exts.append((spec.EXT_DATA_FILE, H.encode_name_extension(o.data_file)))
    if o.version >= 3 and o.cluster_size > 4096:
        exts.append((spec.EXT_FEATURE_TABLE,
                     H.encode_feature_table(sorted(spec.KNOWN_FEATURE_NAMES.items()))))
    first = H.encode_header_area(H.HeaderArea(fields, exts), place_backing_file=True)
    if len(first) > o.cluster_size:
        raise CreateError("Could not update qcow2 header: No space left on device")
    if o.backing_file is not None:
        if o.backing_fmt is not None:
            exts.insert(0, (spec.EXT_BACKING_FORMAT, H.encode_name_extension(o.backing_fmt)))
        raw = H.encode_header_area(
            H.HeaderArea(fields, exts, H.encode_name_extension(o.backing_file)),
            place_backing_file=True)
        if len(raw) > o.cluster_size:
            raise CreateError(f"Could not assign backing file '{o.backing_file}' with format "
                              f"'{o.backing_fmt}': No space left on device")
    else:
        raw = first
    return raw + bytes(o.cluster_size - len(raw))


def plan(path: str, o: CreateOptions) -> CreatePlan:
    """Replay ``qcow2_co_create`` for ``o`` and return what to write (touches no file)."""
    a = _Allocator(o)
    try:
        a.alloc_clusters(3 * a.cs)                  # header, refcount table, refcount block
        a.truncate(o.size, o.preallocation)
    except ImageTooLargeError as exc:
        raise ImageTooLargeError(f"{path}: {exc.message}", option="size", path=path) from None
    try:
        header = header_cluster(o, a)
    except CreateError as exc:
        raise CreateError(f"{path}: {exc.message}", path=path) from None
    data_path = None
    if o.data_file is not None:
        data_path = o.data_file
    return CreatePlan(path=path, options=o, header=header, file_length=a.file_length,
                      data_file_path=data_path, data_file_length=a.data_length, _alloc=a)


# --------------------------------------------------------------------------- writing

_FILE_MODE = 0o644          # what QEMU's file driver creates files with (before the umask)
_ZERO_CHUNK = 1 << 20


def _open_for_create(path: str) -> tuple[ImageWriter, bool]:
    """Open ``path`` for writing with QEMU's locks; create it if missing.

    Returns the writer and whether the file was created here.  An existing
    file is not truncated yet (that happens only when everything is known).
    """
    from .writer import ImageWriter

    created = False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                     _FILE_MODE)
        os.close(fd)
        created = True
    except FileExistsError:
        pass
    except OSError as exc:
        raise CreateError(f"Could not create '{path}': {exc.strerror}", path=path) from None
    try:
        return ImageWriter(path), created
    except BaseException:
        if created:
            os.unlink(path)
        raise


def _write_zeros(w: ImageWriter, offset: int, length: int) -> None:
    buf = bytes(min(length, _ZERO_CHUNK))
    end = offset + length
    while offset < end:
        n = min(len(buf), end - offset)
        w.pwrite(buf[:n] if n < len(buf) else buf, offset)
        offset += n


def _fill(w: ImageWriter, fill: tuple[int, int, str] | None) -> None:
    """The data area of falloc/full preallocation, as QEMU's file driver does it."""
    if fill is None:
        return
    start, end, mode = fill
    if end <= start:
        return
    if mode == "falloc":
        os.posix_fallocate(w.fd, start, end - start)
    else:
        _write_zeros(w, start, end - start)


def write_plan(p: CreatePlan) -> None:
    """Write the image (and its data file) that :func:`plan` computed.

    The files are created, or truncated when they exist, only now; QEMU's
    image locks are taken first (a file in use by QEMU is refused).  Order:
    data areas, metadata, fsync, header, fsync; a failure removes the files.
    """
    writers: list[ImageWriter] = []
    made: list[str] = []
    try:
        _write_plan(p, writers, made)
    except CreateError as exc:
        raise CreateError(f"{p.path}: {exc.message}", option=exc.option, path=p.path) from None
    except OSError as exc:
        if exc.errno == errno.EFBIG:   # the file system's limit; qemu-img says the same then
            raise ImageTooLargeError(f"{p.path}: {_efbig().message}", option="size",
                                     path=p.path) from None
        raise
    finally:
        for wr in writers:
            wr.close()


def _write_plan(p: CreatePlan, writers: list[ImageWriter], made: list[str]) -> None:
    """Open (locked) both files, then truncate and write them; on failure remove the files
    created here and the ones already truncated (their old content is gone anyway, and
    QEMU removes them too), never a file that was only opened."""
    existing: list[str] = []
    try:
        w, created = _open_for_create(p.path)
        writers.append(w)
        (made if created else existing).append(p.path)
        dw = None
        if p.data_file_path is not None:
            # QEMU 7.2 creates a relative data file name relative to its working
            # directory (not the image's), and stores the name as given
            dw, created = _open_for_create(p.data_file_path)
            writers.append(dw)
            (made if created else existing).append(p.data_file_path)
        made.extend(existing)
        w.truncate(0)
        w.truncate(p.file_length)
        if dw is not None:
            dw.truncate(0)
            dw.truncate(p.data_file_length)
            for off, n in p.data_zero_writes:
                _write_zeros(dw, off, n)
            _fill(dw, p.data_fill)
            dw.sync()
        _fill(w, p.fill)
        for off, n in p.zero_writes:
            _write_zeros(w, off, n)
        for off, chunk in p.metadata_chunks():
            if off + len(chunk) > p.file_length:
                raise AssertionError(f"metadata at {off:#x} beyond the planned file end")
            w.pwrite(chunk, off)
        w.sync()
        w.pwrite(p.header, 0)
        w.sync()
    except BaseException:
        for wr in writers:
            wr.close()
        for path in made:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise


@dataclass
class CreateRequest:
    """The arguments of one ``qemu-img create``, as text (what the command line gives)."""

    filename: str
    size: str | None = None
    options: Sequence[str] = ()
    backing_file: str | None = None
    backing_fmt: str | None = None
    unsafe: bool = False            # -u: do not open the backing file


@dataclass
class Prepared:
    """A validated request: the plan, the line qemu-img prints and any warnings."""

    plan: CreatePlan
    formatting: str
    warnings: list[str]


def prepare(req: CreateRequest) -> Prepared:
    """Parse and validate ``req`` exactly as qemu-img does, and compute the whole image.

    Raises :class:`CreateError` (the message is what qemu-img would say) and
    touches no file.
    """
    for text in req.options:
        if not is_valid_option_list(text):
            raise CreateError(f"Invalid option list: {text}")
    warnings: list[str] = []
    size = None
    if req.size is not None:
        size, warnings = parse_image_size(req.size)
    try:
        opts = parse_option_lists(req.options)
    except CreateError as exc:
        raise _file_error(req.filename, exc.message, exc.option) from None
    sized = _check_img_create(req.filename, opts, size, req.backing_file, req.backing_fmt,
                              not req.unsafe, _backing_size_for(req.filename))
    line = formatting_line(req.filename, opts)
    try:   # qemu-img has printed the Formatting line when these fail
        return Prepared(plan(req.filename, _check_qcow2_create(req.filename, opts, sized)),
                        line, warnings)
    except CreateError as exc:
        exc.formatting = line
        raise


def _backing_size_for(filename: str) -> Callable[[str, str], tuple[int, str]]:
    def size_of(path: str, fmt: str) -> tuple[int, str]:
        try:
            return backing_virtual_size(path, fmt)
        except CreateError as exc:
            raise _file_error(filename, exc.message, "backing_file") from None
        except Qcow2Error as exc:
            raise _file_error(filename, f"Could not open backing file '{path}': "
                                        f"{exc.message}", "backing_file") from None
    return size_of


def create(filename: str, size: int | str | None = None, *,
           options: Mapping[str, object] | Sequence[str] = (),
           backing_file: str | None = None, backing_fmt: str | None = None,
           unsafe: bool = False) -> CreatePlan:
    """Create ``filename`` like ``qemu-img create -f qcow2`` and return what was written.

    ``options`` are qemu-img's ``-o`` options, either as ``-o`` strings or as a
    mapping (``{"cluster_size": 4096, "lazy_refcounts": True}``).
    """
    if isinstance(options, Mapping):
        items = []
        for k, v in options.items():
            text = ("on" if v else "off") if isinstance(v, bool) else str(v)
            items.append(f"{k}={text.replace(',', ',,')}")
        opt_lists: Sequence[str] = [",".join(items)] if items else []
    else:
        opt_lists = list(options)
    prepared = prepare(CreateRequest(filename, None if size is None else str(size), opt_lists,
                                     backing_file, backing_fmt, unsafe))
    write_plan(prepared.plan)
    return prepared.plan
