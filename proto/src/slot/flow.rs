//! Min-cost max-flow for the slot planner's two flows (placing owners,
//! balancing primaries). It knows nothing of slots: nodes and edges are
//! plain indices, so it lives apart from the planner.

/// A flow network for min-cost max-flow, by successive shortest paths
/// (Bellman-Ford, as residual edges cost less than zero). Small: members
/// plus ranges as nodes. Edges are scanned in insertion order, so the
/// result is deterministic.
pub(super) struct Network {
    out: Vec<Vec<usize>>,
    to: Vec<usize>,
    cap: Vec<i64>,
    cost: Vec<i64>,
}

impl Network {
    pub(super) fn new(nodes: usize) -> Self {
        Self { out: vec![Vec::new(); nodes], to: Vec::new(), cap: Vec::new(), cost: Vec::new() }
    }

    /// Adds an edge and its residual twin; returns the edge's index.
    pub(super) fn edge(&mut self, from: usize, to: usize, cap: i64, cost: i64) -> usize {
        let e = self.to.len();
        self.to.extend([to, from]);
        self.cap.extend([cap, 0]);
        self.cost.extend([cost, -cost]);
        if let Some(out) = self.out.get_mut(from) {
            out.push(e);
        }
        if let Some(out) = self.out.get_mut(to) {
            out.push(e + 1);
        }
        e
    }

    /// The flow through edge `e` (its twin's residual capacity).
    pub(super) fn flow(&self, e: usize) -> i64 {
        self.cap.get(e ^ 1).copied().unwrap_or(0)
    }

    /// Pushes as much flow from `source` to `sink` as fits, cheapest paths
    /// first; returns how much.
    pub(super) fn run(&mut self, source: usize, sink: usize) -> i64 {
        let nodes = self.out.len();
        let mut total = 0;
        loop {
            let mut dist = vec![i64::MAX; nodes];
            let mut via = vec![usize::MAX; nodes];
            let mut queue = std::collections::VecDeque::new();
            let mut queued = vec![false; nodes];
            let mut pops = 0usize;
            if let Some(d) = dist.get_mut(source) {
                *d = 0;
            }
            queue.push_back(source);
            // Queue-based Bellman-Ford: no negative cycles arise in
            // successive shortest paths; the pop limit only bounds a bug.
            let limit = nodes.saturating_mul(self.to.len()).saturating_add(nodes);
            while let Some(u) = queue.pop_front() {
                pops += 1;
                if pops > limit {
                    return total;
                }
                queued[u] = false;
                let du = dist[u];
                for &e in &self.out[u] {
                    let v = self.to[e];
                    if self.cap[e] > 0 && du + self.cost[e] < dist[v] {
                        dist[v] = du + self.cost[e];
                        via[v] = e;
                        if !queued[v] {
                            queued[v] = true;
                            queue.push_back(v);
                        }
                    }
                }
            }
            if dist.get(sink).is_none_or(|&d| d == i64::MAX) {
                return total;
            }
            let mut push = i64::MAX;
            let mut v = sink;
            let mut path = Vec::new();
            while v != source {
                let e = via[v];
                if e == usize::MAX || path.len() > nodes {
                    return total;
                }
                push = push.min(self.cap[e]);
                path.push(e);
                v = self.to[e ^ 1];
            }
            for e in path {
                self.cap[e] -= push;
                self.cap[e ^ 1] += push;
            }
            total += push;
        }
    }
}
