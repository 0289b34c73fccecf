#!/usr/bin/env python3
"""Writes seed inputs (well-formed requests) for the fuzz targets, in mvm_fuzz::QueueInput layout:
4 control bytes (queue size selector, next_avail le16, target flags), then guest memory from 0:
descriptor table, avail ring right after it, buffers at 0x100.. ."""
import json
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


# agent_protocol: byte 0 = chunk size (bits 0-5) and the host's request (bits 6-7), then frames.
REQUEST, RESPONSE, EVENT, STDIN, STDOUT, STDERR = range(1, 7)


def frame(kind, payload, stream=0):
    if not isinstance(payload, bytes):
        payload = json.dumps(payload, separators=(",", ":")).encode()
    return struct.pack(">IBI", len(payload), kind, stream) + payload


def agent(chunk, request, *frames):
    return bytes([chunk | request << 6]) + b"".join(frames)


SPEC = {
    "id": "main",
    "rootfs": {"overlay": {"lower": ["/mnt/rootfs"], "upper": "/run/mvm/upper",
                           "work": "/run/mvm/work"}},
    "process": {"args": ["sh", "-c", "echo hi"], "env": ["A=1"], "cwd": "/", "user": "1:1"},
    "hostname": "web",
    "limits": {"memory_bytes": 67108864, "cpus": 1.5, "pids_max": 64},
    "terminal": True,
    "network": "host",
}
HELLO_ANSWER = frame(RESPONSE, {"status": "hello", "version": 3, "agent": "0.1.0"})
EXITED = frame(EVENT, {"event": "exited", "id": "main", "stream": 2, "code": 0})
AGENT_SEEDS = {
    # What the host reads: answers, output and exits from the agent.
    "host_stats": agent(0, 0, HELLO_ANSWER, frame(STDOUT, b"early\n", 1), frame(RESPONSE, {
        "status": "stats", "stats": {
            "cpu_usec": 1, "memory_bytes": 2, "memory_limit": 3, "memory_total": 4, "pids": 5,
            "net_rx_bytes": 6, "net_tx_bytes": 7, "block_read_bytes": None,
            "block_write_bytes": 8, "online_cpus": 2}})),
    "host_top": agent(5, 1, HELLO_ANSWER, frame(RESPONSE, {"status": "processes", "processes": [
        {"pid": 7, "ppid": 1, "uid": 0, "started": 1700000000, "cpu_ms": 20,
         "command": "sh -c sleep 9"}]})),
    "host_exec": agent(3, 2, HELLO_ANSWER, frame(RESPONSE, {"status": "started", "stream": 2,
                                                           "pid": 9}),
                       frame(STDOUT, b"hi\n", 2), frame(STDERR, b"oops\n", 2), EXITED),
    "host_refused": agent(0, 3, HELLO_ANSWER,
                          frame(RESPONSE, {"status": "error", "message": "no such container"}),
                          frame(RESPONSE, {"status": "ok"})),
    # What the agent reads: a client's requests and stdin.
    "agent_session": agent(7, 0, *[frame(REQUEST, r) for r in [
        {"op": "hello", "version": 3},
        {"op": "create", "id": "main", "spec": SPEC},
        {"op": "start", "id": "main", "terminal": {"rows": 24, "cols": 80}},
        {"op": "exec", "id": "main", "process": {"args": ["ls"]}, "stdin": True},
        {"op": "resize", "id": "main", "stream": 1, "size": {"rows": 50, "cols": 200}},
        {"op": "attach", "id": "main", "stream": 1},
        {"op": "signal", "id": "main", "stream": 1, "signal": 15},
    ]], frame(STDIN, b"input\n", 2), frame(STDIN, b"", 2), frame(REQUEST, {"op": "shutdown"})),
    "agent_copies": agent(0, 0, *[frame(REQUEST, r) for r in [
        {"op": "hello", "version": 3},
        {"op": "setup", "boot": "mvm.rootfs=/dev/vda", "seed": "00ff" * 32,
         "time_ns": 1700000000000000000, "mac": [2, 1, 2, 3, 4, 5]},
        {"op": "stats", "id": "main"}, {"op": "top", "id": "main"},
        {"op": "copy_out", "id": "main", "path": "/etc/.", "follow": True},
        {"op": "copy_in", "id": "main", "path": "/srv", "keep_owner": True},
    ]]),
}

# mmio_transport: byte 0 = device (bit 0 block, bit 1 read-only), byte 1 = op count, 7 bytes per
# op (kind, offset le16, value le32), then guest memory. Kinds: 0x00 read 4 bytes, 0x08 write 4,
# 0x02 read 2, 0x03 read 8, 0xf0 save and restore.
R4, W4, R2, R8, SNAP = 0x00, 0x08, 0x02, 0x03, 0xf0


def mmio_op(kind, offset, value=0):
    return struct.pack("<BHI", kind, offset, value)


def driver_init(features_lo, queue_size, avail):
    """A virtio 1.x driver bringing the device up with queue 0 (desc at 0, used at 0x8000),
    notifying it, acknowledging the interrupt and reading the configuration space."""
    return [
        mmio_op(R4, 0x00), mmio_op(R4, 0x04), mmio_op(R4, 0x08), mmio_op(R4, 0x0c),
        mmio_op(W4, 0x70, 1), mmio_op(W4, 0x70, 3),
        mmio_op(W4, 0x14, 0), mmio_op(R4, 0x10), mmio_op(W4, 0x14, 1), mmio_op(R4, 0x10),
        mmio_op(W4, 0x24, 0), mmio_op(W4, 0x20, features_lo),
        mmio_op(W4, 0x24, 1), mmio_op(W4, 0x20, 1),
        mmio_op(W4, 0x70, 0xb), mmio_op(R4, 0x70),
        mmio_op(W4, 0x30, 0), mmio_op(R4, 0x34), mmio_op(R4, 0x44),
        mmio_op(W4, 0x38, queue_size),
        mmio_op(W4, 0x80, 0), mmio_op(W4, 0x84, 0),
        mmio_op(W4, 0x90, avail), mmio_op(W4, 0x94, 0),
        mmio_op(W4, 0xa0, 0x8000), mmio_op(W4, 0xa4, 0),
        mmio_op(W4, 0x44, 1),
        mmio_op(W4, 0x70, 0xf), mmio_op(R4, 0x70),
        mmio_op(W4, 0x50, 0),
        mmio_op(R4, 0x60), mmio_op(W4, 0x64, 1), mmio_op(R4, 0x60),
        mmio_op(R8, 0x100), mmio_op(R2, 0x100 + 34), mmio_op(R4, 0xfc),
    ]


def mmio(device_flags, ops, queue_seed):
    memory = queue_seed[4:]  # a QueueInput seed without its 4 control bytes
    return bytes([device_flags, len(ops)]) + b"".join(ops) + memory


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
    seeds["agent_protocol"] = AGENT_SEEDS
    # Queue size 4: the avail ring sits at 0x40, right after the descriptor table.
    rng_init = driver_init(1 << 29, 4, 0x40)
    blk_init = driver_init(1 << 9 | 1 << 14, 4, 0x40)
    seeds["mmio_transport"] = {
        "rng": mmio(0, rng_init, seeds["rng_request"]["fill"]),
        "rng_snapshot_reset": mmio(0, rng_init + [mmio_op(SNAP, 0), mmio_op(W4, 0x50, 0),
                                                  mmio_op(W4, 0x70, 0), mmio_op(R4, 0x70)],
                                   seeds["rng_request"]["fill"]),
        "block_write": mmio(1, blk_init, seeds["block_request"]["write"]),
        "block_read_snapshot": mmio(1, blk_init + [mmio_op(SNAP, 0)],
                                    seeds["block_request"]["read"]),
        "block_read_only": mmio(3, blk_init, seeds["block_request"]["get_id"]),
    }
    for target, files in seeds.items():
        os.makedirs(os.path.join(here, target), exist_ok=True)
        for name, data in files.items():
            with open(os.path.join(here, target, name), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()
