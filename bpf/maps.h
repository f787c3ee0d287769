/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the sensor, each with a one-line comment: key -> value, units.
 *
 * Verdict maps and the config are pinned under PIN_DIR: BCC opens a pinned map
 * when the path exists and creates and pins it otherwise, so an agent that
 * restarts finds its verdicts (and the kernel keeps enforcing them while it is
 * down). Everything else is recreated with each load.
 */
#ifndef BOTWALL_MAPS_H
#define BOTWALL_MAPS_H

#include "common.h"

/* ---- verdicts (writer: sensor/verdicts.py) ---- */

/* client address -> verdict: passes, skipping block, throttle and tarpit */
BPF_TABLE_PINNED("hash", union addr16, struct verdict, allow_addr, VERDICT_TABLE_SIZE,
		 PIN_DIR "/allow_addr");
/* CIDR -> verdict: as allow_addr, for a prefix */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key, struct verdict, allow_cidr, CIDR_TABLE_SIZE,
		 PIN_DIR "/allow_cidr", BPF_F_NO_PREALLOC);
/* client address -> verdict: drop every packet to a watched port */
BPF_TABLE_PINNED("hash", union addr16, struct verdict, block_addr, VERDICT_TABLE_SIZE,
		 PIN_DIR "/block_addr");
/* CIDR -> verdict: drop, for a prefix */
BPF_TABLE_PINNED("lpm_trie", struct lpm_key, struct verdict, block_cidr, CIDR_TABLE_SIZE,
		 PIN_DIR "/block_cidr", BPF_F_NO_PREALLOC);
/* client->server 5-tuple -> verdict: drop one connection */
BPF_TABLE_PINNED("hash", struct flow_tuple, struct verdict, block_flow, VERDICT_TABLE_SIZE,
		 PIN_DIR "/block_flow");
/* client address -> token buckets (new connections/s, packets/s) */
BPF_TABLE_PINNED("hash", union addr16, struct throttle_entry, throttle, VERDICT_TABLE_SIZE,
		 PIN_DIR "/throttle");
/* client address -> SYNs to drop per new connection */
BPF_TABLE_PINNED("hash", union addr16, struct tarpit_entry, tarpit, VERDICT_TABLE_SIZE,
		 PIN_DIR "/tarpit");
/* ClientHello key (see common.h) -> verdict: drop the hello, block its flow */
BPF_TABLE_PINNED("hash", __u64, struct verdict, block_hello, VERDICT_TABLE_SIZE,
		 PIN_DIR "/block_hello");
/* client address -> verdict: its hellos pass a blocked key (a declared agent
 * that runs the same TLS stack as a blocked bot) */
BPF_TABLE_PINNED("hash", union addr16, struct verdict, hello_exempt, VERDICT_TABLE_SIZE,
		 PIN_DIR "/hello_exempt");
/* 0 -> runtime knobs, including which verdict maps may hold entries */
BPF_TABLE_PINNED("array", __u32, struct config, config, 1, PIN_DIR "/config");

/* ---- kernel-written state ---- */

/* server port -> enum watch_flag (0: not watched) */
BPF_ARRAY(watched_ports, __u8, 65536);
/* client->server 5-tuple of a tarpitted source -> SYNs dropped so far */
BPF_TABLE("lru_hash", struct flow_tuple, __u32, tarpit_syns, VERDICT_TABLE_SIZE);
/* client->server 5-tuple -> flow counters and timing (ns, bytes, µs) */
BPF_TABLE("lru_hash", struct flow_tuple, struct flow_state, flows, FLOW_TABLE_SIZE);
/* client address -> SYNs, flows, packets seen on watched ports */
BPF_TABLE("lru_hash", union addr16, struct source_state, sources, SOURCE_TABLE_SIZE);
/* enum counter_id -> count, per CPU */
BPF_PERCPU_ARRAY(counters, __u64, CTR_MAX);
/* 0 -> scratch record for variable-length payload events (the stack is 512 bytes) */
BPF_PERCPU_ARRAY(payload_scratch, struct payload_event, 1);
/* The coarse clock as last read on this CPU, and the jiffy it was read in.
 * Kernel only: never crosses to user space. */
struct tick_clock {
	__u64 jiffies;
	__u64 now_ns;
};
/* 0 -> this CPU's reading of the coarse clock for the current tick */
BPF_PERCPU_ARRAY(tick_clock, struct tick_clock, 1);
/* What botwall_xdp hands to botwall_hello. Kernel only: never crosses to
 * user space. */
struct tail_call_args {
	struct flow_tuple flow;
	__u32 payload_offset;
	__u32 payload_len;
	__u32 result; /* enum counter_id so far, counted if the callee passes */
};
/* 0 -> the packet being handed over (per CPU: XDP runs to completion on one
 * CPU, tail call included) */
BPF_PERCPU_ARRAY(tail_call_scratch, struct tail_call_args, 1);

/* The first HELLO_KEY_EXT_BUDGET bytes of a hello, read at once for its key. */
struct hello_head {
	__u8 b[HELLO_KEY_EXT_BUDGET];
};
/* 0 -> the hello botwall_hello is computing a key for (per CPU) */
BPF_PERCPU_ARRAY(hello_head_scratch, struct hello_head, 1);

/* Programs botwall_xdp tail-calls, each with a verifier budget of its own. */
enum tail_call {
	TAIL_CALL_HELLO = 0, /* botwall_hello: a new ClientHello */
	TAIL_CALL_MAX,
};
/* enum tail_call -> program, filled by sensor/loader.py */
BPF_PROG_ARRAY(tail_calls, TAIL_CALL_MAX);
/* every observation record, see enum event_type */
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);

#ifdef BOTWALL_ABI_CHECK
/* Never touched by the programs: a record that is no map's key or value gets a
 * ctypes class from BCC only through a map, so tests/test_abi.py builds with
 * -DBOTWALL_ABI_CHECK and compares these with sensor/abi.py. 0 -> record. */
BPF_ARRAY(abi_event_header, struct event_header, 1);
BPF_ARRAY(abi_syn_event, struct syn_event, 1);
BPF_ARRAY(abi_flow_end_event, struct flow_end_event, 1);
BPF_ARRAY(abi_http_response_event, struct http_response_event, 1);
#endif

#endif /* BOTWALL_MAPS_H */
