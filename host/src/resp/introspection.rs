//! What the RESP port says about the node: INFO's sections and CONFIG
//! GET's parameters, read from the node, in Redis's names and layout.

use super::codec::Writer;
use super::session::ServerInfo;
use crate::node::Node;
use bytes::Bytes;

/// `CONFIG GET pattern...`: the parameters Cachet has an answer for (read
/// from the node), as a map of the names matching each glob.
pub(super) fn config_get(node: &Node, info: &ServerInfo, w: &mut Writer<'_>, patterns: &[Bytes]) {
    let stats = node.stats();
    let known: [(&str, String); 13] = [
        ("maxmemory", stats.max_bytes.to_string()),
        ("maxmemory-policy", format!("cachet-{}", stats.policy)),
        ("databases", "1".to_string()),
        ("appendonly", "no".to_string()),
        ("save", String::new()),
        ("timeout", info.idle().map_or(0, |t| t.as_secs()).to_string()),
        ("port", info.port.to_string()),
        ("bind", info.bind.clone()),
        ("maxclients", info.max_connections.to_string()),
        ("proto-max-bulk-len", node.config().max_value_size.to_string()),
        ("client-query-buffer-limit", info.max_command.to_string()),
        ("cluster-enabled", if super::cluster::enabled(node) { "yes" } else { "no" }.to_string()),
        ("hz", "10".to_string()),
    ];
    let matching: Vec<&(&str, String)> = known
        .iter()
        .filter(|(name, _)| patterns.iter().any(|p| crate::glob::glob_match(&p.to_ascii_lowercase(), name.as_bytes())))
        .collect();
    w.map(matching.len());
    for (name, value) in matching {
        w.bulk(name.as_bytes());
        w.bulk(value.as_bytes());
    }
}

/// `CONFIG SET parameter value ...`: the settings that change live, all
/// checked before any applies: `maxmemory-policy` (a bundled policy,
/// Cachet's name, `cachet-NAME` as CONFIG GET shows it, or Redis's
/// `allkeys-lru`, `allkeys-lfu` and `allkeys-random`; on a cluster, every
/// member's through the log) and `timeout` (this port's idle timeout, in
/// seconds; 0 for none). Every other parameter is taken at start.
pub(super) fn config_set(node: &Node, info: &ServerInfo, pairs: &[Bytes]) -> Result<(), String> {
    if pairs.is_empty() || !pairs.len().is_multiple_of(2) {
        return Err("ERR wrong number of arguments for 'config|set' command".into());
    }
    enum Change {
        Policy(String),
        Timeout(u64),
    }
    let mut changes = Vec::new();
    for pair in pairs.chunks(2) {
        let name = String::from_utf8_lossy(&pair[0]).to_ascii_lowercase();
        let value = String::from_utf8_lossy(&pair[1]).into_owned();
        let refused = |why: &str| format!("ERR CONFIG SET failed (possibly related to argument '{name}') - {why}");
        changes.push(match name.as_str() {
            "maxmemory-policy" => {
                // Anyone who reaches a port without users may run CONFIG:
                // on loopback only (`--resp-insecure` opens it wider).
                let loopback = info.bind.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
                if info.acl.is_none() && !loopback {
                    return Err(refused("a port beyond loopback without users cannot change the policy"));
                }
                let policy = match value.to_ascii_lowercase().as_str() {
                    "allkeys-lru" => "lru".to_string(),
                    "allkeys-lfu" => "lfu".to_string(),
                    "allkeys-random" => "random".to_string(),
                    v if v.starts_with("volatile-") || v == "noeviction" => {
                        return Err(refused("Cachet evicts from every key; name a policy (lru, s3fifo, sieve, ...)"));
                    }
                    v => v.strip_prefix("cachet-").unwrap_or(v).to_string(),
                };
                Change::Policy(policy)
            }
            "timeout" => match value.parse::<u64>() {
                Ok(secs) if secs <= 365 * 86_400 => Change::Timeout(secs),
                _ => return Err(refused("argument couldn't be parsed into an integer")),
            },
            known if KNOWN.contains(&known) => {
                return Err(refused("Cachet takes this setting at start (flags or --config)"));
            }
            _ => return Err(format!("ERR Unknown option or number of arguments for CONFIG SET - '{name}'")),
        });
    }
    for change in changes {
        match change {
            Change::Policy(policy) => {
                node.set_bundled_policy(&policy).map_err(|err| format!("ERR CONFIG SET maxmemory-policy: {err}"))?;
            }
            Change::Timeout(secs) => info.idle_ms.store(secs * 1000, std::sync::atomic::Ordering::Relaxed),
        }
    }
    Ok(())
}

/// Whether `args` is a CONFIG SET (run off the I/O thread).
pub(super) fn is_config_set(args: &[Bytes]) -> bool {
    args.len() >= 2 && args[0].eq_ignore_ascii_case(b"CONFIG") && args[1].eq_ignore_ascii_case(b"SET")
}

/// The parameters CONFIG GET answers.
const KNOWN: [&str; 13] = [
    "maxmemory",
    "maxmemory-policy",
    "databases",
    "appendonly",
    "save",
    "timeout",
    "port",
    "bind",
    "maxclients",
    "proto-max-bulk-len",
    "client-query-buffer-limit",
    "cluster-enabled",
    "hz",
];

/// `CONFIG RESETSTAT`: INFO's counters start again from zero.
pub(super) fn reset_stats(node: &Node, info: &ServerInfo) {
    use std::sync::atomic::Ordering::Relaxed;
    let stats = node.stats();
    info.stats_base.commands.store(node.commands_processed(), Relaxed);
    info.stats_base.hits.store(stats.hits, Relaxed);
    info.stats_base.misses.store(stats.misses, Relaxed);
}

/// This process's id for Redis clients (INFO's `run_id`): 40 hex digits,
/// new at every start.
pub(super) fn run_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let seed = |salt: u64| {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(salt ^ u64::from(std::process::id()));
            h.finish()
        };
        format!("{:016x}{:016x}{:08x}", seed(1), seed(2), seed(3) as u32)
    })
}

/// CPU time this process has used, user and system, in seconds (from
/// `/proc/self/stat`; zeros where there is none).
fn cpu_seconds() -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return (0.0, 0.0) };
    // Fields after the command name (which may hold spaces), from `)`.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0) / 100.0;
    // utime and stime are fields 14 and 15 of the line, 11 and 12 here
    // (field 3, the state, is 0); in clock ticks, 100 a second on Linux.
    (ticks(11), ticks(12))
}

/// INFO text in Redis's layout (`# Section` headers, `key:value` lines).
pub(super) fn info_text(node: &Node, info: &ServerInfo, sections: &[String]) -> String {
    let stats = node.stats();
    let want = |s: &str| {
        sections.is_empty()
            || sections.iter().any(|asked| matches!(asked.as_str(), "ALL" | "EVERYTHING" | "DEFAULT") || asked == s)
    };
    let mut text = String::new();
    if want("SERVER") {
        let executable = std::env::current_exe().map(|p| p.display().to_string()).unwrap_or_default();
        text.push_str(&format!(
            "# Server\r\nredis_version:7.0.0\r\nredis_git_sha1:00000000\r\nredis_git_dirty:0\r\nredis_build_id:0\r\ncachet_version:{}\r\nredis_mode:{}\r\nos:{} {}\r\narch_bits:{}\r\nmultiplexing_api:epoll\r\nprocess_id:{}\r\nprocess_supervised:no\r\nrun_id:{}\r\ntcp_port:{}\r\nuptime_in_seconds:{}\r\nuptime_in_days:{}\r\nhz:10\r\nconfigured_hz:10\r\nexecutable:{executable}\r\nconfig_file:\r\n\r\n",
            env!("CARGO_PKG_VERSION"),
            // A clustered member answers CLUSTER SLOTS and the rest (see
            // `resp::cluster`); it never redirects.
            if super::cluster::enabled(node) { "cluster" } else { "standalone" },
            std::env::consts::OS,
            std::env::consts::ARCH,
            usize::BITS,
            std::process::id(),
            run_id(),
            info.port,
            stats.uptime_secs,
            stats.uptime_secs / 86_400
        ));
    }
    // Cachet keeps nothing on disk and has no replicas in Redis's sense
    // (a cluster's copies are its own): what clients read, answered truly.
    if want("PERSISTENCE") {
        text.push_str(
            "# Persistence\r\nloading:0\r\nasync_loading:0\r\nrdb_changes_since_last_save:0\r\n\
             rdb_bgsave_in_progress:0\r\nrdb_last_bgsave_status:ok\r\naof_enabled:0\r\naof_rewrite_in_progress:0\r\n\r\n",
        );
    }
    if want("REPLICATION") {
        text.push_str(&format!(
            "# Replication\r\nrole:master\r\nconnected_slaves:0\r\nmaster_failover_state:no-failover\r\n\
             master_replid:{}\r\nmaster_repl_offset:0\r\n\r\n",
            run_id()
        ));
    }
    if want("CPU") {
        let (user, sys) = cpu_seconds();
        text.push_str(&format!("# CPU\r\nused_cpu_sys:{sys:.6}\r\nused_cpu_user:{user:.6}\r\n\r\n"));
    }
    if want("CLIENTS") {
        text.push_str(&format!("# Clients\r\nconnected_clients:{}\r\n\r\n", stats.connections));
    }
    if want("MEMORY") {
        text.push_str(&format!(
            "# Memory\r\nused_memory:{}\r\nused_memory_human:{:.2}M\r\nused_memory_dataset:{}\r\nmaxmemory:{}\r\nmaxmemory_human:{:.2}M\r\nmaxmemory_policy:cachet-{}\r\n\r\n",
            stats.bytes,
            stats.bytes as f64 / (1 << 20) as f64,
            stats.bytes,
            stats.max_bytes,
            stats.max_bytes as f64 / (1 << 20) as f64,
            stats.policy
        ));
    }
    if want("STATS") {
        text.push_str(&format!(
            "# Stats\r\ntotal_commands_processed:{}\r\nkeyspace_hits:{}\r\nkeyspace_misses:{}\r\nevicted_keys:{}\r\nexpired_keys:{}\r\n\r\n",
            node.commands_processed().saturating_sub(info.stats_base.commands.load(std::sync::atomic::Ordering::Relaxed)),
            stats.hits.saturating_sub(info.stats_base.hits.load(std::sync::atomic::Ordering::Relaxed)),
            stats.misses.saturating_sub(info.stats_base.misses.load(std::sync::atomic::Ordering::Relaxed)),
            stats.evictions,
            stats.expired + stats.policy_expired
        ));
    }
    if want("CLUSTER") {
        let enabled = u8::from(super::cluster::enabled(node));
        text.push_str(&format!("# Cluster\r\ncluster_enabled:{enabled}\r\n\r\n"));
    }
    if want("KEYSPACE") {
        text.push_str("# Keyspace\r\n");
        if stats.entries > 0 {
            text.push_str(&format!("db0:keys={},expires={},avg_ttl=0\r\n", stats.entries, node.expiring()));
        }
        text.push_str("\r\n");
    }
    text
}
