"""sensor/abi.py against bpf/common.h, by machine: every struct's size and every field's
offset, size and type, recursively, compared with the ctypes classes BCC builds from
the C; and every enum value and record version read out of the header itself.
"""

from __future__ import annotations

import ctypes
import enum
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sensor import abi
from tests.kernel import KernelSensor, loaded_sensor

COMMON_H = Path(__file__).resolve().parents[1] / "bpf/common.h"

# Where BCC shows each struct: as the key or the value (Leaf) of a map. The records
# that are no map's key or value get a map of their own under -DBOTWALL_ABI_CHECK
# (bpf/maps.h). The real maps are used wherever they exist, so the test also checks
# that each map holds the type user space reads from it.
BCC_CLASS: dict[str, tuple[str, str]] = {
    "addr16": ("allow_addr", "Key"),
    "flow_tuple": ("flows", "Key"),
    "lpm_key": ("block_cidr", "Key"),
    "verdict": ("block_addr", "Leaf"),
    "throttle_entry": ("throttle", "Leaf"),
    "tarpit_entry": ("tarpit", "Leaf"),
    "config": ("config", "Leaf"),
    "flow_state": ("flows", "Leaf"),
    "source_state": ("sources", "Leaf"),
    "payload_event": ("payload_scratch", "Leaf"),
    "event_header": ("abi_event_header", "Leaf"),
    "syn_event": ("abi_syn_event", "Leaf"),
    "flow_end_event": ("abi_flow_end_event", "Leaf"),
    "http_response_event": ("abi_http_response_event", "Leaf"),
}

# ---- layout: a struct flattened to field path -> (offset, size, type) ----

Layout = dict[str, tuple[int, int, str]]
# BCC names the implicit padding it finds in a C struct __pad_N / __pad_end; ctypes
# pads the same way without naming it, and the offsets and sizes prove it did.
BCC_PADDING = "__pad"
_UNSIGNED, _SIGNED = "BHILQ", "bhilq"


def _type_tag(ctype: Any) -> str:
    """What matters of a field's type: aggregate kind, or scalar signedness and size
    (c_uint64 and c_ulong are the same thing on this ABI, c_char and c_int8 are not)."""
    if issubclass(ctype, ctypes.Union):
        return "union"
    if issubclass(ctype, ctypes.Structure):
        return "struct"
    if issubclass(ctype, ctypes.Array):
        return f"{_type_tag(ctype._type_)}[{ctype._length_}]"
    code = ctype._type_
    if code in _UNSIGNED:
        return f"u{ctypes.sizeof(ctype) * 8}"
    if code in _SIGNED:
        return f"s{ctypes.sizeof(ctype) * 8}"
    return {"c": "char"}.get(code, code)


def layout(cls: Any, path: str = "", base: int = 0) -> Layout:
    """Every field, nested ones included, at its absolute offset; the struct itself
    under its empty path, so its size and kind are compared too."""
    fields: Layout = {path: (base, ctypes.sizeof(cls), _type_tag(cls))} if not path else {}
    for name, ctype, *_bits in cls._fields_:
        if name.startswith(BCC_PADDING):
            continue
        descriptor = getattr(cls, name)
        where = f"{path}.{name}" if path else name
        offset = base + descriptor.offset
        fields[where] = (offset, descriptor.size, _type_tag(ctype))
        element = ctype._type_ if issubclass(ctype, ctypes.Array) else ctype
        if isinstance(element, type) and issubclass(element, ctypes.Structure | ctypes.Union):
            fields.update(layout(element, where if element is ctype else f"{where}[0]", offset))
    return fields


def drift(ours: Any, theirs: Any) -> list[str]:
    """Every difference between two layouts, readable; empty when they agree."""
    a, b = layout(ours), layout(theirs)
    problems = [f"{p or '<struct>'}: only in sensor/abi.py" for p in a.keys() - b.keys()]
    problems += [f"{p or '<struct>'}: only in the C" for p in b.keys() - a.keys()]
    for p in sorted(a.keys() & b.keys()):
        if a[p] != b[p]:
            problems.append(f"{p or '<struct>'}: abi.py (offset, size, type) {a[p]} != C {b[p]}")
    return sorted(problems)


@pytest.fixture(scope="module")
def abi_build() -> Iterator[KernelSensor]:
    with loaded_sensor(extra_cflags=("-DBOTWALL_ABI_CHECK",)) as kernel:
        yield kernel


def _bcc_class(kernel: KernelSensor, struct: str) -> Any:
    table, side = BCC_CLASS[struct]
    cls = getattr(kernel.sensor.table(table), side)
    # A per-CPU map's value is an array with one element per CPU.
    return cls._type_ if issubclass(cls, ctypes.Array) else cls


def _hidden_padding(cls: Any, base: int = 0) -> Iterator[tuple[int, int]]:
    for name, ctype, *_bits in cls._fields_:
        offset = base + getattr(cls, name).offset
        if name.startswith(BCC_PADDING):
            yield offset, getattr(cls, name).size
        elif isinstance(ctype, type) and issubclass(ctype, ctypes.Structure | ctypes.Union):
            yield from _hidden_padding(ctype, offset)


def test_every_struct_is_checked() -> None:
    assert set(BCC_CLASS) == set(abi.STRUCTS)


@pytest.mark.kernel
@pytest.mark.parametrize("struct", sorted(abi.STRUCTS))
def test_struct_matches_the_c(abi_build: KernelSensor, struct: str) -> None:
    theirs = _bcc_class(abi_build, struct)
    assert theirs.__name__ == struct, f"{BCC_CLASS[struct]} does not hold struct {struct}"
    assert drift(abi.STRUCTS[struct], theirs) == []


# Records the kernel sends: each names every byte it sends, so the kernel can set
# them all and never hands user space stale ring-buffer bytes.
RECORDS = ("event_header", "syn_event", "flow_end_event", "http_response_event")


@pytest.mark.kernel
@pytest.mark.parametrize("struct", RECORDS)
def test_record_has_no_hidden_padding(abi_build: KernelSensor, struct: str) -> None:
    assert list(_hidden_padding(_bcc_class(abi_build, struct))) == []


@pytest.mark.kernel
def test_payload_record_pads_only_after_its_data(abi_build: KernelSensor) -> None:
    """payload_event goes out cut at offsetof(data) + captured_len: its tail padding
    never leaves the kernel."""
    theirs = _bcc_class(abi_build, "payload_event")
    data_end = abi.PayloadEvent.data.offset + abi.PayloadEvent.data.size
    assert [offset for offset, _ in _hidden_padding(theirs)] == [data_end]


@pytest.mark.kernel
def test_drift_is_caught(abi_build: KernelSensor) -> None:
    """The comparison itself fails on the kinds of drift it exists for."""
    flow_state = _bcc_class(abi_build, "flow_state")
    fields = list(abi.FlowState._fields_)

    def variant(new_fields: list[tuple[str, Any]]) -> type[ctypes.Structure]:
        return type("flow_state", (ctypes.Structure,), {"_fields_": new_fields})

    swapped = fields[:]
    swapped[7], swapped[8] = swapped[8], swapped[7]  # packets <-> server_packets
    assert drift(variant(swapped), flow_state) == [
        "packets: abi.py (offset, size, type) (60, 4, 'u32') != C (56, 4, 'u32')",
        "server_packets: abi.py (offset, size, type) (56, 4, 'u32') != C (60, 4, 'u32')",
    ]
    renamed = [("pkts", t) if n == "packets" else (n, t) for n, t in fields]
    assert drift(variant(renamed), flow_state) == [
        "packets: only in the C",
        "pkts: only in sensor/abi.py",
    ]
    widened = [(n, ctypes.c_uint32) if n == "syn_count" else (n, t) for n, t in fields]
    assert "syn_count: abi.py (offset, size, type) (72, 4, 'u32') != C (72, 2, 'u16')" in (
        drift(variant(widened), flow_state)
    )
    signed = [(n, ctypes.c_int32) if n == "gap_count" else (n, t) for n, t in fields]
    assert drift(variant(signed), flow_state) == [
        "gap_count: abi.py (offset, size, type) (68, 4, 's32') != C (68, 4, 'u32')"
    ]
    # A nested struct: eight bytes less of reason move everything after the verdict.
    short_reason = type(
        "verdict",
        (ctypes.Structure,),
        {"_fields_": [*abi.Verdict._fields_[:2], ("reason", ctypes.c_char * 40)]},
    )
    tarpit = type(
        "tarpit_entry",
        (ctypes.Structure,),
        {"_fields_": [("v", short_reason), *abi.TarpitEntry._fields_[1:]]},
    )
    assert drift(tarpit, _bcc_class(abi_build, "tarpit_entry")) == [
        "<struct>: abi.py (offset, size, type) (0, 64, 'struct') != C (0, 72, 'struct')",
        "pad: abi.py (offset, size, type) (60, 4, 'u32') != C (68, 4, 'u32')",
        "syns_to_drop: abi.py (offset, size, type) (56, 4, 'u32') != C (64, 4, 'u32')",
        "v.reason: abi.py (offset, size, type) (16, 40, 'char[40]') != C (16, 48, 'char[48]')",
        "v: abi.py (offset, size, type) (0, 56, 'struct') != C (0, 64, 'struct')",
    ]


# ---- enums, versions and sizes, read from the header text ----


def _c_enums() -> dict[str, dict[str, int]]:
    """enum name -> {member: value}, with C's implicit numbering."""
    text = re.sub(r"/\*.*?\*/", "", COMMON_H.read_text(), flags=re.S)
    enums: dict[str, dict[str, int]] = {}
    for name, body in re.findall(r"enum\s+(\w+)\s*\{(.*?)\};", text, flags=re.S):
        members: dict[str, int] = {}
        value = -1
        for entry in filter(None, (e.strip() for e in body.split(","))):
            member, _, expr = (part.strip() for part in entry.partition("="))
            value = _c_int(expr) if expr else value + 1
            members[member] = value
        enums[name] = members
    return enums


def _c_int(expr: str) -> int:
    shift = re.fullmatch(r"(\d+)\s*<<\s*(\d+)", expr)
    return int(shift[1]) << int(shift[2]) if shift else int(expr, 0)


def _c_defines() -> dict[str, str]:
    return dict(re.findall(r"^#define\s+(\w+)\s+(\S+)", COMMON_H.read_text(), flags=re.M))


ENUMS: dict[str, tuple[str, type[enum.Enum]]] = {
    "verdict_kind_bit": ("VERDICT_", abi.VerdictKind),
    "watch_flag": ("WATCH_", abi.WatchFlag),
    "flow_flag": ("FLOW_", abi.FlowFlag),
    "counter_id": ("CTR_", abi.Counter),
    "event_type": ("EVENT_", abi.EventType),
    "syn_quirk": ("QUIRK_", abi.SynQuirk),
    "flow_end_reason": ("FLOW_END_", abi.FlowEndReason),
}


def test_every_enum_is_mirrored() -> None:
    assert set(_c_enums()) == set(ENUMS)


@pytest.mark.parametrize("c_name", sorted(ENUMS))
def test_enum_matches_the_c(c_name: str) -> None:
    prefix, mirror = ENUMS[c_name]
    c_members = {m.removeprefix(prefix): v for m, v in _c_enums()[c_name].items()}
    assert c_members == {m.name: m.value for m in mirror}


def test_versions_and_sizes_match_the_c() -> None:
    defines = _c_defines()
    for name in (
        "SYN_EVENT_VERSION",
        "PAYLOAD_EVENT_VERSION",
        "FLOW_END_EVENT_VERSION",
        "HTTP_RESPONSE_EVENT_VERSION",
        "REASON_LEN",
        "TCP_OPTIONS_MAX_BYTES",
        "HELLO_MAX_SEGMENTS",
        "HELLO_MAX_BYTES",
        "HELLOS_PER_FLOW",
        "HTTP_HEAD_MAX_BYTES",
    ):
        assert int(defines[name], 0) == getattr(abi, name), name
    for name in ("HELLO_KEY_MAX_CIPHERS", "HELLO_KEY_MAX_EXTENSIONS", "HELLO_KEY_EXT_BUDGET"):
        assert int(defines[name]) == getattr(abi, name), name
    ull = ("GAP_CAP_US", "HELLO_KEY_FNV_OFFSET", "HELLO_KEY_FNV_PRIME", "HELLO_KEY_EXT_MIX",
           "HELLO_FLOW_BLOCK_NS")  # fmt: skip
    for name in ull:
        assert int(defines[name].removesuffix("ULL"), 0) == getattr(abi, name), name
    assert defines["PAYLOAD_MAX_BYTES"] == "HELLO_MAX_BYTES"


def test_every_c_struct_is_mirrored() -> None:
    declared = re.findall(r"^(?:struct|union)\s+(\w+)\s*\{", COMMON_H.read_text(), flags=re.M)
    assert sorted(declared) == sorted(abi.STRUCTS)
