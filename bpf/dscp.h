/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Rewriting the DS field, shared by the pod classifier (a color's DSCP) and the
 * node classifier (restore_dscp once the color is read).
 */
#ifndef SC_DSCP_H
#define SC_DSCP_H

#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>

#include "parse.h"

/*
 * Rewrite the DS field to dscp, keeping the two ECN bits; IPv4 checksum fixed
 * (IPv6 has no header checksum). Callers reach here rarely (only colors with a
 * DSCP to write), so the IP header's first bytes are read again rather than
 * carried from the parser through every packet. Call it last: the helpers
 * invalidate packet pointers.
 */
static __always_inline void sc_set_dscp(struct __sk_buff *skb, __u8 dscp)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__u8 *l3 = data + SC_L3_OFF; /* the IP header's first bytes, as on the wire */
	__u8 old, tos, word[2];
	__u16 from, to;

	if ((void *)(l3 + 2) > data_end)
		return;
	if (eth->h_proto == sc_htons(ETH_P_IP)) {
		old = l3[1];
		tos = (__u8)(dscp << 2) | (old & 0x3);
		if (tos == old)
			return;
		word[0] = l3[0];
		word[1] = tos;
		__builtin_memcpy(&from, l3, 2);
		__builtin_memcpy(&to, word, 2);
		bpf_l3_csum_replace(skb, SC_L3_OFF + __builtin_offsetof(struct iphdr, check), from,
				    to, sizeof(to));
		bpf_skb_store_bytes(skb, SC_L3_OFF + __builtin_offsetof(struct iphdr, tos), &tos, 1,
				    0);
	} else {
		/* version:4 | traffic class:8 | flow label:20, so the class straddles 0xVT 0xTF. */
		old = (__u8)((l3[0] & 0x0f) << 4) | (l3[1] >> 4);
		tos = (__u8)(dscp << 2) | (old & 0x3);
		if (tos == old)
			return;
		word[0] = (l3[0] & 0xf0) | (tos >> 4);
		word[1] = (__u8)(tos << 4) | (l3[1] & 0x0f);
		bpf_skb_store_bytes(skb, SC_L3_OFF, word, 2, 0);
	}
}

#endif /* SC_DSCP_H */
