/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color tc classifier: colors the packets of upstream TCP flows.
 *
 * Entry points, one per hook, both for a clsact qdisc in direct-action mode:
 *   sc_tc_ingress  at tc ingress (parent ffff:fff2)
 *   sc_tc_egress   at tc egress  (parent ffff:fff3)
 * Compiled by BCC at start (sidecar/datapath/build.py) with
 * -DSC_FLOW_MAP_SIZE=2N for a policy flow_table_size of N (two entries per
 * flow). Maps are in maps.h, structs in sc_abi.h.
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
#include "dscp.h"

/* Never a decision of ours: let later filters on a shared hook see the packet. */
#define SC_VERDICT TC_ACT_UNSPEC

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
