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
 * generation of sc_node_dscptab, the classifier sets that color's mark within
 * the mask (other bits belong to Kubernetes, Cilium, Calico...), optionally
 * skb->priority, counts the packet per (interface, color), and optionally
 * writes restore_dscp back (IPv4 checksum fixed), before the node's routing
 * decision reads the mark (`ip rule fwmark`). It does no flow lookup. It never
 * drops: every path returns SC_VERDICT (TC_ACT_UNSPEC), and packets with any
 * other DSCP, or that are not IP, pass untouched.
 *
 * Cost (bench/bpf_cost.py holds it to 1.5x an empty tc program): the color
 * table is read in place (node_maps.h) and the interface's counter slot comes
 * with the filter (skb->tc_classid), so a colored packet costs one packet load
 * (ethertype and DS field together), its color entry (plain loads), the mark,
 * and one inlined map lookup: the per-CPU row of its interface's counters. Each step below takes
 * the form with the fewest dependent loads and operations; the comments say
 * which, since an empty program is only about ten nanoseconds.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>

#include "node_maps.h"
#include "parse.h"
#include "dscp.h"

/* Never a decision of ours: let later filters on a shared hook see the packet. */
#define SC_VERDICT TC_ACT_UNSPEC

/* Bytes 12..15 of a frame, in host order: ethertype:16 | the IP header's first 16 bits. */
#define SC_HEAD_OFF __builtin_offsetof(struct ethhdr, h_proto)
/* What must match in them: the ethertype and the IP version nibble. */
#define SC_HEAD_MASK 0xfffff000U
#define SC_HEAD_IPV4 (((__u32)ETH_P_IP << 16) | (4U << 12))
#define SC_HEAD_IPV6 (((__u32)ETH_P_IPV6 << 16) | (6U << 12))

/*
 * The packet's DSCP, or -1 when it is not IPv4 or IPv6 behind an untagged
 * Ethernet header. One 32-bit load covers the ethertype and the IP header's
 * first two bytes and one byte swap puts them in host order, so the family
 * and version checks are one masked compare each and the DSCP one shift:
 *   IPv4  0x0800 | version:4 ihl:4 | DSCP:6 ECN:2
 *   IPv6  0x86dd | version:4 | DSCP:6 ECN:2 (traffic class) | flow label:4
 * The load is unaligned when the IP header is 4-aligned. The verifier allows
 * that only where the kernel has efficient unaligned access (x86-64, arm64,
 * ppc64, s390x); elsewhere it refuses the program, so the build child passes
 * SC_STRICT_ALIGN there and the same 32 bits come from two aligned 16-bit loads.
 */
static __always_inline int sc_read_dscp(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	__u32 head;

	if (data + SC_HEAD_OFF + sizeof(head) > data_end)
		return -1;
#ifdef SC_STRICT_ALIGN
	head = (__u32)sc_ntohs(*(__be16 *)(data + SC_HEAD_OFF)) << 16 |
	       sc_ntohs(*(__be16 *)(data + SC_HEAD_OFF + 2));
#else
	head = sc_ntohl(*(__u32 *)(data + SC_HEAD_OFF));
#endif
	if ((head & SC_HEAD_MASK) == SC_HEAD_IPV4)
		return (head >> 2) & 0x3f;
	if ((head & SC_HEAD_MASK) == SC_HEAD_IPV6)
		return (head >> 6) & 0x3f;
	return -1;
}

/*
 * Keep a computed address in one register: without this, clang sinks the
 * address arithmetic into every block that uses it (for the color entry,
 * seven instructions per use: the generation and the DSCP shifted and added
 * to the table again for the options and the counter).
 */
#define sc_keep_in_register(ptr) asm volatile("" : "+r"(ptr))

/* tc ingress of a host-side pod interface (clsact ffff:fff2). */
int sc_node_ingress(struct __sk_buff *skb)
{
	const struct sc_node_table *table = sc_node_table();
	const struct sc_node_color *color;
	struct sc_node_counters *row;
	struct sc_counter *cnt;
	__u32 flags, color_id, slot;
	int dscp;

	dscp = sc_read_dscp(skb);
	if (dscp < 0)
		return SC_VERDICT;

	/* One read of the live generation per packet: old policy or new, never a mix. */
	color = &table->colors[table->generation & 1][dscp & (SC_DSCP_VALUES - 1)];
	sc_keep_in_register(color);
	flags = color->flags;
	if (!(flags & F_PRESENT))
		return SC_VERDICT;
	/* Read before the restore's helper calls, which keep only r6-r9. */
	color_id = color->color_id & (SC_MAX_COLORS - 1);

	/* keep is ~mask and mark is within the mask (user space makes them so). */
	skb->mark = (skb->mark & color->keep) | color->mark;

	/*
	 * The interface's counter slot is the classid the node agent put on this
	 * interface's filter (TCA_BPF_CLASSID): cls_bpf copies it to
	 * qdisc_skb_cb(skb)->tc_classid before it runs the program, and
	 * skb->tc_classid reads its minor, 16 bits. One load from the skb, no
	 * table: the kernel keeps the per-interface constant with the filter. Slot
	 * 0 (no classid) is "unattributed", which is where BPF_PROG_TEST_RUN counts.
	 * (The field keeps our classid after we return: later bpf filters get
	 * their own, tc actions on later filters see ours.)
	 */
	slot = skb->tc_classid;

	/*
	 * The options, one test for a color that has neither. The restore comes
	 * after every packet access: its helpers invalidate packet pointers.
	 */
	if (flags & (F_HAS_PRIORITY | F_RESTORE_DSCP)) {
		if (flags & F_HAS_PRIORITY)
			skb->priority = color->priority;
		if (flags & F_RESTORE_DSCP)
			sc_set_dscp(skb, color->restore_dscp);
	}

	/* Keyed by the slot as read: user space writes no slot past the map's end. */
	row = sc_node_counts.lookup(&slot);
	if (row) {
		cnt = &row->colors[color_id];
		cnt->packets += 1;
		cnt->bytes += skb->len;
	}
	return SC_VERDICT;
}
