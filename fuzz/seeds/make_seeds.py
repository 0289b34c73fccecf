#!/usr/bin/env python3
"""Writes seed inputs (well-formed requests) for the fuzz targets, in mvm_fuzz::QueueInput layout:
4 control bytes (queue size selector, next_avail le16, target flags), then guest memory from 0:
descriptor table, avail ring right after it, buffers at 0x100.. ."""
import os
import struct

NEXT, WRITE = 1, 2


def queue_input(size_shift, flags, descs, buffers):
    size = 1 << size_shift
    mem = bytearray(0x1000)
    for i, (addr, length, dflags, nxt) in enumerate(descs):
        struct.pack_into("<QIHH", mem, 16 * i, addr, length, dflags, nxt)
    avail = 16 * size
    struct.pack_into("<HHH", mem, avail, 0, 1, 0)  # flags, idx = 1, ring[0] = head 0
    for addr, data in buffers:
        mem[addr:addr + len(data)] = data
    return bytes([size_shift, 0, 0, flags]) + bytes(mem)


def blk(req_type, sector, data_len, data_writable, payload=b""):
    header = struct.pack("<IIQ", req_type, 0, sector)
    descs = [(0x100, 16, NEXT, 1)]
    if data_len:
        descs.append((0x200, data_len, NEXT | (WRITE if data_writable else 0), 2))
    descs.append((0x800, 1, WRITE, 0))
    descs = [(a, l, f, i + 1 if f & NEXT else 0) for i, (a, l, f, _) in enumerate(descs)]
    return queue_input(2, 6, descs, [(0x100, header), (0x200, payload)])


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    seg = struct.pack("<QII", 1, 2, 1)
    seeds = {
        "block_request": {
            "read": blk(0, 1, 512, True),
            "write": blk(1, 2, 512, False, b"\x5a" * 512),
            "flush": blk(4, 0, 0, False),
            "get_id": blk(8, 0, 20, True),
            "discard": blk(11, 0, 16, False, struct.pack("<QII", 1, 2, 0)),
            "write_zeroes": blk(13, 0, 16, False, seg),
        },
        "rng_request": {
            "fill": queue_input(2, 0, [(0x200, 64, WRITE, 0)], []),
        },
    }
    for target, files in seeds.items():
        os.makedirs(os.path.join(here, target), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(here, target, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
