/* SPDX-License-Identifier: Apache-2.0 */
/*
 * traffic-color: the pod classifier's maps (bpf/classifier.c). Their structs,
 * constants and flag bits are in sc_abi.h, the ABI's source of truth, mirrored
 * by sidecar/datapath/abi.py (MAPS). The definitions need BCC's helpers and are
 * guarded by BPF_TABLE, which only BCC's prelude defines.
 */
#ifndef SC_MAPS_H
#define SC_MAPS_H

#include "sc_abi.h"

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
