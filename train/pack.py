"""Pack a brain-window training cache small enough to carry to a GPU machine, and unpack it there.

    python -m train.pack CACHE PACK                  # lossless: images.u8.xz + metadata.parquet + cache.json
    python -m train.pack CACHE PACK --quality 40     # lossy WebP: images.webp + webp_lengths.npy + the rest
    python -m train.pack --unpack PACK CACHE         # a finished cache again, for train.fit / train.bundle --cache

A brain-input cache repeats one channel three times (:data:`ich.windowing.BRAIN_INPUT`), so the
pack keeps one channel. What a lent GPU machine receives is capped at 64 MiB, the checkout
included (about 25 MiB, most of it the bundled float16 weights), and ``../shared`` does not travel:
so about 38 MiB are left for the pack. Lossless LZMA gives about 52 MiB at 160 px; WebP at quality 40
gives 13.5 MiB at 192 px (18.2 MiB at 256) with a mean error of 2.57 grey levels (0.8 HU in the 0-80 HU brain
window, well under CT noise; the README's fold-0 table says what that costs a model). The pack records its quality and measured error in ``cache.json``,
and so does the cache unpacked from it, so a model trained on it says what it saw. A lossless
pack unpacks byte for byte.
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

import cv2
import numpy as np
from tqdm import tqdm

from train.data import IMAGES, INFO, METADATA, Cache, write_info

__all__ = ["pack", "unpack", "main"]

PACKED = "images.u8.xz"
PACKED_WEBP = "images.webp"
WEBP_LENGTHS = "webp_lengths.npy"


def _webp(channel: np.ndarray, quality: int) -> tuple[bytes, np.ndarray, float]:
    """Every slice WebP-encoded at ``quality``: the concatenated bytes, their lengths and the mean abs error."""
    blobs, errors = [], []
    for image in tqdm(channel, desc=f"webp q{quality}", unit="slice", leave=False):
        ok, buf = cv2.imencode(".webp", image, [cv2.IMWRITE_WEBP_QUALITY, quality])
        if not ok:
            raise SystemExit(f"OpenCV could not encode WebP at quality {quality}")
        blobs.append(buf.tobytes())
        errors.append(np.abs(_decode(blobs[-1]).astype(np.int16) - image).mean())
    return b"".join(blobs), np.array([len(b) for b in blobs], np.int64), float(np.mean(errors))


def _decode(blob: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise SystemExit("a WebP slice in the pack does not decode: the pack is damaged; pack the cache again")
    return image


def pack(cache: str | os.PathLike, out: str | os.PathLike, quality: int | None = None) -> Path:
    """Write ``out/`` from the finished cache ``cache``, lossless or (``quality`` 1-100) as WebP.

    Refuses caches whose channels differ.
    """
    source = Cache.open(cache)
    images = source.images
    channel = np.ascontiguousarray(images[:, 0])
    if any(not np.array_equal(channel, images[:, c]) for c in range(1, images.shape[1])):
        raise SystemExit(
            f"{cache}: its channels differ (input {source.info.get('input')!r}); only a one-window cache packs to one channel"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = source.info | {"packed_channels": int(images.shape[1])}
    if quality is None:
        (out / PACKED).write_bytes(lzma.compress(channel.tobytes(), preset=6))
    else:
        if not 1 <= quality <= 100:
            raise SystemExit(f"--quality {quality}: WebP quality runs from 1 to 100")
        blob, lengths, error = _webp(channel, quality)
        (out / PACKED_WEBP).write_bytes(blob)
        np.save(out / WEBP_LENGTHS, lengths)
        info |= {"webp_quality": quality, "webp_mean_abs_error": round(error, 3)}
    shutil.copy2(source.root / METADATA, out / METADATA)
    write_info(out, info)
    return out


def unpack(packed: str | os.PathLike, out: str | os.PathLike) -> Cache:
    """A finished cache in ``out`` from a pack made by :func:`pack` (its WebP quality kept in the cache's info)."""
    packed, out = Path(packed), Path(out)
    info = json.loads((packed / INFO).read_text())
    channels, size, n = int(info.pop("packed_channels")), int(info["size"]), int(info["n"])
    out.mkdir(parents=True, exist_ok=True)
    images = np.lib.format.open_memmap(out / IMAGES, mode="w+", dtype=np.uint8, shape=(n, channels, size, size))
    if "webp_quality" in info:
        blob = (packed / PACKED_WEBP).read_bytes()
        ends = np.cumsum(np.load(packed / WEBP_LENGTHS))
        if len(ends) != n or ends[-1] != len(blob):
            raise SystemExit(f"{packed}: {PACKED_WEBP} does not hold the {n} slices its {INFO} names")
        for i, (start, end) in enumerate(zip(np.r_[0, ends[:-1]], ends)):
            images[i] = _decode(blob[start:end])[None]
    else:
        channel = np.frombuffer(lzma.decompress((packed / PACKED).read_bytes()), np.uint8).reshape(n, size, size)
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
    parser.add_argument(
        "--quality", type=int, default=None, help="WebP quality 1-100 (lossy, far smaller); default: lossless LZMA"
    )
    args = parser.parse_args(argv)
    if args.unpack:
        cache = unpack(args.source, args.out)
        print(f"{cache.root}: {len(cache.frame)} slices at {cache.size} px")
    else:
        out = pack(args.source, args.out, args.quality)
        size = sum(p.stat().st_size for p in out.iterdir()) / 2**20
        info = json.loads((out / INFO).read_text())
        lossy = f", WebP q{args.quality}, mean error {info['webp_mean_abs_error']} grey levels" if args.quality else ""
        print(f"{out}: {size:.1f} MiB{lossy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
