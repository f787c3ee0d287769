/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The floor for bench/datapath.py: an XDP program that only passes the packet, so
 * each path is also read as a ratio to what BPF_PROG_TEST_RUN costs by itself. */
int bare_xdp(struct xdp_md *ctx)
{
	return XDP_PASS;
}
