"""The tar layer of the shard format: member headers written and read here, not by tarfile.

Every stage writes its output and reads its input through this, so its cost is paid on every
sample of every stage. tarfile's generic code cost ~28 µs per member to read and ~25 µs to
write (more than copying a 20 KB image), so the few header forms shards use are handled here
directly: about a tenth of that (make bench: shard_write, shard_read).

Writing emits what tarfile writes for the same member in PAX format (tested byte for byte).
Reading accepts what tarfile, GNU tar and bsdtar write for regular files (ustar, PAX extended
and global headers, GNU long names, base-256 sizes) and hands every other member type to the
caller as not regular, to be refused; a header with a bad checksum, a malformed number, or a
stream that ends inside a member is an error, never a silently shorter shard.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from typing import IO, Callable, Iterator

BLOCK, RECORD = tarfile.BLOCKSIZE, tarfile.RECORDSIZE
USTAR_SIZE_LIMIT = 8**11
"""The first size a ustar header's 11 octal digits cannot hold (8 GiB)."""
MAX_EXTENDED_HEADER = 1 << 20
"""A PAX or GNU long-name header is metadata: one larger than this is refused, not read."""
_ZERO_BLOCK = bytes(BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_NO_DATA = (tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.DIRTYPE, tarfile.CHRTYPE, tarfile.BLKTYPE, tarfile.FIFOTYPE)
"""Member types whose data tarfile never reads, whatever their size field says; an unknown
type's data is skipped like a file's."""


class TarFormatError(ValueError):
    pass


def member_header(name: str, size: int) -> bytes:
    """The header of a regular file of mode 0o444 and mtime 0, byte for byte what tarfile
    (Python 3.11's later releases and after) writes in PAX format. An ASCII name of up to 100
    characters and a size under 8 GiB make one ustar block, formatted here; anything else goes
    through tarfile, which adds the PAX extended header."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= USTAR_SIZE_LIMIT or not name.isascii():
        info = tarfile.TarInfo(name)
        info.size, info.mode = size, 0o444
        return info.tobuf(tarfile.PAX_FORMAT)
    header = bytearray(BLOCK)
    header[0:len(encoded)] = encoded
    # mode, uid, gid, size, mtime
    header[100:148] = b"0000444\x000000000\x000000000\x00%011o\x00" % size + b"00000000000\x00"
    header[148:156] = b"        "  # the checksum is summed with its own field as spaces
    header[156] = ord(tarfile.REGTYPE)
    header[257:265] = tarfile.POSIX_MAGIC  # uname, gname, devmajor and devminor stay empty
    header[148:155] = b"%06o\x00" % sum(header)
    return bytes(header)


def end_of_archive(offset: int) -> bytes:
    """Two zero blocks, then zeros to a whole record, as tarfile closes an archive."""
    end = 2 * BLOCK
    return bytes(end + -(offset + end) % RECORD)


@dataclass(frozen=True)
class Member:
    name: str
    regular: bool
    """A regular file; anything else (link, folder, device, fifo) is for the caller to refuse."""
    offset: int
    """Where its data starts in the tar."""
    size: int
    data: bytes | None
    """Its bytes, if `wanted` asked for them."""


def _number(field: bytes, what: str, at: int) -> int:
    if field[:1] and field[0] & 0x80:  # GNU's base-256, for sizes past 8 GiB
        if field[0] == 0xFF:
            raise TarFormatError(f"a negative {what} in the header at byte {at}")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        raise TarFormatError(f"a malformed {what} {digits[:20]!r} in the header at byte {at}") from None


def _pax_records(data: bytes, at: int) -> dict[str, str]:
    """`<length> <key>=<value>\\n` records (POSIX pax)."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError:
            raise TarFormatError(f"a malformed PAX record in the header at byte {at}") from None
        if space < 0 or length <= space - pos or pos + length > len(data):
            raise TarFormatError(f"a malformed PAX record in the header at byte {at}")
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        records[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return records


def _signed_checksum(header: bytes) -> int:
    """Some old tars summed the header as signed chars; tarfile accepts both sums."""
    return 256 + sum(b - 256 if b > 127 else b for b in header[:148] + header[156:])


def _read_exactly(f: IO[bytes], size: int, what: str, at: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise TarFormatError(f"the tar ends inside {what} at byte {at} ({len(data)} of {size} bytes)")
    return data


def _skip(f: IO[bytes], size: int, what: str, at: int, seek: bool) -> None:
    if not size:
        return
    if seek:
        f.seek(size - 1, 1)  # the last byte is read, so a tar cut short is still found
        _read_exactly(f, 1, what, at)
    else:
        while size:
            size -= len(_read_exactly(f, min(size, 1 << 20), what, at))


def members(f: IO[bytes], wanted: Callable[[str], bool] = lambda _: True, seek: bool = False) -> Iterator[Member]:
    """The members of a tar read from `f` in order, as a stream. `wanted(name)` says which
    regular members' bytes to read; the others are read past, or with `seek` (a local file,
    where a seek costs nothing) seeked over."""
    offset = 0
    pax: dict[str, str] = {}
    long_name: str | None = None
    while True:
        header = f.read(BLOCK)
        if not header:
            if offset == 0:
                raise TarFormatError("an empty file, not a tar")
            return  # no end-of-archive blocks: tarfile accepts that too
        if len(header) < BLOCK:
            raise TarFormatError(f"the tar ends inside the header at byte {offset}")
        if header == _ZERO_BLOCK:
            return
        try:
            stored = _number(header[148:156], "checksum", offset)
        except TarFormatError:
            stored = None
        if stored != 256 + sum(header[:148]) + sum(header[156:]) and stored != _signed_checksum(header):
            raise TarFormatError(f"a bad header checksum at byte {offset}: not a tar, or a damaged one")
        kind = header[156:157]
        size = _number(header[124:136], "size", offset)
        data_at = offset + BLOCK
        if kind in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.GNUTYPE_LONGNAME):
            if size > MAX_EXTENDED_HEADER:
                raise TarFormatError(f"an extended header of {size} bytes at byte {offset}")
            data = _read_exactly(f, size + -size % BLOCK, "an extended header", offset)[:size]
            if kind == tarfile.XHDTYPE:
                pax = _pax_records(data, offset)
            elif kind == tarfile.GNUTYPE_LONGNAME:
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            offset = data_at + size + -size % BLOCK
            continue
        name = header[0:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
        if header[257:262] == b"ustar" and header[345:346] != b"\x00":
            prefix = header[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            name = f"{prefix}/{name}"
        name = pax.get("path", long_name or name)
        if "size" in pax:
            size = _number(pax["size"].encode(), "PAX size", offset)
        pax, long_name = {}, None
        regular = kind in _REGULAR
        if kind in _NO_DATA:
            size = 0  # as tarfile reads them: whatever the header says, no data follows
        padding = -size % BLOCK
        if regular and wanted(name):
            data = _read_exactly(f, size, name, data_at)
            _skip(f, padding, name, data_at, seek)
        else:
            data = None
            _skip(f, size + padding, name, data_at, seek)
        yield Member(name, regular, data_at, size, data)
        offset = data_at + size + padding
