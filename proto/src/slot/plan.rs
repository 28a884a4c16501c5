//! The planner behind [`SlotTable::plan`](super::SlotTable::plan): from
//! the current table's ranges and the new members it computes the next
//! table's ranges, moving as few slot-owner assignments as reach every
//! member's weighted share. Owners are placed by a min-cost flow of
//! vacancies (departed owners' cells and members over their share) into
//! members under their share, then primaries are balanced by a second flow
//! that only swaps roles inside slots, so that part moves no data. It is
//! all exact integer arithmetic over sorted input, with no hash map or
//! random number, so every replica of the metadata log computes the same
//! table.

use std::cmp::Reverse;

use super::flow::Network;
use super::{SLOTS, SlotError, SlotRange};

/// The ranges of the table [`SlotTable::plan`](super::SlotTable::plan)
/// returns for `members` and `rf` copies, planned from `ranges` (already
/// checked): see that method for the rules and the errors.
pub(super) fn place(ranges: &[SlotRange], members: &[(u32, u32)], rf: usize) -> Result<Vec<SlotRange>, SlotError> {
    let roster = Roster::new(members, rf)?;
    let segments = segments(ranges, &roster, rf);
    let runs = place_owners(&segments, &roster, rf)?;
    let runs = balance_primaries(runs, ranges, &roster, rf);
    Ok(compact(&runs, &roster))
}

/// The members of a plan, sorted by node id (so input order does not
/// matter), each known by its index in that order.
struct Roster {
    ids: Vec<u32>,
    weights: Vec<u64>,
}

impl Roster {
    fn new(members: &[(u32, u32)], rf: usize) -> Result<Self, SlotError> {
        let mut sorted = members.to_vec();
        sorted.sort_unstable();
        for pair in sorted.windows(2) {
            if let [a, b] = pair
                && a.0 == b.0
            {
                return Err(SlotError::DuplicateMember { node: a.0 });
            }
        }
        if let Some(&(node, _)) = sorted.iter().find(|&&(_, w)| w == 0) {
            return Err(SlotError::ZeroWeight { node });
        }
        if rf == 0 || sorted.len() < rf {
            return Err(SlotError::TooFewMembers { rf, members: sorted.len() });
        }
        Ok(Self { ids: sorted.iter().map(|m| m.0).collect(), weights: sorted.iter().map(|m| u64::from(m.1)).collect() })
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn index(&self, id: u32) -> Option<usize> {
        self.ids.binary_search(&id).ok()
    }

    fn id(&self, index: usize) -> u32 {
        self.ids.get(index).copied().unwrap_or(u32::MAX)
    }
}

/// A member's allowed count: its exact share rounded down (`lo`) and up
/// (`hi`), and the share's fractional part over a denominator common to
/// the members that were not capped (`rem`, to break ties toward the
/// member nearest its ceiling).
#[derive(Clone, Copy, Debug)]
struct Band {
    lo: u64,
    hi: u64,
    rem: u128,
}

/// Each member's share of `total` by weight, none above `cap` (a member
/// holds a slot at most once). Shares over the cap are cut to it and the
/// remainder shared again among the others, until none is over: exact
/// integer arithmetic, so every process rounds alike.
fn shares(weights: &[u64], total: u64, cap: u64) -> Vec<Band> {
    let mut capped = vec![false; weights.len()];
    loop {
        let mut rest = u128::from(total);
        let mut weight: u128 = 0;
        for (&w, &c) in weights.iter().zip(&capped) {
            if c {
                rest = rest.saturating_sub(u128::from(cap));
            } else {
                weight += u128::from(w);
            }
        }
        let mut grew = false;
        for (&w, c) in weights.iter().zip(capped.iter_mut()) {
            if !*c && rest * u128::from(w) > u128::from(cap) * weight {
                *c = true;
                grew = true;
            }
        }
        if !grew {
            return weights
                .iter()
                .zip(&capped)
                .map(|(&w, &c)| {
                    if c || weight == 0 {
                        return Band { lo: cap, hi: cap, rem: 0 };
                    }
                    let share = rest * u128::from(w);
                    let lo = u64::try_from(share / weight).unwrap_or(cap).min(cap);
                    let rem = share % weight;
                    Band { lo, hi: (lo + u64::from(rem != 0)).min(cap), rem }
                })
                .collect();
        }
    }
}

/// The counts a plan aims at: each member's current count pulled into its
/// band (so a member within bounds keeps what it has), then raised or
/// lowered by one where the band allows until they sum to `total`. Raised
/// first are members that were pulled down (raising them moves nothing)
/// and then those nearest their ceiling; lowered first, those pulled up
/// and then those nearest their floor; ties by node id.
fn targets(current: &[u64], bands: &[Band], total: u64) -> Vec<u64> {
    let mut target: Vec<u64> = current.iter().zip(bands).map(|(&c, b)| c.max(b.lo).min(b.hi)).collect();
    let sum: u64 = target.iter().sum();
    let mut order: Vec<usize> = (0..target.len()).collect();
    if sum < total {
        let mut need = total - sum;
        order.sort_by_key(|&i| (current[i] <= target[i], Reverse(bands[i].rem), i));
        for i in order {
            let add = bands[i].hi.saturating_sub(target[i]).min(need);
            target[i] += add;
            need -= add;
        }
    } else if sum > total {
        let mut over = sum - total;
        order.sort_by_key(|&i| (current[i] >= target[i], bands[i].rem, i));
        for i in order {
            let cut = target[i].saturating_sub(bands[i].lo).min(over);
            target[i] -= cut;
            over -= cut;
        }
    }
    target
}

/// A range of the current table as the planner sees it: its cells are the
/// owners' positions, each a member's index or a vacancy (`None`: an owner
/// no longer a member, or a copy the replication factor adds), and
/// `excess` is how many copies each slot must shed (the factor fell).
struct Segment {
    start: usize,
    len: usize,
    cells: Vec<Option<usize>>,
    excess: usize,
}

/// The current ranges as [`Segment`]s for `rf` copies. A slot short of
/// owners gets `rf` cells, vacancies where departed owners were (first
/// ones first) and then at the end; a slot with `rf` or more surviving
/// owners keeps just those.
fn segments(ranges: &[SlotRange], roster: &Roster, rf: usize) -> Vec<Segment> {
    ranges
        .iter()
        .map(|range| {
            let mapped: Vec<Option<usize>> = range.owners.iter().map(|&o| roster.index(o)).collect();
            let alive = mapped.iter().flatten().count();
            let len = usize::from(range.end.saturating_sub(range.start)) + 1;
            let start = usize::from(range.start);
            if alive >= rf {
                return Segment {
                    start,
                    len,
                    cells: mapped.into_iter().filter(Option::is_some).collect(),
                    excess: alive - rf,
                };
            }
            let mut room = rf - alive;
            let mut cells = Vec::with_capacity(rf);
            for cell in mapped {
                if cell.is_none() {
                    if room == 0 {
                        continue;
                    }
                    room -= 1;
                }
                cells.push(cell);
            }
            cells.resize(rf, None);
            Segment { start, len, cells, excess: 0 }
        })
        .collect()
}

/// How one segment changes: `(cell, count)` drops of the owner in that
/// cell and `(member, count)` fills, each count at most the segment's
/// length.
#[derive(Default)]
struct SegmentFlow {
    drops: Vec<(usize, usize)>,
    fills: Vec<(usize, usize)>,
}

/// Slots `start..start + len`, all with `owners` (member indices, primary
/// first), inside the current table's range `origin`: the planner's
/// output before neighbours are merged.
struct Run {
    start: usize,
    len: usize,
    origin: usize,
    owners: Vec<usize>,
}

/// Every slot's owners for `rf` copies, as [`Run`]s in slot order,
/// reaching the weighted targets with the fewest added assignments.
///
/// The moves are a min-cost flow of vacancies. A vacancy comes from a
/// segment's departed owners or from a member over its target dropping
/// some of its slots in a segment; it ends in a member under target that
/// fills it (cost 1: one assignment added) or, for a segment that must
/// shed copies, in nothing (cost 0). Every placement with the targets is
/// such a flow (per segment, who is dropped and who is added), and the
/// targets are always reachable (every count is at most 16384 and they sum
/// to `rf * 16384` over at least `rf` members), so the flow fills every
/// vacancy. The flow is first tried with only the members over and under
/// target (small, and enough in every join and removal the tests try);
/// only if that falls short are members at target allowed to pass a
/// vacancy on, which costs an extra move each.
fn place_owners(segments: &[Segment], roster: &Roster, rf: usize) -> Result<Vec<Run>, SlotError> {
    let mut current = vec![0u64; roster.len()];
    for segment in segments {
        for &m in segment.cells.iter().flatten() {
            current[m] += segment.len as u64;
        }
    }
    let total = rf as u64 * u64::from(SLOTS);
    let target = targets(&current, &shares(&roster.weights, total, u64::from(SLOTS)), total);
    let (flows, complete) = route_vacancies(segments, &current, &target, false);
    let flows = if complete { flows } else { route_vacancies(segments, &current, &target, true).0 };
    let mut runs = Vec::with_capacity(segments.len());
    for (origin, (segment, flow)) in segments.iter().zip(&flows).enumerate() {
        realize(segment, origin, flow, rf, &mut runs)?;
    }
    Ok(runs)
}

/// The vacancy flow of [`place_owners`], per segment, and whether it
/// placed every vacancy. With `everyone`, members at target may fill a
/// vacancy and drop elsewhere; without, only members over target drop and
/// only members under target fill.
fn route_vacancies(segments: &[Segment], current: &[u64], target: &[u64], everyone: bool) -> (Vec<SegmentFlow>, bool) {
    let n = current.len();
    let (source, sink) = (0, 1);
    let member = |i: usize| 2 + i;
    let segment = |g: usize| 2 + n + g;
    let mut net = Network::new(2 + n + segments.len());
    let mut supply = 0;
    let mut takers = Vec::new();
    for (i, (&c, &t)) in current.iter().zip(target).enumerate() {
        if c > t {
            net.edge(source, member(i), (c - t) as i64, 0);
            supply += (c - t) as i64;
        } else if t > c {
            net.edge(member(i), sink, (t - c) as i64, 0);
        }
        if everyone || t > c {
            takers.push(i);
        }
    }
    let mut drops = Vec::new();
    let mut fills = Vec::new();
    for (g, seg) in segments.iter().enumerate() {
        let len = seg.len as i64;
        let holes = seg.cells.iter().filter(|c| c.is_none()).count() as i64;
        if holes > 0 {
            net.edge(source, segment(g), holes * len, 0);
            supply += holes * len;
        }
        if seg.excess > 0 {
            net.edge(segment(g), sink, seg.excess as i64 * len, 0);
        }
        for (cell, owner) in seg.cells.iter().enumerate() {
            if let Some(x) = *owner
                && (everyone || current[x] > target[x])
            {
                drops.push((g, cell, net.edge(member(x), segment(g), len, 0)));
            }
        }
        for &y in &takers {
            if !seg.cells.contains(&Some(y)) {
                fills.push((g, y, net.edge(segment(g), member(y), len, 1)));
            }
        }
    }
    let placed = net.run(source, sink);
    let mut flows: Vec<SegmentFlow> = segments.iter().map(|_| SegmentFlow::default()).collect();
    for (g, cell, e) in drops {
        if let (Some(f), Ok(count @ 1..)) = (flows.get_mut(g), usize::try_from(net.flow(e))) {
            f.drops.push((cell, count));
        }
    }
    for (g, y, e) in fills {
        if let (Some(f), Ok(count @ 1..)) = (flows.get_mut(g), usize::try_from(net.flow(e))) {
            f.fills.push((y, count));
        }
    }
    (flows, placed == supply)
}

/// What becomes of a vacated cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vacated {
    /// Deleted: the slot sheds a copy.
    Removed,
    /// Taken by this member.
    Filled(usize),
    /// Left empty: the flow fell short (a planner bug).
    Unfilled,
}

/// Lays one segment's flow out and appends its runs to `runs`.
///
/// The vacated cells (departed owners' cells in full, then each dropped
/// owner's cells) are taken in wrap-around order: each column continues at
/// the slot where the previous one stopped, cycling through the segment
/// (McNaughton's rule). The first `excess * len` of them are deleted (each
/// slot exactly `excess` times) and the rest go to the filling members in
/// turn. As no count exceeds the segment's length, a member's cells are
/// consecutive slots of the cycle, so never two in one slot, and every
/// change is a contiguous interval of a column (two if it wraps). The work
/// is per interval, not per slot: rows are built once per piece between
/// interval ends.
fn realize(
    segment: &Segment,
    origin: usize,
    flow: &SegmentFlow,
    rf: usize,
    runs: &mut Vec<Run>,
) -> Result<(), SlotError> {
    let (start, len) = (segment.start, segment.len);
    let unplaced = |from: usize, to: usize| SlotError::Unplaced {
        start: u16::try_from(start + from).unwrap_or(SLOTS - 1),
        end: u16::try_from(start + to.max(from + 1) - 1).unwrap_or(SLOTS - 1),
        rf,
    };
    if segment.excess == 0 && flow.drops.is_empty() && segment.cells.iter().all(Option::is_some) {
        // Untouched (no vacancy, so no fill either): the slots keep their owners.
        let owners: Vec<usize> = segment.cells.iter().flatten().copied().collect();
        if owners.len() != rf {
            return Err(unplaced(0, len));
        }
        runs.push(Run { start, len, origin, owners });
        return Ok(());
    }
    let columns = segment
        .cells
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_none())
        .map(|(cell, _)| (cell, len))
        .chain(flow.drops.iter().copied());
    let mut consumers = [(Vacated::Removed, segment.excess * len)]
        .into_iter()
        .chain(flow.fills.iter().map(|&(m, count)| (Vacated::Filled(m), count)));
    let (mut what, mut left) = (Vacated::Removed, 0);
    // (cell, first offset, end offset, what becomes of it), none wrapping.
    let mut changes: Vec<(usize, usize, usize, Vacated)> = Vec::new();
    let mut at = 0;
    for (cell, count) in columns {
        let mut count = count.min(len);
        while count > 0 {
            while left == 0 {
                (what, left) = consumers.next().unwrap_or((Vacated::Unfilled, usize::MAX));
            }
            let take = count.min(left).min(len - at);
            changes.push((cell, at, at + take, what));
            at = (at + take) % len;
            count -= take;
            left -= take;
        }
    }
    let mut cuts: Vec<usize> = changes.iter().flat_map(|c| [c.1, c.2]).chain([0, len]).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let first_run = runs.len();
    let mut row = Vec::with_capacity(rf);
    for piece in cuts.windows(2) {
        let &[from, to] = piece else { continue };
        row.clear();
        let mut newcomer_first = false;
        let mut survivor = None;
        for (cell, &owner) in segment.cells.iter().enumerate() {
            let change = changes.iter().find(|c| c.0 == cell && c.1 <= from && from < c.2).map(|c| c.3);
            let (member, fresh) = match (change, owner) {
                (Some(Vacated::Removed), _) => continue,
                (Some(Vacated::Filled(m)), _) => (m, true),
                (None, Some(m)) => (m, false),
                (Some(Vacated::Unfilled), _) | (None, None) => return Err(unplaced(from, to)),
            };
            if row.is_empty() {
                newcomer_first = fresh;
            } else if !fresh && survivor.is_none() {
                survivor = Some(row.len());
            }
            row.push(member);
        }
        if row.len() != rf {
            return Err(unplaced(from, to));
        }
        // A newcomer has no data yet: a surviving owner stays primary.
        if newcomer_first && let Some(k) = survivor {
            row.swap(0, k);
        }
        let own_run = runs.len() > first_run;
        match runs.last_mut() {
            Some(last) if own_run && last.owners == row => last.len += to - from,
            _ => runs.push(Run { start: start + from, len: to - from, origin, owners: row.clone() }),
        }
    }
    Ok(())
}

/// Balances primaries by weight by swapping owners' positions within slots,
/// so no data moves. Another min-cost flow: a member over its primary
/// target hands the primary role, in some slots of a run where it is
/// primary, to a co-owner, which may hand on its own elsewhere; a handoff
/// costs 1 to an owner that held the slots before and 2 to a newcomer, so
/// roles go first to owners that have the data. Runs are split at the old
/// table's range boundaries so "held before" is one answer per run.
/// Targets are each member's primary share rounded down or up (capped at
/// what it owns); if the owners admit no such assignment, the flow leaves
/// the rest as close as it gets.
fn balance_primaries(runs: Vec<Run>, old: &[SlotRange], roster: &Roster, rf: usize) -> Vec<Run> {
    if rf < 2 {
        return runs; // The only owner is the primary: owners' balance is primaries' balance.
    }
    let n = roster.len();
    let mut owned = vec![0u64; n];
    let mut primary = vec![0u64; n];
    for run in &runs {
        for &o in &run.owners {
            owned[o] += run.len as u64;
        }
        if let Some(&p) = run.owners.first() {
            primary[p] += run.len as u64;
        }
    }
    let mut bands = shares(&roster.weights, u64::from(SLOTS), u64::from(SLOTS));
    for (band, &owns) in bands.iter_mut().zip(&owned) {
        band.lo = band.lo.min(owns);
        band.hi = band.hi.min(owns);
    }
    let target = targets(&primary, &bands, u64::from(SLOTS));
    let (source, sink) = (0, 1);
    let member = |i: usize| 2 + i;
    let run_node = |r: usize| 2 + n + r;
    let mut net = Network::new(2 + n + runs.len());
    for (i, (&p, &t)) in primary.iter().zip(&target).enumerate() {
        if p > t {
            net.edge(source, member(i), (p - t) as i64, 0);
        } else if t > p {
            net.edge(member(i), sink, (t - p) as i64, 0);
        }
    }
    let mut handoffs: Vec<Vec<(usize, usize)>> = Vec::with_capacity(runs.len());
    let mut edges = Vec::new();
    for (r, run) in runs.iter().enumerate() {
        let held = |m: usize| old.get(run.origin).is_some_and(|o| o.owners.contains(&roster.id(m)));
        if let Some((&p, rest)) = run.owners.split_first() {
            net.edge(member(p), run_node(r), run.len as i64, 0);
            for (k, &y) in rest.iter().enumerate() {
                let cost = if held(y) { 1 } else { 2 };
                edges.push((r, k + 1, net.edge(run_node(r), member(y), run.len as i64, cost)));
            }
        }
        handoffs.push(Vec::new());
    }
    net.run(source, sink);
    for (r, position, e) in edges {
        if let (Some(h), Ok(count @ 1..)) = (handoffs.get_mut(r), usize::try_from(net.flow(e))) {
            h.push((position, count));
        }
    }
    let mut out = Vec::with_capacity(runs.len());
    for (run, handoffs) in runs.into_iter().zip(handoffs) {
        let mut done = 0;
        for (position, count) in handoffs {
            let count = count.min(run.len - done);
            let mut owners = run.owners.clone();
            owners.swap(0, position);
            out.push(Run { start: run.start + done, len: count, origin: run.origin, owners });
            done += count;
        }
        if done < run.len {
            out.push(Run { start: run.start + done, len: run.len - done, ..run });
        }
    }
    out
}

/// The runs as ranges of node ids, neighbours with the same owners merged.
fn compact(runs: &[Run], roster: &Roster) -> Vec<SlotRange> {
    let mut ranges: Vec<SlotRange> = Vec::new();
    let mut previous: &[usize] = &[];
    for run in runs.iter().filter(|r| r.len > 0) {
        let start = u16::try_from(run.start).unwrap_or(SLOTS - 1);
        let end = u16::try_from(run.start + run.len - 1).unwrap_or(SLOTS - 1);
        match ranges.last_mut() {
            Some(last) if run.owners == previous => last.end = end,
            _ => ranges.push(SlotRange {
                start,
                end,
                owners: run.owners.iter().map(|&o| roster.id(o)).collect(),
                pending: Vec::new(),
            }),
        }
        previous = &run.owners;
    }
    ranges
}
