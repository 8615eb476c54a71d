"""R-graph vs S-graph groupings (METHODS §4).

Nodes are the channels of one layer. The R-graph weighs an edge by the peer overlap R_X(i,j), the
S-graph by the pairwise target excess S_ij. Each keeps its top 10% positive off-diagonal edges;
greedy Newman modularity (networkx) partitions it. We report Q_R, Q_S, the modularity gap
Q_R − Q_S, NMI/ARI between the two partitions, and the same statistics on graphs whose kept edge
weights were shuffled among the layer's pairs (the null).
"""

from __future__ import annotations

import networkx as nx
import numpy as np
from networkx.algorithms.community import greedy_modularity_communities, modularity
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score


def top_edges(weights: np.ndarray, fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, w) of the top ``fraction`` of positive off-diagonal edges of ``weights: [C, C]``."""
    C = weights.shape[0]
    iu, ju = np.triu_indices(C, k=1)
    w = weights[iu, ju]
    pos = w > 0
    iu, ju, w = iu[pos], ju[pos], w[pos]
    keep = int(np.ceil(fraction * len(w)))
    if keep == 0:
        return iu[:0], ju[:0], w[:0]
    order = np.argsort(-w, kind="stable")[:keep]
    return iu[order], ju[order], w[order]


def partition(C: int, i: np.ndarray, j: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float]:
    """Greedy-modularity labels ``[C]`` and Q of the weighted graph on C nodes (isolated included)."""
    graph = nx.Graph()
    graph.add_nodes_from(range(C))
    graph.add_weighted_edges_from(zip(i.tolist(), j.tolist(), w.tolist()))
    labels = np.arange(C)
    if graph.number_of_edges() == 0:
        return labels, 0.0
    comms = greedy_modularity_communities(graph, weight="weight")
    for k, comm in enumerate(comms):
        labels[list(comm)] = k
    return labels, float(modularity(graph, comms, weight="weight"))


def _shuffled(C: int, weights: np.ndarray, fraction: float, rng: np.random.Generator):
    # Null: the same weight values placed on randomly chosen pairs (structure destroyed, marginal kept).
    iu, ju = np.triu_indices(C, k=1)
    vals = weights[iu, ju].copy()
    rng.shuffle(vals)
    shuffled = np.zeros_like(weights)
    shuffled[iu, ju] = vals
    return top_edges(shuffled + shuffled.T, fraction)


def compare_groupings(r_x: np.ndarray, s: np.ndarray, *, fraction: float = 0.1, null_shuffles: int = 2,
                      seed: int = 0) -> dict:
    """Q_R, Q_S, gap, NMI, ARI and their shuffled-null means for one layer's R and S matrices."""
    C = r_x.shape[0]
    lab_r, q_r = partition(C, *top_edges(r_x, fraction))
    lab_s, q_s = partition(C, *top_edges(s, fraction))
    out = {"q_r": q_r, "q_s": q_s, "modularity_gap": q_r - q_s,
           "nmi": float(normalized_mutual_info_score(lab_r, lab_s)),
           "ari": float(adjusted_rand_score(lab_r, lab_s))}
    rng = np.random.default_rng(seed)
    nulls = []
    for _ in range(max(0, null_shuffles)):
        nr_lab, nq_r = partition(C, *_shuffled(C, r_x, fraction, rng))
        ns_lab, nq_s = partition(C, *_shuffled(C, s, fraction, rng))
        nulls.append((nq_r, nq_s, nq_r - nq_s, normalized_mutual_info_score(nr_lab, ns_lab)))
    if nulls:
        n = np.asarray(nulls).mean(axis=0)
        out.update(null_q_r=float(n[0]), null_q_s=float(n[1]), null_modularity_gap=float(n[2]),
                   null_nmi=float(n[3]))
    out["labels_r"], out["labels_s"] = lab_r, lab_s
    return out
