/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color: the node classifier's maps (bpf/node.c). Structs and constants
 * are in sc_abi.h, mirrored by sidecar/datapath/abi.py (NODE_MAPS).
 *
 * Sizes are Python's (sidecar/datapath/build.py passes them with -D):
 *   SC_NODE_IFINDEX_SLOTS  entries of sc_node_iftab's value, a power of two
 *   SC_NODE_MAX_IFACES     counter slots of sc_node_counts (slot 0: unattributed)
 *
 * Why two of the maps are read in place: every bpf_map_lookup_elem() with a
 * key computed per packet costs a store and a reload of the key on the stack
 * and a bounds check, even when the verifier inlines it (on the 6.18 kernel
 * measured here it inlines both arrays and per-CPU arrays: `bpftool prog dump
 * xlated` shows no call). An array with a single value can instead be
 * addressed directly (BPF_PSEUDO_MAP_VALUE, the kernel's "direct value access"
 * that libbpf uses for global variables): a 64-bit load of the value's address,
 * no call, no key, no NULL check. BCC creates maps only for its own
 * BPF_TABLE declarations and has no syntax for this, so the build child creates
 * those two maps itself and passes their file descriptors with -D:
 *   SC_NODE_DSCPTAB_FD  sc_node_dscptab, one struct sc_node_table
 *   SC_NODE_IFTAB_FD    sc_node_iftab, one struct sc_node_iface[SC_NODE_IFINDEX_SLOTS]
 * The per-CPU counters stay a BCC map (direct value access does not exist for
 * per-CPU maps), looked up once per colored packet by counter slot: its value
 * is the slot's row of counters, one per color id (struct sc_node_counters).
 */
#ifndef SC_NODE_MAPS_H
#define SC_NODE_MAPS_H

#include "sc_abi.h"

#ifndef SC_NODE_IFINDEX_SLOTS
#error "SC_NODE_IFINDEX_SLOTS must be passed with -D: Python owns map sizes"
#endif
#ifndef SC_NODE_MAX_IFACES
#error "SC_NODE_MAX_IFACES must be passed with -D: Python owns map sizes"
#endif
#if SC_NODE_IFINDEX_SLOTS & (SC_NODE_IFINDEX_SLOTS - 1)
#error "SC_NODE_IFINDEX_SLOTS must be a power of two"
#endif
#if !defined(SC_NODE_DSCPTAB_FD) || !defined(SC_NODE_IFTAB_FD)
#error "SC_NODE_DSCPTAB_FD and SC_NODE_IFTAB_FD must be passed with -D by the build child"
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

/* ifindex & (SC_NODE_IFINDEX_SLOTS - 1) -> the interface's counter slot. */
static __always_inline const struct sc_node_iface *sc_node_iftab(void)
{
	return sc_map_value(SC_NODE_IFTAB_FD);
}

#endif /* SC_NODE_MAPS_H */
