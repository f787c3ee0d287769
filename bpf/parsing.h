/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Bounded header parsers shared by the XDP and tc programs.
 *
 * Contract: each parser takes a cursor and data_end, checks every byte it reads
 * against data_end, advances the cursor past its header and returns the next
 * protocol (EtherType or IP protocol number), or -1 when the header is
 * truncated or malformed. The caller passes on -1: this sensor fails open.
 */
#ifndef BOTWALL_PARSING_H
#define BOTWALL_PARSING_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>

#include "common.h"

#define PARSE_FRAGMENT -2 /* a non-first IP fragment: no transport header to read */

struct cursor {
	void *pos;
};

struct vlan_hdr {
	__be16 tci;
	__be16 encapsulated_proto;
};

struct ipv6_ext_hdr {
	__u8 nexthdr;
	__u8 hdrlen; /* in 8-byte units, not counting the first 8 */
};

struct ipv6_frag_hdr {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off; /* offset in the top 13 bits, MF in bit 0 */
	__be32 identification;
};

/* What the entry points need from one packet, filled by parse_packet(). */
struct packet {
	struct flow_tuple flow; /* as it travels: saddr is the sender */
	struct tcphdr *tcp;
	void *payload; /* first byte after the TCP header */
	__u32 payload_offset; /* of payload from the start of the packet */
	__u16 payload_len; /* from the IP length fields: frames may be padded */
	__u16 ip_total_len;
	__u16 ip_id;
	__u8 ttl;
	__u8 df;
	__u8 ecn;
	__u8 flow_label_set;
	__u8 new_hello; /* set by observe(): this segment starts a ClientHello */
};

/* PROVEN_SIZE(len, max): the size for a bpf_xdp_load_bytes() call, `len`,
 * which the caller has already made at least 1 and at most `max`.
 *
 * Older verifiers (Debian 12's 6.1) learn nothing from `len != 0`, and lose
 * what a compare proved when clang tests one copy of a value and passes
 * another; they refuse the program. For them the loader recompiles with
 * BOTWALL_PROVEN_SIZES (sensor/loader.py), and the size is computed again
 * where they can follow it: the lower bound from arithmetic, the upper from
 * a compare written in assembly on the very register returned, after an
 * empty asm that keeps clang from folding the identity away. Newer
 * verifiers prove the sizes as written, and this program has little of
 * their complexity budget left to spend, so for them it is `len` itself.
 * botwall_hello, with a budget of its own, calls proven_size() always. */
static __always_inline __u64 proven_size(__u64 len, __u64 max)
{
	asm volatile("" : "+r"(len));
	len = ((len - 1) & 0xffff) + 1; /* within [1, 65536] */
	asm volatile("if %[len] <= %[max] goto +1\n\t"
		     "%[len] = %[max]"
		     : [len] "+r"(len)
		     : [max] "r"(max));
	return len;
}
#ifdef BOTWALL_PROVEN_SIZES
#define PROVEN_SIZE(len, max) proven_size((len), (max))
#else
#define PROVEN_SIZE(len, max) (len)
#endif

static __always_inline int parse_ethhdr(struct cursor *c, void *data_end)
{
	struct ethhdr *eth = c->pos;
	__u16 proto;

	if ((void *)(eth + 1) > data_end)
		return -1;
	c->pos = eth + 1;
	proto = eth->h_proto;

	/* 802.1ad outer tag, then 802.1Q inner tag: at most MAX_VLAN_DEPTH. */
#pragma unroll
	for (int i = 0; i < MAX_VLAN_DEPTH; i++) {
		struct vlan_hdr *vlan = c->pos;

		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if ((void *)(vlan + 1) > data_end)
			return -1;
		proto = vlan->encapsulated_proto;
		c->pos = vlan + 1;
	}
	return bpf_ntohs(proto);
}

static __always_inline int parse_iphdr(struct cursor *c, void *data_end, struct packet *pkt)
{
	struct iphdr *ip = c->pos;
	__u32 ihl_bytes;
	__u16 tot_len;

	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	ihl_bytes = ip->ihl * 4;
	/* Options: the header is longer than the struct. */
	if (c->pos + ihl_bytes > data_end)
		return -1;
	tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < ihl_bytes)
		return -1;
	/* From here on the source is known, even if what follows is unreadable. */
	pkt->flow.ip_version = 4;
	pkt->flow.saddr.w[0] = 0;
	pkt->flow.saddr.w[1] = 0;
	pkt->flow.saddr.w[2] = bpf_htonl(0xffff);
	pkt->flow.saddr.w[3] = ip->saddr;
	/* Fragment offset non-zero: this fragment has no TCP header. */
	if (ip->frag_off & bpf_htons(0x1fff))
		return PARSE_FRAGMENT;

	pkt->flow.daddr.w[0] = 0;
	pkt->flow.daddr.w[1] = 0;
	pkt->flow.daddr.w[2] = bpf_htonl(0xffff);
	pkt->flow.daddr.w[3] = ip->daddr;
	pkt->ip_total_len = tot_len;
	pkt->ip_id = bpf_ntohs(ip->id);
	pkt->ttl = ip->ttl;
	pkt->df = !!(ip->frag_off & bpf_htons(0x4000));
	pkt->ecn = ip->tos & 0x3;
	/* What remains for TCP, header and payload, according to IP. */
	pkt->payload_len = tot_len - ihl_bytes;
	c->pos += ihl_bytes;
	return ip->protocol;
}

static __always_inline int parse_ip6hdr(struct cursor *c, void *data_end, struct packet *pkt)
{
	struct ipv6hdr *ip6 = c->pos;
	__u32 ext_len = 0;
	__u8 nexthdr;

	if ((void *)(ip6 + 1) > data_end)
		return -1;
	if (ip6->version != 6)
		return -1;
	c->pos = ip6 + 1;
	nexthdr = ip6->nexthdr;

	/* From here on the source is known, even if what follows is unreadable. */
	pkt->flow.ip_version = 6;
	__builtin_memcpy(&pkt->flow.saddr, &ip6->saddr, 16);
	__builtin_memcpy(&pkt->flow.daddr, &ip6->daddr, 16);
	pkt->ip_total_len = bpf_ntohs(ip6->payload_len) + sizeof(*ip6);
	pkt->ttl = ip6->hop_limit;
	pkt->df = 1; /* IPv6 routers never fragment */
	/* Traffic class is priority:flow_lbl[0]>>4; ECN is its low two bits. */
	pkt->ecn = (ip6->flow_lbl[0] >> 4) & 0x3;
	pkt->flow_label_set = (ip6->flow_lbl[0] & 0x0f) || ip6->flow_lbl[1] || ip6->flow_lbl[2];

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HEADERS; i++) {
		struct ipv6_ext_hdr *ext = c->pos;
		struct ipv6_frag_hdr *frag = c->pos;
		__u32 len;

		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if ((void *)(ext + 1) > data_end)
				return -1;
			len = (ext->hdrlen + 1) * 8;
			if (c->pos + len > data_end)
				return -1;
			nexthdr = ext->nexthdr;
			c->pos += len;
			ext_len += len;
			break;
		case IPPROTO_FRAGMENT:
			if ((void *)(frag + 1) > data_end)
				return -1;
			if (frag->frag_off & bpf_htons(0xfff8))
				return PARSE_FRAGMENT;
			nexthdr = frag->nexthdr;
			c->pos = frag + 1;
			ext_len += sizeof(*frag);
			break;
		default:
			goto done;
		}
	}
	/* All MAX_IPV6_EXT_HEADERS walked: the packet is fine unless yet another
	 * one follows, more than we walk: treat that as malformed, pass. */
	switch (nexthdr) {
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_FRAGMENT:
		return -1;
	}
done:
	if (bpf_ntohs(ip6->payload_len) < ext_len)
		return -1;
	pkt->payload_len = bpf_ntohs(ip6->payload_len) - ext_len;
	return nexthdr;
}

static __always_inline int parse_tcphdr(struct cursor *c, void *data_end, struct packet *pkt)
{
	struct tcphdr *tcp = c->pos;
	__u32 doff_bytes;

	if ((void *)(tcp + 1) > data_end)
		return -1;
	doff_bytes = tcp->doff * 4;
	if (doff_bytes < sizeof(*tcp))
		return -1;
	if (c->pos + doff_bytes > data_end)
		return -1;
	if (pkt->payload_len < doff_bytes)
		return -1;
	pkt->tcp = tcp;
	pkt->flow.sport = bpf_ntohs(tcp->source);
	pkt->flow.dport = bpf_ntohs(tcp->dest);
	pkt->payload_len -= doff_bytes;
	c->pos += doff_bytes;
	pkt->payload = c->pos;
	return 0;
}

/* Ethernet → VLAN → IPv4/IPv6 (+ext) → TCP. Returns 0 for a parsed TCP packet,
 * 1 for a well-formed packet that is not TCP, PARSE_FRAGMENT, or -1. */
static __always_inline int parse_packet(void *data, void *data_end, struct packet *pkt)
{
	struct cursor c = {.pos = data};
	int proto;

	proto = parse_ethhdr(&c, data_end);
	if (proto == ETH_P_IP)
		proto = parse_iphdr(&c, data_end, pkt);
	else if (proto == ETH_P_IPV6)
		proto = parse_ip6hdr(&c, data_end, pkt);
	else
		return proto < 0 ? -1 : 1;
	if (proto < 0)
		return proto;
	if (proto != IPPROTO_TCP)
		return 1;
	if (parse_tcphdr(&c, data_end, pkt) < 0)
		return -1;
	pkt->payload_offset = c.pos - data;
	return 0;
}

#endif /* BOTWALL_PARSING_H */
