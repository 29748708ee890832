/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color tc classifier: colors the packets of upstream TCP flows.
 *
 * Entry points, one per hook, both for a clsact qdisc in direct-action mode:
 *   sc_tc_ingress  at tc ingress (parent ffff:fff2)
 *   sc_tc_egress   at tc egress  (parent ffff:fff3)
 * Compiled by BCC at start (sidecar/datapath/build.py) with
 * -DSC_FLOW_MAP_SIZE=2N for a policy flow_table_size of N (two entries per
 * flow). Maps and structs are in maps.h.
 *
 * For a packet of a known flow (either direction: user space writes both keys,
 * so every packet costs exactly one flow lookup) whose color is in the live
 * generation of sc_colors, the classifier sets the color's mark within the
 * sidecar's mask (other bits belong to Kubernetes, Cilium, Calico...),
 * optionally skb->priority and the DSCP, and counts the packet. It never
 * drops: every path returns SC_VERDICT (TC_ACT_UNSPEC), so the packet goes on
 * to the next filter on the hook (Cilium's, Calico's...) or, with none, passes;
 * packets it does not understand pass untouched.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"

/* Never a decision of ours: let later filters on a shared hook see the packet. */
#define SC_VERDICT TC_ACT_UNSPEC

/*
 * Rewrite the DS field to dscp, keeping the two ECN bits; IPv4 checksum fixed.
 * Only colors with a DSCP get here, so the IP header's first bytes are read
 * again rather than carried from the parser through every packet.
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

/* The flow's entry for the packet as sent (either direction: both are in the map), or NULL. */
static __always_inline struct sc_flow_value *sc_find_flow(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	__be16 proto;

	/* The shortest packet we key (Ethernet + IPv4 + TCP); sc_parse4 repeats this check,
	 * which the compiler folds into this one. */
	if (data + sizeof(*eth) + sizeof(struct iphdr) + sizeof(struct tcphdr) > data_end)
		return NULL;
	/* One 16-bit load (struct ethhdr is packed, which would make it two byte loads). */
	proto = *(__be16 *)(data + __builtin_offsetof(struct ethhdr, h_proto));
	if (proto == sc_htons(ETH_P_IP)) {
		struct sc_flow4_key key;

		if (sc_parse4(data, data_end, &key) < 0)
			return NULL;
		return sc_flows4.lookup(&key);
	}
	if (proto == sc_htons(ETH_P_IPV6)) {
		struct sc_flow6_key key;

		if (sc_parse6(data, data_end, &key) < 0)
			return NULL;
		return sc_flows6.lookup(&key);
	}
	return NULL;
}

static __always_inline int sc_classify(struct __sk_buff *skb, __u32 hook)
{
	struct sc_flow_value *flow;
	struct sc_config *cfg;
	struct sc_color *color;
	struct sc_counter *cnt;
	__u32 zero = 0, slot, idx, color_id;

	flow = sc_find_flow(skb);
	if (!flow)
		return SC_VERDICT;
	color_id = flow->color_id;
	if (color_id == 0 || color_id >= SC_MAX_COLORS)
		return SC_VERDICT;

	/* One read of the live generation per packet: old policy or new, never a mix. */
	cfg = sc_config.lookup(&zero);
	if (!cfg)
		return SC_VERDICT;
	slot = (cfg->generation & 1) * SC_MAX_COLORS + color_id;
	color = sc_colors.lookup(&slot);
	if (!color || !(color->flags & F_PRESENT))
		return SC_VERDICT;

	skb->mark = (skb->mark & ~color->mask) | (color->mark & color->mask);
	if (color->flags & F_HAS_PRIORITY)
		skb->priority = color->priority;

	idx = color_id * SC_HOOKS + hook;
	cnt = sc_stats.lookup(&idx);
	if (cnt) {
		cnt->packets += 1;
		cnt->bytes += skb->len;
	}

	/* Last: the helpers below invalidate packet pointers. */
	if (color->flags & F_HAS_DSCP)
		sc_set_dscp(skb, color->dscp);
	return SC_VERDICT;
}

/* tc ingress of the attach interface (clsact ffff:fff2). */
int sc_tc_ingress(struct __sk_buff *skb)
{
	return sc_classify(skb, SC_HOOK_INGRESS);
}

/* tc egress of the attach interface (clsact ffff:fff3). */
int sc_tc_egress(struct __sk_buff *skb)
{
	return sc_classify(skb, SC_HOOK_EGRESS);
}
