/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color node classifier: reads a packet's color from its DSCP.
 *
 * Entry point, for a clsact qdisc in direct-action mode:
 *   sc_node_ingress  at tc ingress (parent ffff:fff2) of each host-side pod
 *                    interface, where a pod's packets enter the node's routing
 * Attached by the node agent (sidecar/node.py); compiled by BCC at its start
 * (sidecar/datapath/build.py) with the sizes and map fds of node_maps.h passed as -D.
 *
 * A pod's sidecar writes its color's DSCP on every upstream socket (IP_TOS,
 * IPV6_TCLASS); a mark set in the pod is cleared at the veth, the DS field is
 * not. For an IPv4 or IPv6 packet whose DSCP is a color's in the live
 * generation of sc_node_table, the classifier sets that color's mark within
 * the mask (other bits belong to Kubernetes, Cilium, Calico...), optionally
 * skb->priority, counts the packet per (interface, color), and optionally
 * writes restore_dscp back (IPv4 checksum fixed), before the node's routing
 * decision reads the mark (`ip rule fwmark`). It does no flow lookup. It never
 * drops: every path returns SC_VERDICT (TC_ACT_UNSPEC), and packets with any
 * other DSCP, or that are not IP, pass untouched.
 *
 * Cost (bench/bpf_cost.py holds it to 1.5x an empty tc program): the color
 * table and the interface table are read in place (node_maps.h), so a colored
 * packet costs the DS field read, its color entry and interface entry (plain
 * loads), the mark, and one inlined map lookup: the per-CPU counter.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "node_maps.h"
#include "parse.h"
#include "dscp.h"

/* Never a decision of ours: let later filters on a shared hook see the packet. */
#define SC_VERDICT TC_ACT_UNSPEC

/* The packet's DSCP, or -1 when it is not IPv4 or IPv6 behind an untagged Ethernet header. */
static __always_inline int sc_read_dscp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u8 *l3 = data + SC_L3_OFF;
	__be16 proto;

	if ((void *)(l3 + 2) > data_end)
		return -1;
	/* One 16-bit load (struct ethhdr is packed, which would make it two byte loads). */
	proto = *(__be16 *)(data + __builtin_offsetof(struct ethhdr, h_proto));
	if (proto == sc_htons(ETH_P_IP))
		return (l3[0] >> 4) == 4 ? l3[1] >> 2 : -1;
	if (proto == sc_htons(ETH_P_IPV6))
		/* version:4 | traffic class:8: DSCP is the class's top six bits. */
		return (l3[0] >> 4) == 6 ? ((l3[0] & 0x0f) << 2) | (l3[1] >> 6) : -1;
	return -1;
}

/* tc ingress of a host-side pod interface (clsact ffff:fff2). */
int sc_node_ingress(struct __sk_buff *skb)
{
	const struct sc_node_table *table = sc_node_table();
	const struct sc_node_color *color;
	const struct sc_node_iface *iface;
	struct sc_counter *cnt;
	__u32 ifindex, idx, slot;
	int dscp;

	dscp = sc_read_dscp(skb);
	if (dscp < 0)
		return SC_VERDICT;

	/* One read of the live generation per packet: old policy or new, never a mix. */
	color = &table->colors[table->generation & 1][dscp & (SC_DSCP_VALUES - 1)];
	if (!(color->flags & F_PRESENT))
		return SC_VERDICT;

	skb->mark = (skb->mark & ~color->mask) | (color->mark & color->mask);
	if (color->flags & F_HAS_PRIORITY)
		skb->priority = color->priority;

	/* The interface's counter slot; one that has none (or lost its entry to an
	 * ifindex collision) is counted in slot 0, "unattributed". */
	ifindex = skb->ifindex;
	iface = &sc_node_iftab()[ifindex & (SC_NODE_IFINDEX_SLOTS - 1)];
	slot = iface->ifindex == ifindex ? iface->slot : 0;
	if (slot >= SC_NODE_MAX_IFACES)
		slot = 0;
	idx = slot * SC_MAX_COLORS + (color->color_id & (SC_MAX_COLORS - 1));

	/* Rare (restore_dscp set): its helpers invalidate packet pointers, none is used after. */
	if (color->flags & F_RESTORE_DSCP)
		sc_set_dscp(skb, color->restore_dscp);

	cnt = sc_node_stats.lookup(&idx);
	if (cnt) {
		cnt->packets += 1;
		cnt->bytes += skb->len;
	}
	return SC_VERDICT;
}
