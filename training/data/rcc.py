"""Read the files inside a Qt resource (.rcc) file, formats 1 to 3, as GCompris ships its images.

Layout (all integers big-endian): a header `qres`, version, then the offsets of the tree, data and names sections
(version 3 adds a flags word). The tree is an array of fixed-size entries, the first one the root directory:
name offset (u32), flags (u16; 2 = directory, 1 = zlib, 4 = zstd), then for a directory the child count and the
index of its first child (u32 each), for a file country and language (u16 each) and its data offset (u32); from
version 2 every entry carries a u64 modification time as well. A name is a u16 length, a u32 hash and UTF-16BE
characters; a data blob is a u32 size and the bytes, zlib blobs starting with Qt's 4-byte uncompressed length.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator

DIRECTORY = 0x02
COMPRESSED_ZLIB = 0x01
COMPRESSED_ZSTD = 0x04


class RccError(ValueError):
    """The bytes are not a Qt resource file this reader understands."""


def iter_rcc(data: bytes) -> Iterator[tuple[str, bytes]]:
    """Yield (path, file bytes) for every file in a Qt resource file, paths like `/gcompris/x.webp`, sorted."""
    if data[:4] != b"qres":
        raise RccError("not a Qt resource file (no 'qres' magic)")
    version, tree_offset, data_offset, names_offset = struct.unpack_from(">IIII", data, 4)
    if version not in (1, 2, 3):
        raise RccError(f"Qt resource format version {version} is not supported (1 to 3 are)")
    entry_size = 14 if version == 1 else 22

    def name_at(offset: int) -> str:
        (length,) = struct.unpack_from(">H", data, names_offset + offset)
        start = names_offset + offset + 6  # u16 length, u32 hash
        return data[start : start + 2 * length].decode("utf-16-be")

    def blob_at(offset: int, flags: int) -> bytes:
        (size,) = struct.unpack_from(">I", data, data_offset + offset)
        blob = data[data_offset + offset + 4 : data_offset + offset + 4 + size]
        if flags & COMPRESSED_ZLIB:
            return zlib.decompress(blob[4:])  # qCompress: u32 uncompressed length, then a zlib stream
        if flags & COMPRESSED_ZSTD:
            raise RccError("zstd-compressed Qt resources are not supported")
        return blob

    files: list[tuple[str, bytes]] = []
    pending = [(0, "")]  # (entry index, path of its parent directory)
    while pending:
        index, parent = pending.pop()
        position = tree_offset + index * entry_size
        name_offset, flags = struct.unpack_from(">IH", data, position)
        path = parent if index == 0 else f"{parent}/{name_at(name_offset)}"
        if flags & DIRECTORY:
            count, first_child = struct.unpack_from(">II", data, position + 6)
            pending.extend((child, path) for child in range(first_child, first_child + count))
        else:
            (blob_offset,) = struct.unpack_from(">I", data, position + 10)
            files.append((path, blob_at(blob_offset, flags)))
    yield from sorted(files)


def write_rcc(files: dict[str, bytes], version: int = 2, compress: bool = True) -> bytes:
    """Build a Qt resource file holding `files` ({'/dir/name.png': bytes}), for tests of the reader."""
    tree: dict = {}
    for path, blob in files.items():
        node = tree
        *directories, leaf = path.strip("/").split("/")
        for directory in directories:
            node = node.setdefault(directory, {})
        node[leaf] = blob

    names = bytearray()
    name_offsets: dict[str, int] = {}
    payload = bytearray()
    entries: list[bytes] = []
    entry_names: dict[int, int] = {0: 0}  # entry index -> name offset; the root has no name
    time_field = b"" if version == 1 else struct.pack(">Q", 0)

    def name_offset(name: str) -> int:
        if name not in name_offsets:
            encoded = name.encode("utf-16-be")
            name_offsets[name] = len(names)
            names.extend(struct.pack(">HI", len(name), zlib.crc32(encoded)) + encoded)
        return name_offsets[name]

    # Breadth-first, so each directory's children sit at consecutive indices, as rcc lays them out.
    entries.append(b"")  # the root, filled in below
    queue: list[tuple[int, dict]] = [(0, tree)]
    while queue:
        index, node = queue.pop(0)
        children = sorted(node.items())
        first_child = len(entries)
        entries.extend(b"" for _ in children)
        entries[index] = struct.pack(">IHII", entry_names[index], DIRECTORY, len(children), first_child) + time_field
        for offset, (name, value) in enumerate(children, start=first_child):
            entry_names[offset] = name_offset(name)
            if isinstance(value, dict):
                queue.append((offset, value))
            else:
                flags = 0
                blob = value
                if compress:
                    flags = COMPRESSED_ZLIB
                    blob = struct.pack(">I", len(value)) + zlib.compress(value)
                entries[offset] = struct.pack(">IHHHI", entry_names[offset], flags, 0, 0, len(payload)) + time_field
                payload.extend(struct.pack(">I", len(blob)) + blob)

    header_size = 20 if version < 3 else 24
    tree_bytes = b"".join(entries)
    tree_offset = header_size
    data_offset = tree_offset + len(tree_bytes)
    names_offset = data_offset + len(payload)
    header = b"qres" + struct.pack(">IIII", version, tree_offset, data_offset, names_offset)
    if version >= 3:
        header += struct.pack(">I", 0)
    return header + tree_bytes + bytes(payload) + bytes(names)
