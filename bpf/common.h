/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every struct, enum and size that crosses the kernel/user boundary, and nowhere else in C.
 *
 * sensor/abi.py mirrors each struct here with ctypes; tests/test_abi.py compares
 * sizes and offsets with the classes BCC builds from this file. Change a record:
 * bump its version below and update sensor/abi.py and sensor/events.py.
 *
 * Addresses are 16 bytes for both families: IPv4 is stored IPv4-mapped
 * (::ffff:a.b.c.d), so one map serves IPv4 and IPv6 and an IPv4 CIDR a.b.c.d/n
 * is the LPM prefix ::ffff:a.b.c.d/(96+n). Ports are in host byte order.
 */
#ifndef BOTWALL_COMMON_H
#define BOTWALL_COMMON_H

/* ---- size defaults, each overridable with -D ---- */
#ifndef MAX_VLAN_DEPTH
#define MAX_VLAN_DEPTH 2 /* 802.1ad outer + 802.1Q inner */
#endif
#ifndef MAX_IPV6_EXT_HEADERS
#define MAX_IPV6_EXT_HEADERS 6
#endif
#ifndef HELLO_MAX_SEGMENTS
#define HELLO_MAX_SEGMENTS 2 /* a ClientHello larger than one MTU spans two */
#endif
#ifndef HELLO_MAX_BYTES
#define HELLO_MAX_BYTES 4096 /* per ClientHello, over all its segments */
#endif
#ifndef HELLOS_PER_FLOW
#define HELLOS_PER_FLOW 2 /* the first, and a second after a HelloRetryRequest */
#endif
#ifndef HTTP_HEAD_MAX_BYTES
#define HTTP_HEAD_MAX_BYTES 1024
#endif
#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 262144
#endif
#ifndef SOURCE_TABLE_SIZE
#define SOURCE_TABLE_SIZE 262144
#endif
#ifndef VERDICT_TABLE_SIZE
#define VERDICT_TABLE_SIZE 262144
#endif
#ifndef CIDR_TABLE_SIZE
#define CIDR_TABLE_SIZE 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 1024 /* 4 MiB */
#endif
#ifndef GAP_CAP_US
#define GAP_CAP_US 60000000ULL /* gaps are capped at 60 s so sum of squares cannot overflow */
#endif
#ifndef PIN_DIR
#define PIN_DIR "/sys/fs/bpf/botwall"
#endif

#define REASON_LEN 48
#define TCP_OPTIONS_MAX_BYTES 40 /* doff 15: 60-byte header, 20 fixed */
#define PAYLOAD_MAX_BYTES HELLO_MAX_BYTES /* the larger of the two captures */

/* ---- addresses and keys ---- */

union addr16 {
	__u8 b[16];
	__u32 w[4];
};

/* A TCP connection, oriented client -> server. */
struct flow_tuple {
	union addr16 saddr;
	union addr16 daddr;
	__u16 sport;
	__u16 dport;
	__u8 ip_version; /* 4 or 6 */
	__u8 pad[3];
};

/* LPM trie key: prefixlen counts bits of the 16-byte address. */
struct lpm_key {
	__u32 prefixlen;
	union addr16 addr;
};

/* ---- verdicts: written by user space (sensor/verdicts.py), read by XDP ---- */

enum verdict_kind_bit {
	VERDICT_ALLOW = 1 << 0,
	VERDICT_ALLOW_CIDR = 1 << 1,
	VERDICT_BLOCK = 1 << 2,
	VERDICT_BLOCK_CIDR = 1 << 3,
	VERDICT_BLOCK_FLOW = 1 << 4,
	VERDICT_THROTTLE = 1 << 5,
	VERDICT_TARPIT = 1 << 6,
	VERDICT_BLOCK_HELLO = 1 << 7, /* user space sets VERDICT_BLOCK_FLOW with it */
	VERDICT_HELLO_EXEMPT = 1 << 8,
};

/* Common head of every verdict value. The kernel ignores a verdict once its
 * monotonic clock passes expires_ns (read coarse: up to one tick late), so a dead
 * control plane cannot leave a client blocked for good. */
struct verdict {
	__u64 expires_ns; /* CLOCK_MONOTONIC */
	__u64 created_ns; /* CLOCK_MONOTONIC */
	char reason[REASON_LEN];
};

/* Per-source token buckets as GCRA: each bucket is one "theoretical arrival
 * time"; a packet conforms while tat - now <= tolerance. No division in the
 * kernel: user space precomputes interval = 1e9 / rate and tolerance =
 * interval * (burst - 1). A rate of 0 leaves that dimension unlimited. The tat
 * fields are written by the kernel without atomics: two CPUs racing may let one
 * extra packet through, never drop a conforming one for long. */
struct throttle_entry {
	struct verdict v;
	__u64 conn_interval_ns;
	__u64 conn_tolerance_ns;
	__u64 conn_tat_ns;
	__u64 pkt_interval_ns;
	__u64 pkt_tolerance_ns;
	__u64 pkt_tat_ns;
};

/* Drop the first syns_to_drop SYNs of every new connection from the source:
 * each costs the client one SYN retransmission timeout (1 s, then 2 s, ...). */
struct tarpit_entry {
	struct verdict v;
	__u32 syns_to_drop;
	__u32 pad;
};

/* ---- ClientHello keys: the kernel's stand-in for a blocked JA4 ----
 *
 * The kernel cannot compute a JA4 (it sorts lists and hashes with SHA-256), so
 * a JA4 verdict reaches it as the keys of the ClientHellos user space saw with
 * that JA4. A key is FNV-1a 64 over the cipher-suite list as sent (two bytes
 * each, big endian; at most HELLO_KEY_MAX_CIPHERS suites), GREASE values (RFC
 * 8701: 0x?a?a, both bytes equal) left out. If the whole hello, record header
 * included, is at most HELLO_KEY_EXT_BUDGET bytes, its extension types go in
 * too, as a set: their sum of (type + 1) * HELLO_KEY_EXT_MIX (mod 2^64), GREASE
 * left out, at most HELLO_KEY_MAX_EXTENSIONS extensions, is folded in as one
 * more FNV-1a round over its 8 bytes, least significant first. The cipher
 * list alone is OpenSSL's default in curl, wrk, hydra and Python alike; the
 * extensions tell those apart. A set, because Chrome shuffles its extension
 * order on every connection; a budget, because a larger hello (Chrome's, with
 * its post-quantum key share) can span two segments and the kernel reads one.
 * Key 0 means "no key": the segment held no readable hello.
 * sensor/fingerprint/tls.py computes the same key from a parsed hello. */
#define HELLO_KEY_MAX_CIPHERS 128
#define HELLO_KEY_MAX_EXTENSIONS 32
#define HELLO_KEY_EXT_BUDGET 1024
#define HELLO_KEY_FNV_OFFSET 0xcbf29ce484222325ULL
#define HELLO_KEY_FNV_PRIME 0x100000001b3ULL
#define HELLO_KEY_EXT_MIX 0x9e3779b97f4a7c15ULL
/* A connection whose hello the kernel dropped stays blocked this long (the
 * client's retransmissions and later segments), or until the key's verdict
 * ends if that is sooner. */
#define HELLO_FLOW_BLOCK_NS 120000000000ULL /* 120 s */

/* Runtime knobs, one entry. */
struct config {
	__u32 verdict_kinds; /* enum verdict_kind_bit: maps that may hold entries */
	__u32 pad;
};

/* Watched server ports: array index is the port. */
enum watch_flag {
	WATCH_TLS = 1 << 0,
	WATCH_HTTP = 1 << 1,
};

/* ---- per-flow and per-source state, written by the kernel ---- */

enum flow_flag {
	FLOW_SEEN_SYN = 1 << 0, /* else it began before we were attached */
	FLOW_HELLO_OPEN = 1 << 1, /* a ClientHello continues into the next segment */
};

/* Times in flow state are CLOCK_MONOTONIC from the coarse clock (tick
 * resolution, 1-4 ms): see observe() in xdp_sensor.c. */
struct flow_state {
	__u64 first_ns;
	__u64 last_ns; /* last packet either way: idle flows end on this */
	__u64 last_data_ns;
	__u64 bytes; /* client -> server TCP payload bytes */
	__u64 server_bytes; /* server -> client TCP payload bytes (tc egress) */
	__u64 gap_sum_us; /* gaps between client data segments, capped at GAP_CAP_US */
	__u64 gap_sumsq_us2;
	__u32 packets;
	__u32 server_packets;
	__u32 data_segments;
	__u32 gap_count;
	__u16 syn_count; /* SYNs seen: retransmissions are syn_count - 1 */
	__u16 hello_bytes; /* captured of the current ClientHello */
	__u8 hellos; /* ClientHellos started */
	__u8 hello_segments; /* segments captured of the current ClientHello */
	__u8 flags; /* enum flow_flag */
	__u8 pad;
};

struct source_state {
	__u64 first_ns;
	__u64 last_ns;
	__u64 packets;
	__u32 syns;
	__u32 flows;
};

/* ---- counters: one per-CPU array indexed by this enum ---- */

enum counter_id {
	/* how the program ended: exactly one per packet */
	CTR_PASS_NOT_WATCHED = 0, /* not TCP to a watched port */
	CTR_PASS_MALFORMED, /* truncated or malformed header: passed untouched */
	CTR_PASS_FRAGMENT, /* non-first IP fragment: no TCP header to read */
	CTR_PASS, /* watched, no verdict applied */
	CTR_PASS_ALLOWED, /* on the allow list */
	CTR_DROP_BLOCK,
	CTR_DROP_BLOCK_CIDR,
	CTR_DROP_BLOCK_FLOW,
	CTR_DROP_THROTTLE_CONN,
	CTR_DROP_THROTTLE_PKT,
	CTR_DROP_TARPIT,
	CTR_DROP_BLOCK_HELLO, /* a new ClientHello whose key is blocked */
	/* verdict map hits, including those that let the packet through */
	CTR_HIT_ALLOW,
	CTR_HIT_ALLOW_CIDR,
	CTR_HIT_THROTTLE, /* source under throttle, conforming or not */
	CTR_HIT_TARPIT, /* source under tarpit, any packet */
	CTR_HIT_HELLO_EXEMPT, /* blocked hello key, but its source is exempt */
	CTR_VERDICT_EXPIRED, /* entry found but past its expiry: ignored */
	/* events */
	CTR_EVENT_SYN,
	CTR_EVENT_HELLO,
	CTR_EVENT_HTTP_REQUEST,
	CTR_EVENT_FLOW_END,
	CTR_EVENT_HTTP_RESPONSE,
	CTR_EVENT_LOST, /* the ring buffer could not take the record */
	CTR_PAYLOAD_READ_ERROR, /* bpf_*_load_bytes failed */
	CTR_FLOW_TABLE_FULL, /* update refused */
	/* tc egress */
	CTR_EGRESS_PACKETS,
	CTR_EGRESS_NO_FLOW,
	/* tc ingress: a packet XDP passed as malformed or a fragment (and counted
	 * so), dropped there because its source is blocked */
	CTR_DROP_BLOCK_UNPARSED,
	CTR_MAX,
};

/* ---- ring buffer records ---- */

enum event_type {
	EVENT_SYN = 1,
	EVENT_HELLO = 2,
	EVENT_HTTP_REQUEST = 3,
	EVENT_FLOW_END = 4,
	EVENT_HTTP_RESPONSE = 5,
};

/* Every record starts with this header. length counts the whole record. */
struct event_header {
	__u16 type; /* enum event_type */
	__u16 version;
	__u32 length;
	__u64 ts_ns; /* bpf_ktime_get_ns() */
};

enum syn_quirk {
	QUIRK_ECN_SETUP = 1 << 0, /* ECE and CWR set in the SYN */
	QUIRK_ECN_IP = 1 << 1, /* ECT/CE bits set in the IP header */
	QUIRK_ACK_NONZERO = 1 << 2, /* ACK number non-zero without the ACK flag */
	QUIRK_URG_NONZERO = 1 << 3, /* urgent pointer non-zero without URG */
	QUIRK_DATA = 1 << 4, /* payload in the SYN (TCP Fast Open) */
	QUIRK_OPTIONS_TRUNCATED = 1 << 5, /* options ran past the header: set by user space */
	QUIRK_IP_ID_ZERO = 1 << 6, /* IPv4 ID zero with DF set */
	QUIRK_FLOW_LABEL = 1 << 7, /* IPv6 flow label non-zero */
};

/* Bump and update sensor/abi.py + sensor/events.py on any change.
 * The TCP options travel raw; sensor/events.py decodes them. */
#define SYN_EVENT_VERSION 1
struct syn_event {
	struct event_header hdr;
	struct flow_tuple flow;
	__u32 seq;
	__u16 ip_id; /* IPv4 only */
	__u16 window;
	__u16 quirks; /* enum syn_quirk, as far as the kernel sees them */
	__u16 ip_total_len;
	__u16 payload_len;
	__u8 ttl; /* or IPv6 hop limit */
	__u8 df; /* IPv4 don't-fragment; 1 for IPv6, which never fragments en route */
	__u8 tcp_flags; /* the flags byte: CWR ECE URG ACK PSH RST SYN FIN */
	__u8 options_len; /* bytes of TCP options in options[] */
	__u8 options[TCP_OPTIONS_MAX_BYTES]; /* raw, as on the wire */
	__u8 pad[6]; /* to the 8-byte alignment: no byte of the record is left unnamed */
};

/* A captured client payload segment: a ClientHello part or a plaintext HTTP
 * request head. Bump and update sensor/abi.py + sensor/events.py on change. */
#define PAYLOAD_EVENT_VERSION 1
struct payload_event {
	struct event_header hdr;
	struct flow_tuple flow;
	__u32 seq; /* TCP sequence number of the segment */
	__u16 payload_len; /* TCP payload length on the wire */
	__u16 captured_len; /* bytes in data[] */
	__u8 hello_index; /* EVENT_HELLO: 1, or 2 after a HelloRetryRequest */
	__u8 segment_index; /* EVENT_HELLO: 1 or 2 */
	__u8 pad[2];
	__u8 data[PAYLOAD_MAX_BYTES]; /* only captured_len bytes are sent */
};

enum flow_end_reason {
	FLOW_END_FIN = 1,
	FLOW_END_RST = 2,
	FLOW_END_SERVER_RST = 3, /* seen by tc egress */
	FLOW_END_IDLE = 4, /* emitted by user space when it sweeps idle flows */
};

/* Bump and update sensor/abi.py + sensor/events.py on any change. */
#define FLOW_END_EVENT_VERSION 1
struct flow_end_event {
	struct event_header hdr;
	struct flow_tuple flow;
	struct flow_state state;
	__u8 reason; /* enum flow_end_reason */
	__u8 pad[7];
};

/* Status line of a plaintext HTTP response, seen by tc egress.
 * Bump and update sensor/abi.py + sensor/events.py on any change. */
#define HTTP_RESPONSE_EVENT_VERSION 1
struct http_response_event {
	struct event_header hdr;
	struct flow_tuple flow; /* client -> server, like every other record */
	__u64 think_ns; /* since the client's last data segment; tick resolution (coarse
			 * clock): the events' own timestamps are precise */
	__u16 status;
	__u16 payload_len;
	__u8 pad[4];
};

#endif /* BOTWALL_COMMON_H */
