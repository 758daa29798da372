#!/usr/bin/env python3
"""Restore an exported model folder from what a GPU call sends back (train.py --pack):
model-*.safetensors.bp.xz shards (byte-plane xz) + model_small_files.tar (when present; the shipped
model keeps its small files in the model folder and the shards in its packed/ folder).

  python3 scripts/rag2/unpack.py FILES_AT_DIR OUT_MODEL_DIR
"""
import lzma
import os
import sys
import tarfile


def bp_xz(src, dst):
    """bf16 safetensors -> xz of (8-byte header length + header + high bytes + low bytes): the byte
    planes compress far better apart (the high bytes hold sign + exponent).  unbp() inverts it."""
    with open(src, "rb") as f:
        b = f.read()
    n = int.from_bytes(b[:8], "little")
    data = b[8 + n:]
    with lzma.open(dst, "wb", preset=6) as g:
        g.write(b[:8 + n])
        g.write(data[1::2])
        g.write(data[0::2])


def unbp(src):
    """bytes of the safetensors file packed by bp_xz."""
    with lzma.open(src, "rb") as f:
        b = f.read()
    n = int.from_bytes(b[:8], "little")
    head, planes = b[:8 + n], b[8 + n:]
    half = len(planes) // 2
    data = bytearray(len(planes))
    data[1::2] = planes[:half]
    data[0::2] = planes[half:]
    return head + bytes(data)


def main(src, dst):
    os.makedirs(dst, exist_ok=True)
    tar = os.path.join(src, "model_small_files.tar")
    if os.path.exists(tar):
        with tarfile.open(tar) as t:
            t.extractall(dst)
    for f in sorted(os.listdir(src)):
        if f.endswith(".safetensors.bp.xz"):
            with open(os.path.join(dst, f[:-6]), "wb") as b:
                b.write(unbp(os.path.join(src, f)))
    print("\n".join(sorted(os.listdir(dst))))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
