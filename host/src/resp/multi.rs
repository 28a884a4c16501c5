//! MULTI, EXEC, DISCARD, WATCH and UNWATCH.
//!
//! Cachet cannot yet run a group of commands atomically (no other client's
//! command between them): the store locks one shard per command, and a
//! cluster writes each key through its own owners. What it must not do is
//! what it did before this module: answer MULTI with "unknown command",
//! run the commands a client meant to queue one by one, then fail EXEC, so
//! the client saw an error for writes that were applied (redis-py's
//! default `pipeline()` wraps every pipeline in MULTI/EXEC).
//!
//! So a transaction is refused whole, the way Redis refuses one with a
//! command it cannot queue: MULTI is accepted, every command after it is
//! answered with an error naming it and applied nowhere, and EXEC answers
//! EXECABORT. A client sees the failure and nothing of the transaction
//! happened. `pipeline(transaction=False)` batches without MULTI and works.

use super::codec::Writer;
use bytes::{Bytes, BytesMut};

/// A transaction opened with MULTI on a connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Multi {
    /// Commands sent since MULTI (each refused).
    pub refused: usize,
}

/// Handles `args` if it is a transaction command or comes inside a MULTI
/// (`multi` is the connection's open transaction); returns whether it did.
/// Everything else is left to the ordinary path.
pub fn handle(multi: &mut Option<Multi>, resp3: bool, args: &[Bytes], out: &mut BytesMut) -> bool {
    let Some(first) = args.first() else { return false };
    let name = String::from_utf8_lossy(first).to_ascii_uppercase();
    let mut w = Writer::new(out, resp3);
    match (name.as_str(), multi.as_mut()) {
        ("MULTI", Some(_)) => w.error("ERR MULTI calls can not be nested"),
        ("MULTI", None) => {
            *multi = Some(Multi::default());
            w.simple("OK");
        }
        ("EXEC", None) => w.error("ERR EXEC without MULTI"),
        ("DISCARD", None) => w.error("ERR DISCARD without MULTI"),
        ("EXEC", Some(open)) => {
            let refused = open.refused;
            *multi = None;
            if refused == 0 {
                w.array(0);
            } else {
                w.error("EXECABORT Transaction discarded because of previous errors.");
            }
        }
        ("DISCARD", Some(_)) => {
            *multi = None;
            w.simple("OK");
        }
        ("WATCH", Some(_)) => w.error("ERR WATCH inside MULTI is not allowed"),
        ("WATCH", None) => {
            w.error("ERR WATCH is not supported by Cachet yet: it cannot run a transaction atomically (see MULTI)")
        }
        // Nothing is ever watched.
        ("UNWATCH", _) => w.simple("OK"),
        (_, Some(open)) => {
            open.refused += 1;
            w.error(&format!(
                "ERR Cachet cannot run '{}' inside MULTI yet (transactions are not atomic here); \
                 EXEC will discard the transaction, nothing of it is applied",
                name.to_ascii_lowercase().escape_debug()
            ));
        }
        (_, None) => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(multi: &mut Option<Multi>, command: &[&str]) -> String {
        let args: Vec<Bytes> = command.iter().map(|a| Bytes::copy_from_slice(a.as_bytes())).collect();
        let mut out = BytesMut::new();
        if !handle(multi, false, &args, &mut out) {
            return "passed on".into();
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A transaction is refused whole: every command in it is answered
    /// with an error and passed on to nothing, and EXEC aborts; outside a
    /// MULTI only the transaction commands are handled here.
    #[test]
    fn a_transaction_is_refused_whole_and_nothing_in_it_runs() {
        let mut multi = None;
        assert_eq!(run(&mut multi, &["SET", "k", "v"]), "passed on");
        assert_eq!(run(&mut multi, &["EXEC"]), "-ERR EXEC without MULTI\r\n");
        assert_eq!(run(&mut multi, &["DISCARD"]), "-ERR DISCARD without MULTI\r\n");
        assert_eq!(run(&mut multi, &["multi"]), "+OK\r\n");
        assert_eq!(run(&mut multi, &["MULTI"]), "-ERR MULTI calls can not be nested\r\n");
        assert_eq!(run(&mut multi, &["EXEC"]), "*0\r\n", "an empty transaction runs: nothing to do");
        assert_eq!(multi, None);
        run(&mut multi, &["MULTI"]);
        assert!(run(&mut multi, &["SET", "k", "v"]).starts_with("-ERR Cachet cannot run 'set' inside MULTI"));
        assert!(run(&mut multi, &["INCR", "n"]).starts_with("-ERR Cachet cannot run 'incr'"));
        assert_eq!(run(&mut multi, &["WATCH", "k"]), "-ERR WATCH inside MULTI is not allowed\r\n");
        assert_eq!(run(&mut multi, &["EXEC"]), "-EXECABORT Transaction discarded because of previous errors.\r\n");
        assert_eq!(multi, None);
        assert_eq!(run(&mut multi, &["GET", "k"]), "passed on", "the connection is back to normal");
        run(&mut multi, &["MULTI"]);
        run(&mut multi, &["SET", "k", "v"]);
        assert_eq!(run(&mut multi, &["DISCARD"]), "+OK\r\n");
        assert_eq!(multi, None);
        assert!(run(&mut multi, &["WATCH", "k"]).starts_with("-ERR WATCH is not supported"));
        assert_eq!(run(&mut multi, &["UNWATCH"]), "+OK\r\n");
    }
}
