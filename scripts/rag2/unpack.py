#!/usr/bin/env python3
"""Restore an exported model folder from what a GPU call sends back (train.py --pack):
model-*.safetensors.bp.xz shards (byte-plane xz) + model_small_files.tar.

  python3 scripts/rag2/unpack.py FILES_AT_DIR OUT_MODEL_DIR
"""
import lzma
import os
import sys
import tarfile


def unbp(src):
    """inverse of scripts/rag2/train.py _xz (byte-plane xz of a bf16 safetensors file)"""
    with lzma.open(src, "rb") as f:
        b = f.read()
    n = int.from_bytes(b[:8], "little")
    head, planes = b[:8 + n], b[8 + n:]
    half = len(planes) // 2
    data = bytearray(len(planes))
    data[1::2] = planes[:half]
    data[0::2] = planes[half:]
    return head + bytes(data)


src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
with tarfile.open(os.path.join(src, "model_small_files.tar")) as t:
    t.extractall(dst)
for f in sorted(os.listdir(src)):
    if f.endswith(".safetensors.bp.xz"):
        with open(os.path.join(dst, f[:-6]), "wb") as b:
            b.write(unbp(os.path.join(src, f)))
print("\n".join(sorted(os.listdir(dst))))
