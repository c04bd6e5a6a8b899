"""The arguments of ``qemu-img create -f qcow2``, parsed and checked as QEMU 7.2 does.

The SIZE argument (``cvtnum``), the ``-o`` option lists (QemuOpts syntax:
``name=value,...``, ``,,`` for a comma, ``noname``, ``help``), the
"Formatting ..." line qemu-img prints, and qemu-img's rules in qemu-img's
order (``bdrv_img_create`` before that line, ``qcow2_co_create_opts`` and
``qcow2_co_create`` after it), ending in one :class:`CreateOptions`.  A
backing file is opened (through :class:`qcow2kit.image.Image`) only to take
its size.  Errors are :class:`CreateError` with qemu-img's message and the
option at fault.  Nothing here touches the new file: :mod:`qcow2kit.create`
plans and writes it.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from . import spec
from .errors import Qcow2Error
from .units import strtoull_prefix, qemu_strtosz

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


# --------------------------------------------------------------------------- constants

DEFAULT_CLUSTER_SIZE = 65536
_INT64_MAX = (1 << 63) - 1

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
        full = full_backing_name(filename, bfile)
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


def full_backing_name(filename: str, backing: str) -> str:
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


# --------------------------------------------------------------------------- a whole request


@dataclass(frozen=True)
class ReadRequest:
    """A ``create`` command line, checked: the options, qemu-img's line and its warnings."""

    options: CreateOptions
    formatting: str
    warnings: list[str]


def read_request(filename: str, size: str | None, option_lists: Sequence[str], *,
                 backing_file: str | None = None, backing_fmt: str | None = None,
                 unsafe: bool = False) -> ReadRequest:
    """Check the arguments of one ``qemu-img create`` as qemu-img does, in its order.

    ``size`` is the SIZE argument as text, ``option_lists`` the ``-o``
    arguments, ``unsafe`` is ``-u`` (the backing file is not opened).  An error
    raised after qemu-img would have printed its "Formatting" line carries that
    line in ``formatting``.
    """
    for text in option_lists:
        if not is_valid_option_list(text):
            raise CreateError(f"Invalid option list: {text}")
    warnings: list[str] = []
    value = None
    if size is not None:
        value, warnings = parse_image_size(size)
    try:
        opts = parse_option_lists(option_lists)
    except CreateError as exc:
        raise _file_error(filename, exc.message, exc.option) from None
    sized = _check_img_create(filename, opts, value, backing_file, backing_fmt, not unsafe,
                              _backing_size_for(filename))
    line = formatting_line(filename, opts)
    try:
        return ReadRequest(_check_qcow2_create(filename, opts, sized), line, warnings)
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
