/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color: the node classifier's maps (bpf/node.c). Structs and constants
 * are in sc_abi.h, mirrored by sidecar/datapath/abi.py (NODE_MAPS).
 *
 * Sizes are Python's (sidecar/datapath/build.py passes them with -D):
 *   SC_NODE_MAX_IFACES  counter slots of sc_node_counts (slot 0: unattributed)
 *
 * Why the color table is read in place: every bpf_map_lookup_elem() with a
 * key computed per packet costs a store and a reload of the key on the stack
 * and a bounds check, even when the verifier inlines it (on the 6.18 kernel
 * measured here it inlines both arrays and per-CPU arrays: `bpftool prog dump
 * xlated` shows no call). An array with a single value can instead be
 * addressed directly (BPF_PSEUDO_MAP_VALUE, the kernel's "direct value access"
 * that libbpf uses for global variables): a 64-bit load of the value's address,
 * no call, no key, no NULL check. BCC creates maps only for its own
 * BPF_TABLE declarations and has no syntax for this, so the build child creates
 * that map itself and passes its file descriptor with -D:
 *   SC_NODE_DSCPTAB_FD  sc_node_dscptab, one struct sc_node_table
 * Which interface a packet came in on needs no map at all: the node agent
 * puts each interface's counter slot on its filter as the classid, which the
 * program reads as skb->tc_classid (bpf/node.c). The per-CPU counters stay a BCC map (direct value access does not exist for
 * per-CPU maps), looked up once per colored packet by counter slot: its value
 * is the slot's row of counters, one per color id (struct sc_node_counters).
 */
#ifndef SC_NODE_MAPS_H
#define SC_NODE_MAPS_H

#include "sc_abi.h"

#ifndef SC_NODE_MAX_IFACES
#error "SC_NODE_MAX_IFACES must be passed with -D: Python owns map sizes"
#endif
#if SC_NODE_MAX_IFACES > 65536
#error "SC_NODE_MAX_IFACES must fit a classid's 16-bit minor"
#endif
#ifndef SC_NODE_DSCPTAB_FD
#error "SC_NODE_DSCPTAB_FD must be passed with -D by the build child"
#endif

/* Packets and bytes per (counter slot, color id), per CPU so counting needs no atomics. */
BPF_PERCPU_ARRAY(sc_node_counts, struct sc_node_counters, SC_NODE_MAX_IFACES);

/* The address of a single-value array map's value (BPF_PSEUDO_MAP_VALUE, offset 0). */
#define sc_map_value(fd) ((void *)bpf_pseudo_fd(BPF_PSEUDO_MAP_VALUE, (fd)))

/* The live generation and both generations' DSCP -> color tables. */
static __always_inline const struct sc_node_table *sc_node_table(void)
{
	return sc_map_value(SC_NODE_DSCPTAB_FD);
}

#endif /* SC_NODE_MAPS_H */
