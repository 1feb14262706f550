"""The shard format's own tar reader (shardkit/tar.py) against tarfile and GNU tar: the same
members, names, sizes and data offsets for every header form other tools write, and a clear
error for a damaged tar instead of a shorter shard. The writer's bytes are checked against
tarfile's in test_shards.py."""

from __future__ import annotations

import io
import subprocess
import tarfile

import pytest

from shardkit import tar
from shardkit.shards import ShardFormatError, read_shard, scan_shard

FILES = {"short.jpg": b"a" * 10, "block.txt": b"b" * 512, "empty.json": b"", "odd.bin": b"c" * 1025,
         "k" * 130 + ".txt": b"a name past ustar's 100 characters", "caf\u00e9.txt": b"not ascii"}


def _tarfile_bytes(fmt: int, files: dict[str, bytes] = FILES) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as out:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read(data: bytes, seek: bool = False) -> list[tar.Member]:
    return list(tar.members(io.BytesIO(data), seek=seek))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("seek", [False, True])
def test_every_header_form_reads_as_tarfile_reads_it(fmt, seek):
    files = FILES if fmt != tarfile.USTAR_FORMAT else {  # ustar holds long names only as prefix/name
        k: v for k, v in FILES.items() if len(k) <= 100 and k.isascii()} | {"dir/" * 30 + "deep.txt": b"prefix"}
    data = _tarfile_bytes(fmt, files)
    ours = _read(data, seek)
    with tarfile.open(fileobj=io.BytesIO(data)) as theirs:
        expected = [(m.name, m.isfile(), m.offset_data, m.size, theirs.extractfile(m).read()) for m in theirs]
    assert [(m.name, m.regular, m.offset, m.size, m.data) for m in ours] == expected
    assert [m.name for m in ours] == list(files)


def test_a_tar_made_by_gnu_tar_reads(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    for name, data in (("0001.jpg", b"x" * 3000), ("0001.txt", b"caption"), ("0002.jpg", b"y" * 10)):
        (folder / name).write_bytes(data)
    subprocess.run(["tar", "-cf", str(tmp_path / "gnu.tar"), "-C", str(folder), "0001.jpg", "0001.txt", "0002.jpg"],
                   check=True)
    samples = list(read_shard(str(tmp_path / "gnu.tar")))
    assert [(s.key, s.fields) for s in samples] == [("0001", {"jpg": b"x" * 3000, "txt": b"caption"}),
                                                    ("0002", {"jpg": b"y" * 10})]


def test_a_base256_size_reads():
    """GNU tar and tarfile write sizes past 8 GiB in base-256; a small one, made by hand."""
    header = bytearray(tar.member_header("big.bin", 3))
    header[124:136] = b"\x80" + (3).to_bytes(11, "big")
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\x00" % sum(header)
    assert _read(bytes(header) + b"abc" + bytes(tar.BLOCK - 3))[0].data == b"abc"


@pytest.mark.parametrize("damage, message", [
    (lambda data: b"", "an empty file"),
    (lambda data: data[:700], "ends inside"),
    (lambda data: data[:300], "ends inside the header"),
    (lambda data: data[:100] + b"Z" + data[101:], "bad header checksum"),
    (lambda data: b"not a tar at all, just some text" * 40, "bad header checksum"),
])
def test_a_damaged_tar_is_an_error_not_a_shorter_shard(tmp_path, damage, message):
    data = _tarfile_bytes(tarfile.PAX_FORMAT, {"0001.jpg": b"x" * 1000, "0001.txt": b"t"})
    path = tmp_path / "bad.tar"
    path.write_bytes(damage(data))
    with pytest.raises(ShardFormatError, match=message):
        list(scan_shard(str(path)))


def test_an_unread_member_that_is_cut_short_is_still_found(tmp_path):
    """Seeking over a field nobody asked for must not hide a tar that ends inside it."""
    data = _tarfile_bytes(tarfile.PAX_FORMAT, {"0001.jpg": b"x" * 5000})
    path = tmp_path / "cut.tar"
    path.write_bytes(data[:3000])
    with pytest.raises(ShardFormatError, match="ends inside"):
        list(scan_shard(str(path), wanted=lambda _: False))


def test_an_oversized_extended_header_is_refused():
    header = bytearray(tar.member_header("././@PaxHeader", tar.MAX_EXTENDED_HEADER + 1))
    header[156] = ord(tarfile.XHDTYPE)
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\x00" % sum(header)
    with pytest.raises(tar.TarFormatError, match="extended header of"):
        _read(bytes(header))
