/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The sensor's programs: XDP ingress (parse -> enforce -> observe, one exit
 * that counts the result), the ClientHello check it tail-calls for a new
 * hello, tc egress (the server's side of each flow) and tc ingress (packets
 * XDP could not read a port from, when their source is blocked).
 *
 * It never decides: it applies verdicts user space wrote and reports what it saw.
 * Failure policy: fail open. A packet it cannot parse, a map it cannot update,
 * a record the ring buffer cannot take: the packet passes and a counter says so.
 * Only traffic to a watched server port is enforced or observed, so SSH and
 * other services on the host are never cut off by a bot verdict.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "common.h"
#include "parsing.h"
#include "maps.h"

/* Map calls must be written in this file: BCC rewrites table.lookup() and
 * friends into map helpers only in the main source file, not in headers. */

static __always_inline void count(__u32 id)
{
	__u64 *value = counters.lookup(&id);

	if (value)
		*value += 1;
}

/* CLOCK_MONOTONIC at tick resolution: what bpf_ktime_get_coarse_ns() returns,
 * read through the helper once per tick on each CPU and kept for the rest of
 * the tick. The coarse clock only moves when the tick advances jiffies, and
 * bpf_jiffies64() is inlined by the verifier into one load, while the helper
 * call cost 24 ns a packet on the bench machine, a third of what a blocked
 * packet costs (bench/datapath.py). The tick bumps jiffies just before the
 * coarse clock: a CPU reading between the two keeps the previous tick's time
 * for this tick, one tick behind, as the coarse clock itself can be. */
#ifdef BOTWALL_PROVEN_SIZES
/* The build for older verifiers (see PROVEN_SIZE in parsing.h): Debian 12's
 * 6.1 refuses the program as too complex with the cache's branch at each
 * call site, so there every read is the helper's. */
static __always_inline __u64 coarse_now(void)
{
	return bpf_ktime_get_coarse_ns();
}
#else
static __always_inline __u64 coarse_now(void)
{
	struct tick_clock *clock;
	__u64 jiffies = bpf_jiffies64();
	__u32 zero = 0;

	clock = tick_clock.lookup(&zero);
	if (!clock)
		return bpf_ktime_get_coarse_ns();
	if (clock->jiffies != jiffies) {
		clock->jiffies = jiffies;
		clock->now_ns = bpf_ktime_get_coarse_ns();
	}
	return clock->now_ns;
}
#endif

/* Event timestamps are precise (bpf_ktime_get_ns): they are read here, once
 * per record, not once per packet. Flow-state times use the coarse clock. */
static __always_inline void fill_header(struct event_header *hdr, __u16 type, __u16 version,
					__u32 length)
{
	hdr->type = type;
	hdr->version = version;
	hdr->length = length;
	hdr->ts_ns = bpf_ktime_get_ns();
}

static __always_inline void emit_flow_end(struct flow_tuple *flow, struct flow_state *fs,
					  __u8 reason)
{
	struct flow_end_event *ev = events.ringbuf_reserve(sizeof(*ev));

	if (!ev) {
		count(CTR_EVENT_LOST);
		return;
	}
	fill_header(&ev->hdr, EVENT_FLOW_END, FLOW_END_EVENT_VERSION, sizeof(*ev));
	ev->flow = *flow;
	__builtin_memcpy(&ev->state, fs, sizeof(ev->state));
	ev->reason = reason;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	events.ringbuf_submit(ev, 0);
	count(CTR_EVENT_FLOW_END);
}


static __always_inline int is_client_syn(const struct tcphdr *tcp)
{
	return tcp->syn && !tcp->ack;
}

/* A verdict applies until its expiry, measured in kernel time. `now` is the
 * coarse clock: CLOCK_MONOTONIC as of the last tick, so a verdict may outlive
 * its TTL by one tick (1-10 ms), and a dropped packet is spared a precise clock
 * read, which costs as much as the map lookup that found its verdict. */
static __always_inline int verdict_live(const struct verdict *v, __u64 now)
{
	if (now < v->expires_ns)
		return 1;
	count(CTR_VERDICT_EXPIRED);
	return 0;
}

/* Generic cell rate algorithm: one timestamp per bucket, no division.
 * See struct throttle_entry in common.h. */
static __always_inline int gcra_conforms(__u64 *tat, __u64 interval, __u64 tolerance, __u64 now)
{
	__u64 t = *tat;

	if (!interval)
		return 1;
	if (t < now)
		t = now;
	if (t - now > tolerance)
		return 0;
	*tat = t + interval;
	return 1;
}

/* Allow -> block (address, CIDR, flow) -> throttle -> tarpit.
 * Returns the counter that names the outcome. */
static __always_inline __u32 enforce(struct packet *pkt)
{
	union addr16 *src = &pkt->flow.saddr;
	struct lpm_key prefix = {.prefixlen = 128};
	struct throttle_entry *throttled;
	struct tarpit_entry *tarpitted;
	struct verdict *v;
	struct config *cfg;
	__u32 zero = 0;
	__u32 kinds;
	__u64 now;

	/* Empty verdict maps are skipped without a lookup: user space sets a
	 * kind's bit before it writes the first entry of that kind. */
	cfg = config.lookup(&zero);
	kinds = cfg ? cfg->verdict_kinds : 0;
	if (!kinds)
		return CTR_PASS;
	now = coarse_now();
	if (kinds & (VERDICT_ALLOW_CIDR | VERDICT_BLOCK_CIDR))
		__builtin_memcpy(&prefix.addr, src, sizeof(prefix.addr));

	if (kinds & VERDICT_ALLOW) {
		v = allow_addr.lookup(src);
		if (v && verdict_live(v, now)) {
			count(CTR_HIT_ALLOW);
			return CTR_PASS_ALLOWED;
		}
	}
	if (kinds & VERDICT_ALLOW_CIDR) {
		v = allow_cidr.lookup(&prefix);
		if (v && verdict_live(v, now)) {
			count(CTR_HIT_ALLOW_CIDR);
			return CTR_PASS_ALLOWED;
		}
	}
	if (kinds & VERDICT_BLOCK) {
		v = block_addr.lookup(src);
		if (v && verdict_live(v, now))
			return CTR_DROP_BLOCK;
	}
	if (kinds & VERDICT_BLOCK_CIDR) {
		v = block_cidr.lookup(&prefix);
		if (v && verdict_live(v, now))
			return CTR_DROP_BLOCK_CIDR;
	}
	if (kinds & VERDICT_BLOCK_FLOW) {
		v = block_flow.lookup(&pkt->flow);
		if (v && verdict_live(v, now))
			return CTR_DROP_BLOCK_FLOW;
	}
	if (kinds & VERDICT_THROTTLE) {
		throttled = throttle.lookup(src);
		if (throttled && verdict_live(&throttled->v, now)) {
			/* Token buckets need the precise clock: a tick is longer than
			 * the interval of any rate above 100-1000/s. */
			now = bpf_ktime_get_ns();
			count(CTR_HIT_THROTTLE);
			if (is_client_syn(pkt->tcp) &&
			    !gcra_conforms(&throttled->conn_tat_ns, throttled->conn_interval_ns,
					   throttled->conn_tolerance_ns, now))
				return CTR_DROP_THROTTLE_CONN;
			if (!gcra_conforms(&throttled->pkt_tat_ns, throttled->pkt_interval_ns,
					   throttled->pkt_tolerance_ns, now))
				return CTR_DROP_THROTTLE_PKT;
		}
	}
	if ((kinds & VERDICT_TARPIT) && is_client_syn(pkt->tcp)) {
		tarpitted = tarpit.lookup(src);
		if (tarpitted && verdict_live(&tarpitted->v, now)) {
			__u32 first = 1, seen;
			__u32 *dropped;

			count(CTR_HIT_TARPIT);
			/* Count SYNs per connection: the retransmissions of one connect()
			 * share its 5-tuple, a new connect() gets a new source port. */
			dropped = tarpit_syns.lookup(&pkt->flow);
			if (dropped) {
				seen = *dropped + 1;
				*dropped = seen;
			} else {
				seen = first;
				tarpit_syns.update(&pkt->flow, &first);
			}
			if (seen <= tarpitted->syns_to_drop)
				return CTR_DROP_TARPIT;
			/* This SYN passes: forget the connection, so a later one that
			 * reuses the same 5-tuple pays again. */
			tarpit_syns.delete(&pkt->flow);
		}
	}
	return CTR_PASS;
}

static __always_inline void emit_syn(struct xdp_md *ctx, struct packet *pkt)
{
	struct tcphdr *tcp = pkt->tcp;
	struct syn_event *ev;
	__u64 olen; /* 64 bits: old verifiers lose the bounds of a zero-extended copy */
	__u16 quirks = 0;

	ev = events.ringbuf_reserve(sizeof(*ev));
	if (!ev) {
		count(CTR_EVENT_LOST);
		return;
	}
	fill_header(&ev->hdr, EVENT_SYN, SYN_EVENT_VERSION, sizeof(*ev));
	ev->flow = pkt->flow;
	ev->seq = bpf_ntohl(tcp->seq);
	ev->ip_id = pkt->flow.ip_version == 4 ? pkt->ip_id : 0;
	ev->window = bpf_ntohs(tcp->window);
	ev->ip_total_len = pkt->ip_total_len;
	ev->payload_len = pkt->payload_len;
	ev->ttl = pkt->ttl;
	ev->df = pkt->df;
	ev->tcp_flags = ((__u8 *)tcp)[13];
	__builtin_memset(ev->options, 0, sizeof(ev->options));
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));

	/* The raw option bytes go to user space, which decodes kinds, MSS and
	 * window scale (sensor/events.py): walking options here costs verifier
	 * complexity for nothing the kernel needs. */
	olen = tcp->doff * 4 - sizeof(*tcp);
	if (olen > TCP_OPTIONS_MAX_BYTES)
		olen = TCP_OPTIONS_MAX_BYTES;
	ev->options_len = olen;
	if (olen > 0 && bpf_xdp_load_bytes(ctx, pkt->payload_offset - olen, ev->options,
					   PROVEN_SIZE(olen, TCP_OPTIONS_MAX_BYTES)) < 0)
		ev->options_len = 0;

	if (tcp->ece && tcp->cwr)
		quirks |= QUIRK_ECN_SETUP;
	if (pkt->ecn)
		quirks |= QUIRK_ECN_IP;
	if (!tcp->ack && tcp->ack_seq)
		quirks |= QUIRK_ACK_NONZERO;
	if (!tcp->urg && tcp->urg_ptr)
		quirks |= QUIRK_URG_NONZERO;
	if (pkt->payload_len)
		quirks |= QUIRK_DATA;
	if (pkt->flow.ip_version == 4 && pkt->df && pkt->ip_id == 0)
		quirks |= QUIRK_IP_ID_ZERO;
	if (pkt->flow_label_set)
		quirks |= QUIRK_FLOW_LABEL;
	ev->quirks = quirks;

	events.ringbuf_submit(ev, 0);
	count(CTR_EVENT_SYN);
}

/* Copies up to max_len bytes of the segment's payload into a ring-buffer
 * record. Returns the number of bytes it set out to capture, whether or not
 * the ring buffer took the record, so per-flow accounting does not depend on
 * user space keeping up. */
static __always_inline __u32 emit_payload(struct xdp_md *ctx, struct packet *pkt, __u16 type,
					  __u32 max_len, __u8 hello_index, __u8 segment_index)
{
	struct payload_event *rec;
	__u32 zero = 0;
	__u64 len; /* 64 bits: old verifiers lose the bounds of a zero-extended copy */

	len = pkt->payload_len;
	if (len > max_len)
		len = max_len;
	if (len > PAYLOAD_MAX_BYTES)
		len = PAYLOAD_MAX_BYTES;
	if (len == 0)
		return 0;
	len = PROVEN_SIZE(len, PAYLOAD_MAX_BYTES); /* for the record's size and the copy */

	rec = payload_scratch.lookup(&zero);
	if (!rec)
		return len;
	fill_header(&rec->hdr, type, PAYLOAD_EVENT_VERSION, offsetof(struct payload_event, data) + len);
	rec->flow = pkt->flow;
	rec->seq = bpf_ntohl(pkt->tcp->seq);
	rec->payload_len = pkt->payload_len;
	rec->captured_len = len;
	rec->hello_index = hello_index;
	rec->segment_index = segment_index;
	rec->pad[0] = 0;
	rec->pad[1] = 0;
	if (bpf_xdp_load_bytes(ctx, pkt->payload_offset, rec->data, len) < 0) {
		count(CTR_PAYLOAD_READ_ERROR);
		return len;
	}
	if (events.ringbuf_output(rec, offsetof(struct payload_event, data) + len, 0) < 0) {
		count(CTR_EVENT_LOST);
		return len;
	}
	count(type == EVENT_HELLO ? CTR_EVENT_HELLO : CTR_EVENT_HTTP_REQUEST);
	return len;
}

#define TLS_HEAD_BYTES 16
union segment_head {
	__u8 b[TLS_HEAD_BYTES];
	__u64 w[2];
};

/* Byte k of the head, read out of the two words: indexing the byte array at
 * two candidate offsets makes clang select between stack pointers, which the
 * verifier refuses. */
#define HEAD_BYTE(h, k) ((__u8)((h)->w[(k) / 8] >> (8 * ((k) % 8))))
#define RECORD_LEN(h, at) ((HEAD_BYTE(h, at) << 8) | HEAD_BYTE(h, (at) + 1))
#define HANDSHAKE_LEN(h, at) \
	((HEAD_BYTE(h, at) << 16) | (HEAD_BYTE(h, (at) + 1) << 8) | HEAD_BYTE(h, (at) + 2))

/* If the segment begins with a TLS record carrying a ClientHello, returns how
 * many bytes the segment needs to hold the whole hello: at offset 0, or at 6
 * behind a ChangeCipherSpec record (the second ClientHello after a
 * HelloRetryRequest in middlebox-compatibility mode). 0 if none. A hello split
 * over several records needs their headers too, which this segment cannot
 * tell: HELLO_SPANS_RECORDS then asks for the next segment whatever its length. */
#define HELLO_SPANS_RECORDS 0xffffffff
static __always_inline __u32 client_hello_end(const union segment_head *h, __u32 len)
{
	if (len >= 9 && HEAD_BYTE(h, 0) == 0x16 && HEAD_BYTE(h, 1) == 0x03 &&
	    HEAD_BYTE(h, 5) == 0x01)
		return RECORD_LEN(h, 3) < 4 + HANDSHAKE_LEN(h, 6) ? HELLO_SPANS_RECORDS
								 : 9 + HANDSHAKE_LEN(h, 6);
	if (len >= 15 && HEAD_BYTE(h, 0) == 0x14 && HEAD_BYTE(h, 1) == 0x03 &&
	    HEAD_BYTE(h, 2) == 0x03 && HEAD_BYTE(h, 3) == 0 && HEAD_BYTE(h, 4) == 1 &&
	    HEAD_BYTE(h, 5) == 1 && HEAD_BYTE(h, 6) == 0x16 && HEAD_BYTE(h, 7) == 0x03 &&
	    HEAD_BYTE(h, 11) == 0x01)
		return RECORD_LEN(h, 9) < 4 + HANDSHAKE_LEN(h, 12) ? HELLO_SPANS_RECORDS
								  : 15 + HANDSHAKE_LEN(h, 12);
	return 0;
}

static __always_inline void capture_hello(struct xdp_md *ctx, struct packet *pkt,
					  struct flow_state *fs, const union segment_head *head)
{
	__u32 captured, hello_end;

	/* The ClientHello began in the previous segment: take this one too. */
	if ((fs->flags & FLOW_HELLO_OPEN) && fs->hello_segments < HELLO_MAX_SEGMENTS &&
	    fs->hello_bytes < HELLO_MAX_BYTES) {
		__u8 segment = fs->hello_segments + 1;

		captured = emit_payload(ctx, pkt, EVENT_HELLO, HELLO_MAX_BYTES - fs->hello_bytes,
					fs->hellos, segment);
		fs->hello_segments = segment;
		fs->hello_bytes += captured;
		fs->flags &= ~FLOW_HELLO_OPEN;
		return;
	}
	if (fs->hellos >= HELLOS_PER_FLOW)
		return;
	hello_end = client_hello_end(head, pkt->payload_len);
	if (!hello_end)
		return;

	fs->hellos++;
	pkt->new_hello = 1;
	captured = emit_payload(ctx, pkt, EVENT_HELLO, HELLO_MAX_BYTES, fs->hellos, 1);
	fs->hello_segments = 1;
	fs->hello_bytes = captured;
	if (pkt->payload_len < hello_end)
		fs->flags |= FLOW_HELLO_OPEN;
	else
		fs->flags &= ~FLOW_HELLO_OPEN;
}

/* The first four bytes of every HTTP/1.x method we expect on an API. */
static __always_inline int starts_with_http_method(const union segment_head *head)
{
	__u32 word = (__u32)head->w[0];

#define WORD(a, b, c, d) ((a) | ((b) << 8) | ((c) << 16) | ((__u32)(d) << 24))
	switch (word) {
	case WORD('G', 'E', 'T', ' '):
	case WORD('P', 'O', 'S', 'T'):
	case WORD('P', 'U', 'T', ' '):
	case WORD('H', 'E', 'A', 'D'):
	case WORD('D', 'E', 'L', 'E'):
	case WORD('P', 'A', 'T', 'C'):
	case WORD('O', 'P', 'T', 'I'):
	case WORD('C', 'O', 'N', 'N'):
	case WORD('T', 'R', 'A', 'C'):
		return 1;
	}
#undef WORD
	return 0;
}

/* Per-source counters are touched when a flow starts (its SYN, or its first
 * data when the flow began before we attached) and when it ends, where its
 * packets are added: one hash lookup per packet less on the hot path, for
 * packet counts that lag by the flows still open. */
static __always_inline struct source_state *touch_source(union addr16 *src, __u64 now)
{
	struct source_state *ss = sources.lookup(src);

	if (!ss) {
		struct source_state fresh = {.first_ns = now};

		sources.update(src, &fresh);
		ss = sources.lookup(src);
		if (!ss)
			return 0;
	}
	ss->last_ns = now;
	return ss;
}

static __always_inline void end_flow(struct flow_tuple *flow, struct flow_state *fs, __u8 reason,
				     __u64 now)
{
	struct source_state *ss = touch_source(&flow->saddr, now);

	if (ss)
		ss->packets += fs->packets;
	emit_flow_end(flow, fs, reason);
	flows.delete(flow);
}

/* Flow-state times (first, last, last data, gaps) come from the coarse clock:
 * tick resolution (1-4 ms) is plenty for idle timeouts and request cadence,
 * and the precise clock costs as much as the flow lookup. A pure ACK of a
 * known flow reads no clock at all; event records carry precise times. */
static __always_inline void observe(struct xdp_md *ctx, struct packet *pkt, __u8 watch)
{
	struct tcphdr *tcp = pkt->tcp;
	int syn = is_client_syn(tcp);
	union segment_head head = {};
	struct source_state *ss;
	struct flow_state *fs;
	__u32 head_len;
	__u64 now;

	fs = flows.lookup(&pkt->flow);
	if (fs && !syn && !pkt->payload_len && !tcp->fin && !tcp->rst) {
		fs->packets++; /* the common case: an ACK of the server's data */
		return;
	}
	/* Only a SYN or data opens a flow: a stray ACK or FIN of a flow we
	 * already closed must not leave state behind to time out. */
	if (!fs && !syn && !pkt->payload_len)
		return;

	now = coarse_now();
	if (syn)
		emit_syn(ctx, pkt);
	if (fs) {
		if (syn)
			fs->syn_count++;
	} else {
		struct flow_state fresh = {.first_ns = now};

		if (syn) {
			fresh.flags = FLOW_SEEN_SYN;
			fresh.syn_count = 1;
		}
		if (flows.update(&pkt->flow, &fresh) < 0) {
			count(CTR_FLOW_TABLE_FULL);
			return;
		}
		fs = flows.lookup(&pkt->flow);
		if (!fs)
			return;
		ss = touch_source(&pkt->flow.saddr, now);
		if (ss) {
			ss->flows++;
			ss->syns += syn;
		}
	}
	if (syn && fs->syn_count > 1) {
		ss = touch_source(&pkt->flow.saddr, now);
		if (ss)
			ss->syns++; /* a retransmission: the source sent another SYN */
	}

	fs->packets++;
	fs->last_ns = now;
	if (pkt->payload_len) {
		fs->bytes += pkt->payload_len;
		fs->data_segments++;
		if (fs->last_data_ns) {
			__u64 gap_us = (now - fs->last_data_ns) / 1000;

			if (gap_us > GAP_CAP_US)
				gap_us = GAP_CAP_US;
			fs->gap_count++;
			fs->gap_sum_us += gap_us;
			fs->gap_sumsq_us2 += gap_us * gap_us;
		}
		fs->last_data_ns = now;

		/* Read the head in place when it is in the packet's linear part, as
		 * it is for every frame below a page: bpf_xdp_load_bytes() costs
		 * more than the rest of this branch together (bench/datapath.py). */
		head_len = pkt->payload_len < TLS_HEAD_BYTES ? pkt->payload_len : TLS_HEAD_BYTES;
		if (head_len == TLS_HEAD_BYTES &&
		    pkt->payload + TLS_HEAD_BYTES <= (void *)(long)ctx->data_end)
			__builtin_memcpy(&head, pkt->payload, TLS_HEAD_BYTES);
		else if (bpf_xdp_load_bytes(ctx, pkt->payload_offset, head.b,
					    PROVEN_SIZE(head_len, TLS_HEAD_BYTES)) < 0)
			__builtin_memset(&head, 0, sizeof(head));
		if (watch & WATCH_TLS)
			capture_hello(ctx, pkt, fs, &head);
		if ((watch & WATCH_HTTP) && pkt->payload_len >= 4 && starts_with_http_method(&head))
			emit_payload(ctx, pkt, EVENT_HTTP_REQUEST, HTTP_HEAD_MAX_BYTES, 0, 0);
	}

	if (tcp->fin || tcp->rst)
		end_flow(&pkt->flow, fs, tcp->rst ? FLOW_END_RST : FLOW_END_FIN, now);
}

/* ---- blocked ClientHello keys (see common.h) ----
 *
 * A JA4 verdict written by user space as a flow block lands after the hello
 * that showed the JA4 has been answered: a client quick enough sends its
 * request before it. Here the kernel drops the hello itself, so not one
 * request of a blocked client stack gets through, from any new address. It is
 * a program of its own, reached by tail call, because botwall_xdp has no
 * verifier budget left for a loop over the cipher suites.
 */

/* Tail-calls program `index` with the packet's flow and the result so far.
 * Returns only if the call could not be made. */
static __always_inline void hand_over(struct xdp_md *ctx, const struct packet *pkt, __u32 result,
				      __u32 index)
{
	struct tail_call_args *args;
	__u32 zero = 0;

	args = tail_call_scratch.lookup(&zero);
	if (!args)
		return;
	args->flow = pkt->flow;
	args->payload_offset = pkt->payload_offset;
	args->payload_len = pkt->payload_len;
	args->result = result;
	tail_calls.call(ctx, index);
}

static __always_inline void check_hello(struct xdp_md *ctx, const struct packet *pkt)
{
	hand_over(ctx, pkt, CTR_PASS, TAIL_CALL_HELLO);
}

static __always_inline int is_grease(__u8 hi, __u8 lo)
{
	return hi == lo && (lo & 0x0f) == 0x0a;
}

/* The hello's key (see common.h), or 0 if the segment holds no readable hello.
 * The segment's first HELLO_KEY_EXT_BUDGET bytes are read once into a per-CPU
 * buffer and walked there: a helper call per cipher suite costs more than the
 * rest of the walk together (bench/datapath.py, client_hello_key_walk). */
#define HELLO_AT(h, pos) ((h)->b[(pos) & (HELLO_KEY_EXT_BUDGET - 1)])
static __always_inline __u64 hello_key(struct xdp_md *ctx, __u32 offset, __u32 payload_len)
{
	__u64 hash = HELLO_KEY_FNV_OFFSET, ext_sum = 0;
	__u32 n, pos, suites, hello_bytes, session_id_len, i, zero = 0;
	struct hello_head *h;
	__u8 hi, lo;

	h = hello_head_scratch.lookup(&zero);
	if (!h)
		return 0;
	n = payload_len < HELLO_KEY_EXT_BUDGET ? payload_len : HELLO_KEY_EXT_BUDGET;
	if (n < 46) /* up to the cipher list's length with an empty session id */
		return 0;
	if (bpf_xdp_load_bytes(ctx, offset, h->b, proven_size(n, HELLO_KEY_EXT_BUDGET)) < 0)
		return 0;
	/* Record header (5), handshake header (4) with the hello's length,
	 * version (2), random (32), then the session id. */
	if (HELLO_AT(h, 0) != 0x16)
		return 0;
	hello_bytes = 9 + ((__u32)HELLO_AT(h, 6) << 16 | (__u32)HELLO_AT(h, 7) << 8 |
			   HELLO_AT(h, 8));
	session_id_len = HELLO_AT(h, 43);
	if (session_id_len > 32)
		return 0;
	pos = 44 + session_id_len;
	if (pos + 2 > n)
		return 0;
	suites = ((__u32)HELLO_AT(h, pos) << 8 | HELLO_AT(h, pos + 1)) / 2;
	pos += 2;
	for (i = 0; i < HELLO_KEY_MAX_CIPHERS && i < suites; i++) {
		if (pos + 2 * i + 2 > n)
			return 0;
		hi = HELLO_AT(h, pos + 2 * i);
		lo = HELLO_AT(h, pos + 2 * i + 1);
		if (is_grease(hi, lo))
			continue;
		hash = (hash ^ hi) * HELLO_KEY_FNV_PRIME;
		hash = (hash ^ lo) * HELLO_KEY_FNV_PRIME;
	}
	if (hello_bytes > HELLO_KEY_EXT_BUDGET)
		goto done;
	pos += 2 * suites;
	/* Compression methods, then the extensions block's length. */
	if (pos + 1 > n)
		return 0;
	pos += 1 + HELLO_AT(h, pos) + 2;
	for (i = 0; i < HELLO_KEY_MAX_EXTENSIONS && pos + 4 <= hello_bytes; i++) {
		if (pos + 4 > n)
			return 0;
		hi = HELLO_AT(h, pos);
		lo = HELLO_AT(h, pos + 1);
		if (!is_grease(hi, lo))
			ext_sum += (((__u64)hi << 8 | lo) + 1) * HELLO_KEY_EXT_MIX;
		pos += 4 + ((__u32)HELLO_AT(h, pos + 2) << 8 | HELLO_AT(h, pos + 3));
	}
	for (i = 0; i < 8; i++)
		hash = (hash ^ ((ext_sum >> (8 * i)) & 0xff)) * HELLO_KEY_FNV_PRIME;
done:
	return hash ? hash : 1;
}

int botwall_hello(struct xdp_md *ctx)
{
	struct verdict *blocked, *exempt, flow_block;
	struct tail_call_args *hc;
	struct config *cfg;
	__u32 zero = 0;
	__u64 key, now;

	hc = tail_call_scratch.lookup(&zero);
	if (!hc)
		return XDP_PASS;
	cfg = config.lookup(&zero);
	if (!cfg || !(cfg->verdict_kinds & VERDICT_BLOCK_HELLO))
		goto pass;
	key = hello_key(ctx, hc->payload_offset, hc->payload_len);
	if (!key)
		goto pass;
	blocked = block_hello.lookup(&key);
	now = coarse_now();
	if (!blocked || !verdict_live(blocked, now))
		goto pass;
	if (cfg->verdict_kinds & VERDICT_HELLO_EXEMPT) {
		exempt = hello_exempt.lookup(&hc->flow.saddr);
		if (exempt && verdict_live(exempt, now)) {
			count(CTR_HIT_HELLO_EXEMPT);
			goto pass;
		}
	}
	/* The client retransmits the hello and may send more: the whole
	 * connection goes, for as long as a connection needs. User space set
	 * VERDICT_BLOCK_FLOW when it wrote the key. */
	flow_block = *blocked;
	flow_block.created_ns = now;
	if (flow_block.expires_ns > now + HELLO_FLOW_BLOCK_NS)
		flow_block.expires_ns = now + HELLO_FLOW_BLOCK_NS;
	block_flow.update(&hc->flow, &flow_block);
	count(CTR_DROP_BLOCK_HELLO);
	return XDP_DROP;
pass:
	count(hc->result);
	return XDP_PASS;
}

int botwall_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 result = CTR_PASS_NOT_WATCHED;
	struct packet pkt = {};
	int action = XDP_PASS;
	__u32 port;
	__u8 *watch;
	int rc;

	rc = parse_packet(data, data_end, &pkt);
	if (rc != 0) {
		if (rc == PARSE_FRAGMENT)
			result = CTR_PASS_FRAGMENT;
		else if (rc < 0)
			result = CTR_PASS_MALFORMED;
		goto out;
	}
	port = pkt.flow.dport;
	watch = watched_ports.lookup(&port);
	if (!watch || !*watch)
		goto out;

	result = enforce(&pkt);
	if (result >= CTR_DROP_BLOCK && result <= CTR_DROP_TARPIT) {
		action = XDP_DROP;
		goto out;
	}
	observe(ctx, &pkt, *watch);
	if (pkt.new_hello && result == CTR_PASS)
		check_hello(ctx, &pkt); /* returns only if the tail call failed */
out:
	count(result);
	return action;
}

/* ---- tc egress: what the server sends back on watched ports ----
 *
 * Server-to-client packets and bytes go into the client's flow (looked up by
 * the reversed tuple); the status line of a plaintext HTTP response becomes an
 * event, so the control plane sees 401, 403, 404 and 429; a server RST ends
 * the flow. It never drops: every path returns TC_ACT_OK. It lives in this
 * file because it shares the flow table and the ring buffer, and BCC shares
 * maps between programs of one object.
 */

#define STATUS_LINE_BYTES 12 /* "HTTP/1.1 200" */

static __always_inline int digit(__u8 c)
{
	return c >= '0' && c <= '9';
}

static __always_inline void emit_http_response(struct flow_tuple *flow, struct flow_state *fs,
					       __u16 status, __u16 payload_len, __u64 now)
{
	struct http_response_event *ev = events.ringbuf_reserve(sizeof(*ev));

	if (!ev) {
		count(CTR_EVENT_LOST);
		return;
	}
	fill_header(&ev->hdr, EVENT_HTTP_RESPONSE, HTTP_RESPONSE_EVENT_VERSION, sizeof(*ev));
	ev->flow = *flow;
	ev->think_ns = fs->last_data_ns ? now - fs->last_data_ns : 0;
	ev->status = status;
	ev->payload_len = payload_len;
	__builtin_memset(ev->pad, 0, sizeof(ev->pad));
	events.ringbuf_submit(ev, 0);
	count(CTR_EVENT_HTTP_RESPONSE);
}

int botwall_tc_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 line[STATUS_LINE_BYTES];
	struct flow_tuple client;
	struct packet pkt = {};
	struct flow_state *fs;
	__u32 port;
	__u8 *watch;
	__u64 now;

	if (parse_packet(data, data_end, &pkt) != 0)
		return TC_ACT_OK;
	port = pkt.flow.sport;
	watch = watched_ports.lookup(&port);
	if (!watch || !*watch)
		return TC_ACT_OK;
	count(CTR_EGRESS_PACKETS);

	/* Flows are keyed client -> server. */
	client.saddr = pkt.flow.daddr;
	client.daddr = pkt.flow.saddr;
	client.sport = pkt.flow.dport;
	client.dport = pkt.flow.sport;
	client.ip_version = pkt.flow.ip_version;
	client.pad[0] = client.pad[1] = client.pad[2] = 0;
	fs = flows.lookup(&client);
	if (!fs) {
		count(CTR_EGRESS_NO_FLOW);
		return TC_ACT_OK;
	}
	now = coarse_now(); /* flow-state time, see observe() */
	fs->last_ns = now;
	fs->server_packets++;
	fs->server_bytes += pkt.payload_len;

	if ((*watch & WATCH_HTTP) && pkt.payload_len >= STATUS_LINE_BYTES &&
	    bpf_skb_load_bytes(skb, pkt.payload_offset, line, sizeof(line)) == 0 &&
	    line[0] == 'H' && line[1] == 'T' && line[2] == 'T' && line[3] == 'P' && line[4] == '/' &&
	    line[5] == '1' && line[6] == '.' && line[8] == ' ' && digit(line[9]) &&
	    digit(line[10]) && digit(line[11])) {
		__u16 status = (line[9] - '0') * 100 + (line[10] - '0') * 10 + (line[11] - '0');

		emit_http_response(&client, fs, status, pkt.payload_len, now);
	}

	if (pkt.tcp->rst)
		end_flow(&client, fs, FLOW_END_SERVER_RST, now);
	return TC_ACT_OK;
}

/* ---- tc ingress: packets XDP could not read a port from ----
 *
 * A fragment after the first, an IPv6 header chain longer than parse_ip6hdr
 * walks, a TCP header cut short or split over two fragments: XDP cannot read
 * a port from them, so no verdict can be matched to a watched port, and it
 * passes them (fail open). The kernel's own stack may still reassemble or
 * accept them, so a blocked client could get through by wrapping its
 * segments in seven extension headers or splitting its TCP header. This
 * program, on the same interface's tc ingress, drops such packets when their
 * source is blocked (address or CIDR) and not allowed. An honest client sends
 * none, and everything else passes. It runs after XDP, with a verifier budget
 * of its own (botwall_xdp has none left), and returns at once while no block
 * verdict exists. It never touches a packet XDP parsed.
 */
int botwall_tc_ingress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct lpm_key prefix = {.prefixlen = 128};
	struct packet pkt = {};
	struct verdict *v;
	struct config *cfg;
	__u32 zero = 0, kinds;
	__u64 now;
	int rc;

	cfg = config.lookup(&zero);
	kinds = cfg ? cfg->verdict_kinds : 0;
	if (!(kinds & (VERDICT_BLOCK | VERDICT_BLOCK_CIDR)))
		return TC_ACT_OK;
	rc = parse_packet(data, data_end, &pkt);
	/* Parsed (XDP enforced it), not TCP, or not even a readable IP header. */
	if (rc == 0 || rc == 1 || !pkt.flow.ip_version)
		return TC_ACT_OK;
	now = coarse_now();
	__builtin_memcpy(&prefix.addr, &pkt.flow.saddr, sizeof(prefix.addr));
	if (kinds & VERDICT_ALLOW) {
		v = allow_addr.lookup(&pkt.flow.saddr);
		if (v && verdict_live(v, now))
			return TC_ACT_OK;
	}
	if (kinds & VERDICT_ALLOW_CIDR) {
		v = allow_cidr.lookup(&prefix);
		if (v && verdict_live(v, now))
			return TC_ACT_OK;
	}
	if (kinds & VERDICT_BLOCK) {
		v = block_addr.lookup(&pkt.flow.saddr);
		if (v && verdict_live(v, now))
			goto drop;
	}
	if (kinds & VERDICT_BLOCK_CIDR) {
		v = block_cidr.lookup(&prefix);
		if (v && verdict_live(v, now))
			goto drop;
	}
	return TC_ACT_OK;
drop:
	count(CTR_DROP_BLOCK_UNPARSED);
	return TC_ACT_SHOT;
}
