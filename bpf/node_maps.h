/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color: the node classifier's maps (bpf/node.c). Structs and constants
 * are in sc_abi.h, mirrored by sidecar/datapath/abi.py (NODE_MAPS).
 *
 * Sizes are Python's (sidecar/datapath/build.py passes them with -D):
 *   SC_NODE_IFINDEX_SLOTS  entries of sc_node_ifaces, a power of two
 *   SC_NODE_MAX_IFACES     counter slots of sc_node_stats (slot 0: unattributed)
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

/* DSCP -> color (mark, priority, restore value), two generations for atomic reloads. */
BPF_ARRAY(sc_node_colors, struct sc_node_color, SC_DSCP_VALUES * SC_GENERATIONS);
/* Entry 0: the live generation of sc_node_colors. */
BPF_ARRAY(sc_node_config, struct sc_config, 1);
/* ifindex & (SC_NODE_IFINDEX_SLOTS - 1) -> the interface's counter slot. */
BPF_ARRAY(sc_node_ifaces, struct sc_node_iface, SC_NODE_IFINDEX_SLOTS);
/* Packets and bytes per (counter slot, color id), per CPU so counting needs no atomics. */
BPF_PERCPU_ARRAY(sc_node_stats, struct sc_counter, SC_NODE_MAX_IFACES * SC_MAX_COLORS);

#endif /* SC_NODE_MAPS_H */
