"""The few libbpf calls bcc 0.26 has no Python binding for, through ctypes.

BPF_PROG_TEST_RUN (tests and benchmarks run the real program on a packet
without a network), and reading a program's name by id (to tell our own
attached program from someone else's).
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from functools import cache

from sensor.errors import MapError


class _TestRunOpts(ctypes.Structure):
    """struct bpf_test_run_opts, libbpf >= 0.7 (sz first: libbpf checks it)."""

    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _ProgInfo(ctypes.Structure):
    """The head of struct bpf_prog_info, up to the name (uapi/linux/bpf.h)."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


@cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL("libbpf.so.1", use_errno=True)
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
    lib.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
    lib.bpf_obj_get_info_by_fd.argtypes = [
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_uint32),
    ]
    return lib


@dataclass(frozen=True)
class TestRunResult:
    retval: int  # the program's return value (an XDP action for XDP)
    duration_ns: int  # mean per repetition, as the kernel measured it
    data_out: bytes


XDP_ACTIONS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}


def prog_test_run(prog_fd: int, packet: bytes, repeat: int = 1) -> TestRunResult:
    """Runs the program on one packet, `repeat` times, in the kernel."""
    data_in = ctypes.create_string_buffer(packet, len(packet))
    out_size = max(len(packet), 64) + 256  # XDP may grow the packet at the head
    data_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts(
        sz=ctypes.sizeof(_TestRunOpts),
        data_in=ctypes.cast(data_in, ctypes.c_void_p),
        data_out=ctypes.cast(data_out, ctypes.c_void_p),
        data_size_in=len(packet),
        data_size_out=out_size,
        repeat=repeat,
    )
    rc = _lib().bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno() or -rc
        raise MapError(f"BPF_PROG_TEST_RUN on fd {prog_fd} failed: {os.strerror(err)}")
    return TestRunResult(opts.retval, opts.duration, data_out.raw[: opts.data_size_out])


def prog_name(prog_id: int) -> str | None:
    """The name of a loaded program, or None if it is gone or unreadable."""
    lib = _lib()
    fd = lib.bpf_prog_get_fd_by_id(prog_id)
    if fd < 0:
        return None
    try:
        info = _ProgInfo()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) != 0:
            return None
        return info.name.decode(errors="replace")
    finally:
        os.close(fd)
