/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color: every map, shared struct, size and flag bit of the classifier.
 *
 * This header is the source of truth for the kernel/user-space ABI. It must be
 * kept in sync with sidecar/datapath/abi.py (ctypes mirrors, map names and
 * constants); tests/unit/test_abi.py compiles tests/abi/probe.c against this
 * file with the host compiler and compares every size, offset and constant.
 * A struct whose layout changes gets a new map name (sc_flows -> sc_flows4/6).
 *
 * The top half (constants and structs) compiles in user space with only
 * <linux/types.h>; the map definitions at the bottom need BCC's helpers and
 * are guarded by BPF_TABLE, which only BCC's prelude defines.
 */
#ifndef SC_MAPS_H
#define SC_MAPS_H

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

/* ------------------------------------------------------------------- maps */
#ifdef BPF_TABLE

#ifndef SC_FLOW_MAP_SIZE
#error "SC_FLOW_MAP_SIZE must be passed with -D: Python owns map sizes (policy flow_table_size)"
#endif

/*
 * Upstream flows and their color, both directions of each flow (see above);
 * LRU so a leaked entry ages out instead of filling the map. SC_FLOW_MAP_SIZE
 * counts entries: build.py passes twice the policy's flow_table_size.
 */
BPF_TABLE("lru_hash", struct sc_flow4_key, struct sc_flow_value, sc_flows4, SC_FLOW_MAP_SIZE);
BPF_TABLE("lru_hash", struct sc_flow6_key, struct sc_flow_value, sc_flows6, SC_FLOW_MAP_SIZE);
/* Color id -> mark/priority/DSCP, two generations for atomic reloads. */
BPF_ARRAY(sc_colors, struct sc_color, SC_MAX_COLORS * SC_GENERATIONS);
/* Entry 0: the live generation of sc_colors. */
BPF_ARRAY(sc_config, struct sc_config, 1);
/* Packets and bytes per (color, hook), per CPU so counting needs no atomics. */
BPF_PERCPU_ARRAY(sc_stats, struct sc_counter, SC_STATS_SLOTS);

#endif /* BPF_TABLE */
#endif /* SC_MAPS_H */
