/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color: every shared struct, constant and flag bit of the classifiers
 * (bpf/classifier.c in pods, bpf/node.c on nodes).
 *
 * This header is the source of truth for the kernel/user-space ABI. It must be
 * kept in sync with sidecar/datapath/abi.py (ctypes mirrors and constants);
 * tests/unit/test_abi.py compiles tests/abi/probe.c against this file with the
 * host compiler and compares every size, offset and constant. A struct whose
 * layout changes gets a new map name (sc_flows -> sc_flows4/6). It compiles in
 * user space with only <linux/types.h>; the maps are in maps.h (pod) and
 * node_maps.h (node).
 */
#ifndef SC_ABI_H
#define SC_ABI_H

#include <linux/types.h>

/* ------------------------------------------------------------- constants */

/* Color ids are 1..SC_MAX_COLORS-1; 0 means "no color" and is never looked up. */
#define SC_MAX_COLORS 64
/* The color table holds this many generations of SC_MAX_COLORS entries. */
#define SC_GENERATIONS 2

/* Hook ids: which entry point counted a packet (index into sc_stats). */
#define SC_HOOK_INGRESS 0
#define SC_HOOK_EGRESS 1
#define SC_HOOKS 2

/* struct sc_color.flags bits. Bits are only ever added, never reused. */
#define F_PRESENT (1U << 0)      /* the slot holds a color of the live policy */
#define F_HAS_PRIORITY (1U << 1) /* set skb->priority = priority */
#define F_HAS_DSCP (1U << 2)     /* rewrite the DS field to dscp, keeping ECN */

/* struct sc_flow_value.flags bits (user space only; the classifier ignores them). */
#define F_FLOW_REPLY (1U << 0) /* this entry is the reverse key of a flow */

/* Node classifier (bpf/node.c): struct sc_node_table is indexed by DSCP, 0..63. */
#define SC_DSCP_VALUES 64
/* struct sc_node_color.flags bit (F_PRESENT and F_HAS_PRIORITY mean what they mean above). */
#define F_RESTORE_DSCP (1U << 3) /* rewrite the DS field to restore_dscp once read */

/* Entries in sc_stats: one per (color id, hook). */
#define SC_STATS_SLOTS (SC_MAX_COLORS * SC_HOOKS)

/* --------------------------------------------------------- shared structs */

/*
 * Flow keys: one direction of a TCP flow as its packets carry it on the wire,
 * one map per IP version so that the IPv4 key (most cluster traffic) is 12
 * bytes instead of 36: the kernel hashes and compares every key byte on each
 * lookup. User space writes two entries per flow, the forward key (local ->
 * remote) and the reverse key (remote -> local, flagged F_FLOW_REPLY), so the
 * classifier finds either direction with exactly one lookup of the key as sent.
 * No padding: every byte is hashed.
 */
struct sc_flow4_key {
	__be32 saddr; /* network order */
	__be32 daddr; /* network order */
	__be16 sport; /* network order */
	__be16 dport; /* network order */
};

struct sc_flow6_key {
	__u8 saddr[16]; /* network order */
	__u8 daddr[16]; /* network order */
	__be16 sport;   /* network order */
	__be16 dport;   /* network order */
};

/* sc_flows4 / sc_flows6 value. */
struct sc_flow_value {
	__u32 color_id; /* host order; 1..SC_MAX_COLORS-1 */
	__u32 flags;    /* host order; F_FLOW_* bits */
};

/*
 * sc_colors value, at index generation * SC_MAX_COLORS + color id.
 * Each entry carries the policy's mark mask itself, so that one generation
 * is a complete, self-contained view of a policy (see sc_config).
 */
struct sc_color {
	__u32 mark;     /* host order; bits to set in skb->mark, within mask */
	__u32 mask;     /* host order; bits of skb->mark owned by this sidecar */
	__u32 priority; /* host order; skb->priority, used when F_HAS_PRIORITY */
	__u32 flags;    /* host order; F_* bits */
	__u8 dscp;      /* 0..63, used when F_HAS_DSCP */
	__u8 pad[3];    /* zero */
};

/*
 * sc_config value, the single entry 0: which generation of sc_colors is live.
 * Reload writes the inactive generation, then flips this word. The classifier
 * reads it once per packet and uses only bit 0, so even a torn read can only
 * see 0 or 1: a packet sees the old policy or the new one, never a mix.
 */
struct sc_config {
	__u32 generation; /* host order; 0 or 1 */
	__u32 reserved;   /* zero */
};

/* sc_stats value (per CPU), at index color_id * SC_HOOKS + hook. */
struct sc_counter {
	__u64 packets; /* host order */
	__u64 bytes;   /* host order; skb->len, L2 header included */
};

/*
 * What a packet arriving from a pod with a given DSCP gets: one entry of
 * struct sc_node_table, per generation. 32 bytes, a power of two, so the
 * classifier finds an entry with a shift, not a multiply. User space stores
 * the mark already within the mask and the mask inverted (keep), so the
 * classifier applies it as (skb->mark & keep) | mark: two operations, no
 * negation or masking of its own.
 */
struct sc_node_color {
	__u32 mark;        /* host order; bits to set in skb->mark, within ~keep */
	__u32 keep;        /* host order; ~mark mask: the bits of skb->mark that stay */
	__u32 priority;    /* host order; skb->priority, used when F_HAS_PRIORITY */
	__u32 flags;       /* host order; F_PRESENT, F_HAS_PRIORITY, F_RESTORE_DSCP */
	__u32 color_id;    /* host order; 1..SC_MAX_COLORS-1, the counter's column */
	__u8 restore_dscp; /* 0..63, written back when F_RESTORE_DSCP */
	__u8 pad[11];      /* zero */
};

/*
 * The single value of sc_node_dscptab: the live generation and both
 * generations' DSCP tables, so the classifier reads one value (in place, no
 * lookup) where the pod's classifier looks up sc_config and sc_colors. Reload
 * writes the value with the inactive half new and generation unchanged, then
 * writes it again with only generation flipped: bytes that do not change are
 * rewritten with themselves, and the classifier reads generation once per
 * packet and uses only bit 0, so a packet sees the old policy or the new one,
 * never a mix.
 */
struct sc_node_table {
	__u32 generation; /* host order; 0 or 1 */
	__u32 reserved;   /* zero */
	struct sc_node_color colors[SC_GENERATIONS][SC_DSCP_VALUES]; /* [generation][DSCP] */
};

/*
 * sc_node_counts value (per CPU), at index counter slot: that slot's counters
 * by color id. One row per slot, so the classifier looks up its interface's
 * row by the slot it already has and indexes the color in it (no key to
 * compute), and user space reads a slot with one lookup, not one per color.
 */
struct sc_node_counters {
	struct sc_counter colors[SC_MAX_COLORS]; /* [color id]; 0 is never counted */
};

#endif /* SC_ABI_H */
