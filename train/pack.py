"""Pack a brain-window training cache small enough to carry to a GPU machine, and unpack it there.

    python -m train.pack CACHE PACK              # PACK/: images.u8.xz + metadata.parquet + cache.json
    python -m train.pack --unpack PACK CACHE     # a finished cache again, for train.fit / train.bundle --cache

A brain-input cache repeats one channel three times (:data:`ich.windowing.BRAIN_INPUT`), so the
pack keeps one channel, LZMA-compressed: 5,498 slices at 160 px are about 52 MiB, inside what a
lent GPU machine receives (64 MiB), where ``../shared`` is not. The unpacked cache is byte for
byte the one that was packed.
"""

from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from train.data import IMAGES, INFO, METADATA, Cache, write_info

__all__ = ["pack", "unpack", "main"]

PACKED = "images.u8.xz"


def pack(cache: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write ``out/`` from the finished cache ``cache``; refuses caches whose channels differ."""
    source = Cache.open(cache)
    images = source.images
    channel = np.ascontiguousarray(images[:, 0])
    if any(not np.array_equal(channel, images[:, c]) for c in range(1, images.shape[1])):
        raise SystemExit(
            f"{cache}: its channels differ (input {source.info.get('input')!r}); only a one-window cache packs to one channel"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / PACKED).write_bytes(lzma.compress(channel.tobytes(), preset=6))
    shutil.copy2(source.root / METADATA, out / METADATA)
    write_info(out, source.info | {"packed_channels": int(images.shape[1])})
    return out


def unpack(packed: str | os.PathLike, out: str | os.PathLike) -> Cache:
    """A finished cache in ``out`` from a pack made by :func:`pack`."""
    packed, out = Path(packed), Path(out)
    info = json.loads((packed / INFO).read_text())
    channels, size, n = int(info.pop("packed_channels")), int(info["size"]), int(info["n"])
    channel = np.frombuffer(lzma.decompress((packed / PACKED).read_bytes()), np.uint8).reshape(n, size, size)
    out.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(out / IMAGES, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
    images[:] = channel[:, None]
    images.flush()
    shutil.copy2(packed / METADATA, out / METADATA)
    write_info(out, info)
    return Cache.open(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pack a brain-window cache to carry, or unpack one")
    parser.add_argument("source", type=Path, help="CACHE to pack, or PACK with --unpack")
    parser.add_argument("out", type=Path, help="PACK folder to write, or CACHE with --unpack")
    parser.add_argument("--unpack", action="store_true")
    args = parser.parse_args(argv)
    if args.unpack:
        cache = unpack(args.source, args.out)
        print(f"{cache.root}: {len(cache.frame)} slices at {cache.size} px")
    else:
        out = pack(args.source, args.out)
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        print(f"{out}: {size:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
