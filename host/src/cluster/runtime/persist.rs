//! What a node keeps in its data directory across restarts: the last
//! incarnation it went by and the member list.

use crate::cluster::replica::NodeIx;
use std::net::SocketAddr;

/// The last incarnation this node went by, in its data directory.
pub(super) const INCARNATION_FILE: &str = "cluster-incarnation";

/// The incarnation to start with: the wall clock in milliseconds, so it
/// outranks whatever the others remember of this node, but never at or
/// below the last one used. A clock stepped back further than the node
/// was down would otherwise make the others keep the old, down identity
/// and ignore the new one (foca forgets down members only after a day).
pub(super) fn next_incarnation(path: &std::path::Path, now_ms: u64) -> u64 {
    let last = std::fs::read_to_string(path).ok().and_then(|text| text.trim().parse::<u64>().ok());
    let next = last.map_or(now_ms, |last| now_ms.max(last.saturating_add(1)));
    save_incarnation(path, next);
    next
}

/// Written to a temporary file and renamed, like the member list.
pub(super) fn save_incarnation(path: &std::path::Path, incarnation: u64) {
    let tmp = path.with_extension("tmp");
    let saved = std::fs::write(&tmp, format!("{incarnation}\n")).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = saved {
        tracing::warn!(%err, file = %path.display(), "cannot save the node's incarnation");
    }
}

/// The member list in a node's data directory: `ID ADDRESS` per line.
pub(super) const MEMBERS_FILE: &str = "cluster-members";

pub(super) fn load_members(path: &std::path::Path) -> Vec<(NodeIx, SocketAddr)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|line| {
            let (id, addr) = line.split_once(' ')?;
            match (id.parse(), addr.parse()) {
                (Ok(id), Ok(addr)) => Some((id, addr)),
                _ => {
                    tracing::warn!(line, file = %path.display(), "an unreadable member line; ignored");
                    None
                }
            }
        })
        .collect()
}

/// Written to a temporary file and renamed, so a crash leaves the old list
/// or the new one.
pub(super) fn save_members(path: &std::path::Path, peers: &std::collections::BTreeMap<NodeIx, SocketAddr>) {
    let text: String = peers.iter().map(|(id, addr)| format!("{id} {addr}\n")).collect();
    let tmp = path.with_extension("tmp");
    let saved = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = saved {
        tracing::warn!(%err, file = %path.display(), "cannot save the member list");
    }
}

#[cfg(test)]
mod tests {
    use super::next_incarnation;

    /// The wall clock, unless it went back: then one past the last
    /// incarnation used, which is saved for the next start.
    #[test]
    fn incarnations_only_go_up_even_when_the_clock_goes_back() {
        let dir = std::env::temp_dir().join(format!("cachet-incarnation-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("cluster-incarnation");
        let _ = std::fs::remove_file(&path);
        assert_eq!(next_incarnation(&path, 5_000), 5_000, "first start: the clock");
        assert_eq!(next_incarnation(&path, 9_000), 9_000, "the clock moved on");
        assert_eq!(next_incarnation(&path, 7_000), 9_001, "the clock went back");
        assert_eq!(next_incarnation(&path, 7_500), 9_002, "still behind");
        std::fs::write(&path, "garbage").expect("write");
        assert_eq!(next_incarnation(&path, 8_000), 8_000, "an unreadable file counts as none");
        assert_eq!(std::fs::read_to_string(&path).expect("saved").trim(), "8000");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
