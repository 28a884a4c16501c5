//! The Redis Cluster protocol's read side on a clustered member: `CLUSTER
//! SLOTS`, `SHARDS`, `NODES`, `INFO`, `MYID` and `KEYSLOT`, and the
//! connection commands cluster clients send (`READONLY`, `READWRITE`,
//! `ASKING`). Every answer is a reading of the metadata log's slot table
//! (the ring places keys by Redis's hash slot, CRC16 of the key or its
//! `{hash tag}` mod 16384) and of the Redis-protocol addresses members
//! record in the log, so a cluster client such as redis-py's
//! `RedisCluster` or `redis-cli -c` sends each key to one of its owners.
//!
//! By default a member never redirects: any member serves any key (it
//! forwards to the key's owners and answers at the request's
//! consistency), which plain clients need, and the table only saves a
//! cluster client the forwarding hop. A port started with
//! `--resp-cluster-redirects` speaks Redis Cluster's redirects instead
//! ([`redirect`]): `MOVED` to the slot's primary, `CROSSSLOT` for keys
//! across slots, and replica reads on `READONLY` connections. There is no
//! `ASK`: a range that moves changes owners only once the log records that
//! the new owner holds it, so `MOVED` to the new primary is never early.
//!
//! Redis's model has one primary per slot range and replicas that follow
//! one primary. Cachet's owners are per range, so `CLUSTER SLOTS` and
//! `SHARDS` list each range's owners (the primary first), while `CLUSTER
//! NODES` shows every member as a primary of the ranges it is first owner
//! of.

use super::codec::Writer;
use crate::cluster::runtime::RedisView;
use crate::node::Node;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::net::SocketAddr;

/// What a standalone node answers, as redis-server does without
/// `cluster-enabled`.
const DISABLED: &str = "ERR This instance has cluster support disabled";

/// A member's id as Redis Cluster clients expect one: 40 hex digits.
pub fn redis_id(node: u32) -> String {
    format!("{:040x}", u64::from(node) + 1)
}

/// The table, if this node is a member that has one.
fn view(node: &Node) -> Option<RedisView> {
    node.cluster()?.redis_view()
}

/// Whether this node answers as a Redis Cluster node (INFO's
/// `cluster_enabled`).
pub fn enabled(node: &Node) -> bool {
    node.cluster().is_some()
}

/// On a port with redirects (`--resp-cluster-redirects`), what to answer
/// instead of serving `request`: `MOVED slot host:port` when another
/// member is the primary of its keys' slot (unless this member owns the
/// slot and the connection is `READONLY` and the request a read: a
/// replica read, served here at ONE), `CROSSSLOT` when its keys span
/// slots. `None`: serve it (also when the primary announced no RESP
/// address, or the member has no table yet: forwarded, as without
/// redirects).
pub fn redirect(node: &Node, readonly: bool, request: &cachet_proto::Request) -> Option<String> {
    let cluster = node.cluster()?;
    let keys = request.keys();
    let slot = cachet_proto::slot::key_slot(keys.first()?);
    if keys.iter().any(|k| cachet_proto::slot::key_slot(k) != slot) {
        return Some("CROSSSLOT Keys in request don't hash to the same slot".into());
    }
    let (owners, addr) = cluster.slot_owners(slot)?;
    let me = cluster.me();
    if owners.first() == Some(&me) || (readonly && !request.is_write() && owners.contains(&me)) {
        return None;
    }
    addr.map(|addr| format!("MOVED {slot} {}", resp_addr(addr)))
}

/// An address as Redis writes it in `MOVED`: `host:port`, IPv6 bare.
fn resp_addr(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

/// `READONLY`, `READWRITE`, `ASKING`: accepted on a member (any member
/// serves reads and writes of any key), refused on a standalone node.
pub fn connection(node: &Node, w: &mut Writer<'_>) {
    if enabled(node) { w.simple("OK") } else { w.error(DISABLED) }
}

/// `CLUSTER subcommand ...`.
pub fn cluster(node: &Node, w: &mut Writer<'_>, args: &[Bytes]) {
    let Some(sub) = args.get(1) else {
        w.error("ERR wrong number of arguments for 'cluster' command");
        return;
    };
    let sub = String::from_utf8_lossy(sub).to_ascii_uppercase();
    if sub == "KEYSLOT" {
        match args.get(2) {
            Some(key) if args.len() == 3 => w.integer(i64::from(cachet_proto::slot::key_slot(key))),
            _ => w.error("ERR wrong number of arguments for 'cluster|keyslot' command"),
        }
        return;
    }
    if !enabled(node) {
        w.error(DISABLED);
        return;
    }
    let Some(view) = view(node) else {
        w.error("CLUSTERDOWN this member has no slot table yet (it is joining the cluster's log)");
        return;
    };
    match sub.as_str() {
        "SLOTS" => slots(&view, w),
        "SHARDS" => shards(&view, w),
        "NODES" => w.text(&nodes(&view)),
        "INFO" => w.text(&info(&view)),
        "MYID" => w.bulk(redis_id(view.me).as_bytes()),
        _ => w.error(&format!(
            "ERR unknown subcommand '{}'. Try CLUSTER HELP.",
            String::from_utf8_lossy(&args[1]).escape_debug()
        )),
    }
}

/// `CLUSTER SLOTS`: each range, its owners with an address, those this
/// member sees up first (a client writes to the first). A range none of
/// whose owners is up or has an address is given any member that is
/// (any member serves any key), so a client requiring full coverage
/// (redis-py's default) still starts.
fn slots(view: &RedisView, w: &mut Writer<'_>) {
    type Reachable = Vec<(u32, SocketAddr)>;
    let up = |n: u32| view.members.iter().any(|(m, _, up)| *m == n && *up);
    let spare = view.members.iter().find_map(|(n, a, up)| a.filter(|_| *up).map(|a| (*n, a)));
    let ranges: Vec<(u16, u16, Reachable)> = view
        .ranges
        .iter()
        .map(|r| {
            let mut owners: Reachable = r.owners.iter().filter_map(|(n, a)| Some((*n, (*a)?))).collect();
            owners.sort_by_key(|(n, _)| !up(*n));
            if !owners.first().is_some_and(|(n, _)| up(*n))
                && let Some(spare) = spare
            {
                owners.insert(0, spare);
            }
            (r.start, r.end, owners)
        })
        .filter(|(.., owners)| !owners.is_empty())
        .collect();
    w.array(ranges.len());
    for (start, end, owners) in ranges {
        w.array(2 + owners.len());
        w.integer(i64::from(start));
        w.integer(i64::from(end));
        for (n, addr) in owners {
            w.array(3);
            w.bulk(addr.ip().to_string().as_bytes());
            w.integer(i64::from(addr.port()));
            w.bulk(redis_id(n).as_bytes());
        }
    }
}

/// `CLUSTER SHARDS`: ranges grouped by their owners (a shard is a set of
/// owners), each owner with Redis's node fields.
fn shards(view: &RedisView, w: &mut Writer<'_>) {
    let mut groups: BTreeMap<Vec<u32>, Vec<(u16, u16)>> = BTreeMap::new();
    for r in &view.ranges {
        groups.entry(r.owners.iter().map(|(n, _)| *n).collect()).or_default().push((r.start, r.end));
    }
    let addr_of: BTreeMap<u32, (Option<SocketAddr>, bool)> =
        view.members.iter().map(|(n, a, up)| (*n, (*a, *up))).collect();
    w.array(groups.len());
    for (owners, ranges) in groups {
        w.map(2);
        w.bulk(b"slots");
        w.array(ranges.len() * 2);
        for (start, end) in ranges {
            w.integer(i64::from(start));
            w.integer(i64::from(end));
        }
        w.bulk(b"nodes");
        w.array(owners.len());
        for (i, n) in owners.iter().enumerate() {
            let (addr, up) = addr_of.get(n).copied().unwrap_or((None, false));
            w.map(7);
            w.bulk(b"id");
            w.bulk(redis_id(*n).as_bytes());
            w.bulk(b"port");
            w.integer(addr.map_or(0, |a| i64::from(a.port())));
            w.bulk(b"ip");
            w.bulk(addr.map(|a| a.ip().to_string()).unwrap_or_default().as_bytes());
            w.bulk(b"endpoint");
            w.bulk(addr.map(|a| a.ip().to_string()).unwrap_or_default().as_bytes());
            w.bulk(b"role");
            w.bulk(if i == 0 { b"master".as_slice() } else { b"replica".as_slice() });
            w.bulk(b"replication-offset");
            w.integer(0);
            w.bulk(b"health");
            w.bulk(if up { b"online".as_slice() } else { b"failed".as_slice() });
        }
    }
}

/// `CLUSTER NODES`: one line per member, each a primary of the ranges it
/// is first owner of.
fn nodes(view: &RedisView) -> String {
    let mut text = String::new();
    for (n, addr, up) in &view.members {
        // Redis writes `ip:port@cport` with a bare IPv6 address (clients
        // split at the last colon).
        let addr = addr.map_or_else(|| ":0@0".to_string(), |a| format!("{}:{}@{}", a.ip(), a.port(), a.port()));
        let mut flags = String::new();
        if *n == view.me {
            flags.push_str("myself,");
        }
        flags.push_str("master");
        if !up {
            flags.push_str(",fail");
        }
        let link = if *up { "connected" } else { "disconnected" };
        text.push_str(&format!("{} {addr} {flags} - 0 0 {} {link}", redis_id(*n), view.epoch));
        for r in view.ranges.iter().filter(|r| r.owners.first().is_some_and(|(o, _)| o == n)) {
            if r.start == r.end {
                text.push_str(&format!(" {}", r.start));
            } else {
                text.push_str(&format!(" {}-{}", r.start, r.end));
            }
        }
        text.push('\n');
    }
    text
}

/// `CLUSTER INFO`.
fn info(view: &RedisView) -> String {
    let assigned: u32 = view.ranges.iter().map(|r| u32::from(r.end - r.start) + 1).sum();
    let served: u32 = view
        .ranges
        .iter()
        .filter(|r| r.owners.iter().any(|(n, _)| view.members.iter().any(|(m, _, up)| m == n && *up)))
        .map(|r| u32::from(r.end - r.start) + 1)
        .sum();
    let primaries: std::collections::BTreeSet<u32> =
        view.ranges.iter().filter_map(|r| r.owners.first().map(|(n, _)| *n)).collect();
    format!(
        "cluster_enabled:1\r\ncluster_state:{}\r\ncluster_slots_assigned:{assigned}\r\ncluster_slots_ok:{served}\r\n\
         cluster_slots_pfail:0\r\ncluster_slots_fail:{}\r\ncluster_known_nodes:{}\r\ncluster_size:{}\r\n\
         cluster_current_epoch:{}\r\ncluster_my_epoch:{}\r\n",
        if served == assigned && assigned == 16_384 { "ok" } else { "fail" },
        assigned - served,
        view.members.len(),
        primaries.len(),
        view.epoch,
        view.epoch,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::runtime::RedisSlots;
    use bytes::BytesMut;

    fn view() -> RedisView {
        let a = |p: u16| Some(SocketAddr::from(([127, 0, 0, 1], p)));
        RedisView {
            me: 1,
            epoch: 4,
            ranges: vec![
                RedisSlots { start: 0, end: 8191, owners: vec![(0, a(6379)), (1, a(6380))] },
                RedisSlots { start: 8192, end: 16383, owners: vec![(1, a(6380)), (2, None)] },
            ],
            members: vec![(0, a(6379), true), (1, a(6380), true), (2, None, false)],
        }
    }

    #[test]
    fn slots_list_each_range_with_the_owners_that_have_an_address() {
        let mut out = BytesMut::new();
        slots(&view(), &mut Writer::new(&mut out, false));
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("*2\r\n*4\r\n:0\r\n:8191\r\n*3\r\n$9\r\n127.0.0.1\r\n:6379\r\n"), "{text}");
        assert!(text.contains("*3\r\n:8192\r\n:16383\r\n*3\r\n$9\r\n127.0.0.1\r\n:6380\r\n"), "{text}");
    }

    #[test]
    fn nodes_and_info_read_the_table() {
        let v = view();
        let text = nodes(&v);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].ends_with("master - 0 0 4 connected 0-8191"), "{}", lines[0]);
        assert!(lines[1].contains("myself,master") && lines[1].ends_with("8192-16383"), "{}", lines[1]);
        assert!(lines[2].contains("master,fail") && lines[2].contains("disconnected"), "{}", lines[2]);
        let info = info(&v);
        assert!(info.contains("cluster_state:ok\r\n") && info.contains("cluster_size:2\r\n"), "{info}");
        assert_eq!(redis_id(0).len(), 40);
    }
}
