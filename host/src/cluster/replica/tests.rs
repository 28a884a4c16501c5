//! The replica's unit tests: sans-IO, driven message by message.
use super::*;
use cachet_proto::Member;

fn members(n: u32) -> Vec<Member> {
    (0..n).map(|i| Member { id: i.to_string(), addr: format!("10.0.0.{i}:1"), weight: 1 }).collect()
}

/// The founding ring of `n` members: balanced, three copies (fewer with
/// fewer members), epoch 1.
fn ring(n: u32) -> Arc<Ring> {
    Arc::new(Ring::balanced(members(n), 3).expect("ring"))
}

/// The next table after `from`, the log's leader placing slots on
/// `placing` (members `0..n` all stay in the ring), `rf` copies.
fn planned(from: &Ring, n: u32, placing: &[u32], rf: usize) -> Arc<Ring> {
    let weights: Vec<(u32, u32)> = placing.iter().map(|&i| (i, 1)).collect();
    let table = from.table().plan(&weights, rf).expect("plan");
    Arc::new(Ring::new(members(n), table).expect("ring"))
}

fn ids(ring: &Ring, key: &[u8]) -> Vec<NodeIx> {
    ring.owners(key, 3).iter().map(|m| m.id.parse().expect("id")).collect()
}

/// FLUSHALL drops every record on every member and answers once all
/// have; with a member down it is refused and drops nothing.
#[test]
fn flushall_reaches_every_member_or_none() {
    let three = ring(3);
    let config = ReplicaConfig { rf: 3, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> =
        (0..3).map(|i| Replica::new(i, 3, three.clone(), config, 10 + u64::from(i))).collect();
    let mut hold = Vec::new();
    for (i, key) in ["a", "b", "c"].into_iter().enumerate() {
        let put = Op::Put { key: Bytes::from(key), value: Some(Bytes::from_static(b"v")), expires_at: None, hint: 0 };
        replicas[i].client(0, 1, put, Consistency::All);
    }
    pump(&mut replicas, 0, &mut hold);
    for (to, from, epoch, message) in std::mem::take(&mut hold).into_iter().map(|(f, t, e, m)| (t, f, e, m)) {
        replicas[to as usize].handle(0, from, epoch, message).expect("accepted");
    }
    pump(&mut replicas, 0, &mut hold);
    for (to, from, epoch, message) in std::mem::take(&mut hold).into_iter().map(|(f, t, e, m)| (t, f, e, m)) {
        replicas[to as usize].handle(0, from, epoch, message).expect("accepted");
    }
    assert!(replicas.iter().all(|r| r.record_count() == 3), "every member holds every key");
    for replica in &mut replicas {
        while replica.poll_reply().is_some() {}
    }
    // A member down: refused, nothing dropped.
    replicas[1].set_alive(0, 2, false);
    replicas[1].client(0, 7, Op::FlushAll, Consistency::Quorum);
    let refused = replicas[1].poll_reply().expect("an answer");
    assert_eq!(refused.result, Err(OpError::Unavailable));
    assert!(replicas.iter().all(|r| r.record_count() == 3));
    replicas[1].set_alive(0, 2, true);
    replicas[1].client(0, 8, Op::FlushAll, Consistency::Quorum);
    pump(&mut replicas, 0, &mut hold);
    let done = replicas[1].poll_reply().expect("an answer");
    assert_eq!(done, Reply { client_req: 8, result: Ok(Outcome::Flushed(9)) });
    assert!(replicas.iter().all(|r| r.record_count() == 0), "every member dropped its records");
    // A member that owns no slot is still asked: it would come back with
    // its records and repair them in.
    let two_owners = planned(&three, 3, &[0, 1], 2);
    replicas[1].set_alive(0, 2, false);
    replicas[1].set_ring(0, two_owners);
    replicas[1].client(0, 9, Op::FlushAll, Consistency::Quorum);
    let refused = replicas[1].poll_reply().expect("an answer");
    assert_eq!(refused.result, Err(OpError::Unavailable), "a member owning nothing is down");
}

/// Delivers every message but stores (`Put`), which stay in `hold`,
/// until quiet.
fn pump(replicas: &mut [Replica], now: u64, hold: &mut Vec<(NodeIx, NodeIx, u64, Message)>) {
    loop {
        let mut moved = false;
        for (from, replica) in replicas.iter_mut().enumerate() {
            while let Some((to, epoch, message)) = replica.poll_transmit() {
                moved = true;
                hold.push((from as NodeIx, to, epoch, message));
            }
        }
        let (deliver, keep): (Vec<_>, Vec<_>) =
            hold.drain(..).partition(|(_, _, _, m)| !matches!(m, Message::Put { .. }));
        *hold = keep;
        for (from, to, epoch, message) in deliver {
            replicas[to as usize].handle(now, from, epoch, message).expect("an honest message is accepted");
            moved = true;
        }
        if !moved {
            return;
        }
    }
}

/// A write coordinated on the old ring while a member joins, whose
/// stores reach the old owners only after they learnt the new ring
/// (and sent the joiner their snapshot). An old owner that lost the key
/// to the joiner holds the write but does not count it: were it
/// counted, the write could be acknowledged without the joiner ever
/// getting it, and a QUORUM of the new owners (the joiner plus the
/// owner the write missed) would read nothing. The write fails instead
/// (the client retries on the new ring), and the joiner still re-syncs
/// in two passes and counts.
#[test]
fn a_write_on_the_old_ring_is_not_counted_by_owners_that_lost_the_key() {
    let old = ring(4);
    let new = planned(&old, 5, &[0, 1, 2, 3, 4], 3);
    // A key whose old owners exclude some member c (the coordinator)
    // and whose new owners are the joiner, an old owner d, and one more.
    let (key, c, d) = (0..10_000)
        .find_map(|i| {
            let key = format!("k{i}");
            let (before, after) = (ids(&old, key.as_bytes()), ids(&new, key.as_bytes()));
            let c = (0..4).find(|n| !before.contains(n))?;
            let d = *after.iter().find(|&&n| n != 4 && before.contains(&n))?;
            after.contains(&4).then_some((Bytes::from(key), c, d))
        })
        .expect("such a key exists");
    let config = ReplicaConfig { rf: 3, request_timeout_ms: 1_000, retry_ms: 100, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> =
        (0..4).map(|i| Replica::new(i, 4, old.clone(), config, u64::from(i) + 11)).collect();
    replicas.push(Replica::new(4, 5, new.clone(), config, 99));
    let mut held = Vec::new();
    // The write's first round completes; its stores are held.
    replicas[c as usize].client(
        0,
        1,
        Op::Put { key: key.clone(), value: Some(Bytes::from_static(b"w")), expires_at: None, hint: 0 },
        Consistency::Quorum,
    );
    pump(&mut replicas, 0, &mut held);
    assert!(held.iter().all(|(from, _, _, m)| *from == c && matches!(m, Message::Put { .. })), "{held:?}");
    assert_eq!(held.len(), 3, "stores to the three old owners");
    // Everyone but the coordinator learns of the joiner, which
    // starts re-syncing (and waits for the coordinator).
    for (i, r) in replicas[..4].iter_mut().enumerate() {
        if i != c as usize {
            r.set_ring(10, new.clone());
        }
    }
    replicas[4].join(10, 99);
    pump(&mut replicas, 10, &mut held);
    assert!(!replicas[4].counted());
    // Now the stores reach every old owner but d.
    for (from, to, epoch, message) in std::mem::take(&mut held) {
        if to != d {
            replicas[to as usize].handle(20, from, epoch, message).expect("an honest message is accepted");
        }
    }
    pump(&mut replicas, 20, &mut held);
    assert!(replicas[c as usize].poll_reply().is_none(), "acknowledged by copies the new ring does not count");
    // The coordinator learns of the joiner and answers its re-sync.
    replicas[c as usize].set_ring(200, new.clone());
    replicas[4].tick(200);
    pump(&mut replicas, 200, &mut held);
    assert!(!replicas[4].counted(), "counted after one pass");
    for r in &mut replicas {
        r.tick(1_200);
    }
    pump(&mut replicas, 1_200, &mut held);
    assert!(replicas[4].counted(), "the second pass completed");
    let reply = replicas[c as usize].poll_reply().expect("the write was answered at its deadline");
    assert_eq!(reply.result, Err(OpError::Timeout));
}

/// A re-sync streams in parts, each asked for from where the last one
/// ended and paced by the sender's stream rate; a lost part is asked for
/// again from its own cursor, not from the start, and the requester
/// counts only once the last part is in.
#[test]
fn a_large_resync_streams_in_paced_parts_and_survives_a_lost_one() {
    let two = ring(2);
    let config = ReplicaConfig {
        rf: 2,
        request_timeout_ms: 1_000,
        retry_ms: 100,
        stream_bytes_per_sec: 8 << 20,
        ..ReplicaConfig::default()
    };
    let mut holder = Replica::new(0, 2, two.clone(), config, 5);
    let mut back = Replica::new(1, 2, two, config, 6);
    let value = Bytes::from(vec![7u8; 1_024]);
    for i in 0..3_000u64 {
        let record = Record {
            version: Version { counter: i + 1, node: 0 },
            value: Some(value.clone()),
            expires_at: None,
            hint: 0,
        };
        let key = Bytes::from(format!("key{i}"));
        holder
            .handle(0, 1, 1, Message::Put { req: 0, key, record, hint_for: None })
            .expect("an honest message is accepted");
    }
    assert_eq!(holder.record_count(), 3_000);
    back.restart(0, 7);
    let (mut parts, mut biggest, mut lost, mut now) = (0, 0, None, 0);
    let mut cursors = Vec::new();
    while !back.counted() && now < 10_000 {
        while let Some((to, epoch, message)) = back.poll_transmit() {
            assert_eq!(to, 0);
            holder.handle(now, 1, epoch, message).expect("an honest message is accepted");
        }
        while let Some((to, epoch, message)) = holder.poll_transmit() {
            assert_eq!(to, 1);
            if let Message::SyncData { ref entries, ref cursor, .. } = message {
                parts += 1;
                biggest = biggest.max(entries.len());
                cursors.push(cursor.clone());
                if parts == 3 {
                    lost = Some(cursor.clone());
                    continue;
                }
            }
            back.handle(now, 0, epoch, message).expect("an honest message is accepted");
        }
        if parts == 3 {
            assert!(!back.counted(), "counted with a part missing");
        }
        now += 1;
        back.tick(now);
        holder.tick(now);
    }
    assert!(back.counted(), "the stream completed by {now} ms");
    assert_eq!(back.record_count(), 3_000);
    assert!(biggest <= SYNC_PART_BYTES / 1_024, "a part holds {biggest} records");
    // About 1,060 bytes a record, 247 records a part: 13 parts, and the
    // lost one once more, from its own cursor.
    assert_eq!(parts, 14, "{parts} parts");
    let lost = lost.expect("a part was dropped");
    assert_eq!(cursors.iter().filter(|c| **c == lost).count(), 2, "only the lost part came twice");
    // 3.2 MB at 8 MiB/s is about 380 ms, and the lost part cost a retry
    // period: paced, not sent at once.
    assert!((400..2_000).contains(&now), "took {now} ms");
    let streamed = holder.streamed_bytes();
    assert!((3_000 * 1_024..3_000 * 1_200).contains(&streamed), "streamed {streamed} bytes");
}

/// A store that refuses everything (a record over its bounds, or one
/// its policy does not admit).
struct Refusing;

impl RecordStore for Refusing {
    fn get(&self, _: &[u8], _: bool) -> Option<Record> {
        None
    }
    fn put(&mut self, _: u64, _: &Bytes, _: &Record) -> bool {
        false
    }
    fn len(&self) -> usize {
        0
    }
    fn clear(&mut self) {}
    fn scan(&self, _: &mut dyn FnMut(&Bytes, &Record)) {}
    fn scan_part(
        &self,
        _: &[u8],
        _: usize,
        _: &dyn Fn(&[u8]) -> bool,
        _: &mut dyn FnMut(&Bytes, &Record) -> bool,
    ) -> Option<Bytes> {
        None
    }
}

/// A replica whose store refused a record does not count toward the
/// write's quorum: with two of three refusing, the QUORUM write is not
/// acknowledged.
#[test]
fn a_refused_record_is_not_counted_as_stored() {
    let three = ring(3);
    let config = ReplicaConfig { rf: 3, request_timeout_ms: 1_000, retry_ms: 100, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| {
            let store: Box<dyn RecordStore> = if i == 1 { Box::new(BTreeMap::new()) } else { Box::new(Refusing) };
            Replica::with_store(i, 3, three.clone(), config, u64::from(i) + 3, store)
        })
        .collect();
    let put =
        Op::Put { key: Bytes::from_static(b"k"), value: Some(Bytes::from_static(b"v")), expires_at: None, hint: 0 };
    replicas[1].client(0, 1, put, Consistency::Quorum);
    let mut hold = Vec::new();
    pump(&mut replicas, 0, &mut hold);
    for (from, to, epoch, message) in std::mem::take(&mut hold) {
        replicas[to as usize].handle(1, from, epoch, message).expect("an honest message is accepted");
    }
    pump(&mut replicas, 1, &mut hold);
    assert!(replicas[1].poll_reply().is_none(), "acknowledged with one stored copy");
    replicas[1].tick(1_001);
    let reply = replicas[1].poll_reply().expect("answered at the deadline");
    assert_eq!(reply.result, Err(OpError::Timeout));
}

/// Delivers everything between the replicas in `up` until quiet;
/// messages to or from the others are lost.
fn settle(replicas: &mut [Replica], up: &[bool], now: u64) {
    loop {
        let mut out = Vec::new();
        for (from, replica) in replicas.iter_mut().enumerate() {
            while let Some((to, epoch, message)) = replica.poll_transmit() {
                out.push((from as NodeIx, to, epoch, message));
            }
        }
        if out.is_empty() {
            return;
        }
        for (from, to, epoch, message) in out {
            if up[from as usize] && up[to as usize] {
                replicas[to as usize].handle(now, from, epoch, message).expect("an honest message is accepted");
            }
        }
    }
}

/// A member down long enough has its slots moved by the log: they pass
/// to the survivors, which re-sync them (restoring two copies of every
/// key) while still counting for the keys they already owned, and then
/// serve QUORUM on every key, which a table keeping the dead owner could
/// not do at RF=2.
#[test]
fn a_dead_members_slots_move_to_the_survivors_and_its_copies_are_restored() {
    let config = ReplicaConfig { rf: 2, request_timeout_ms: 1_000, retry_ms: 100, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(i, 3, ring(3), config, u64::from(i) + 21)).collect();
    let mut up = vec![true; 3];
    let keys: Vec<Bytes> = (0..200).map(|i| Bytes::from(format!("key{i}"))).collect();
    for (i, key) in keys.iter().enumerate() {
        let op = Op::Put { key: key.clone(), value: Some(Bytes::from(format!("v{i}"))), expires_at: None, hint: 0 };
        replicas[i % 3].client(0, i as u64, op, Consistency::Quorum);
        settle(&mut replicas, &up, 0);
    }
    for r in &mut replicas {
        while let Some(reply) = r.poll_reply() {
            assert!(matches!(reply.result, Ok(Outcome::Written(_))), "{reply:?}");
        }
    }
    // Node 2 dies. On the old ring, a QUORUM write of a key it owns
    // cannot be served.
    up[2] = false;
    for r in &mut replicas[..2] {
        r.set_alive(10, 2, false);
    }
    let shared = keys.iter().find(|k| replicas[0].owners(k).contains(&2)).expect("node 2 owns keys").clone();
    let op = Op::Put { key: shared.clone(), value: Some(Bytes::from_static(b"x")), expires_at: None, hint: 0 };
    replicas[0].client(10, 1_000, op, Consistency::Quorum);
    assert_eq!(replicas[0].poll_reply().map(|r| r.result), Some(Err(OpError::Unavailable)));
    // The log moves its slots to the survivors; they re-sync what they
    // gained.
    let smaller = planned(&ring(3), 3, &[0, 1], 2);
    for r in &mut replicas[..2] {
        r.set_ring(20, smaller.clone());
    }
    let gained = keys.iter().find(|k| ring(3).owners(k, 2).iter().all(|m| m.id != "0")).expect("a gained key");
    let kept = keys.iter().find(|k| ring(3).owners(k, 2).iter().any(|m| m.id == "0")).expect("a kept key");
    assert!(!replicas[0].counted());
    assert!(replicas[0].counted_for(kept), "a key it owned all along still counts");
    assert!(!replicas[0].counted_for(gained), "a gained key counts only once re-synced");
    for now in [20, 1_100] {
        for r in &mut replicas[..2] {
            r.tick(now);
        }
        settle(&mut replicas, &up, now);
    }
    for (i, r) in replicas[..2].iter().enumerate() {
        assert!(r.counted(), "node {i} finished re-syncing");
        for (n, key) in keys.iter().enumerate() {
            let record = r.record(key).unwrap_or_else(|| panic!("node {i} lacks {key:?}"));
            assert_eq!(record.value, Some(Bytes::from(format!("v{n}"))));
        }
    }
    // Every key is served at QUORUM again.
    for (i, key) in keys.iter().enumerate() {
        replicas[i % 2].client(1_200, 2_000 + i as u64, Op::Get { key: key.clone() }, Consistency::Quorum);
        settle(&mut replicas, &up, 1_200);
        let reply = replicas[i % 2].poll_reply().expect("answered");
        let Ok(Outcome::Read(Some(record))) = reply.result else { panic!("{reply:?}") };
        assert_eq!(record.value, Some(Bytes::from(format!("v{i}"))));
    }
}

/// Members that become owners during a re-sync are waited for too, and
/// members that own nothing any more are not.
#[test]
fn a_resync_waits_for_the_current_owners() {
    let config = ReplicaConfig { rf: 2, request_timeout_ms: 1_000, retry_ms: 100, ..ReplicaConfig::default() };
    let two = Arc::new(Ring::new(members(3), cachet_proto::SlotTable::balanced(1, &[0, 1], 2).expect("t")).expect("r"));
    let mut replica = Replica::new(0, 3, two.clone(), config, 3);
    replica.restart(0, 4);
    assert_eq!(replica.resync_waiting(), vec![1]);
    let three = planned(&two, 3, &[0, 1, 2], 2);
    replica.set_ring(0, three.clone());
    assert_eq!(replica.resync_waiting(), vec![1, 2]);
    replica.set_ring(0, planned(&three, 3, &[0, 2], 2));
    assert_eq!(replica.resync_waiting(), vec![2]);
}

/// A sender on an older table is fenced: it is answered, but as not
/// counting, so a coordinator that has not seen the log move cannot
/// complete a quorum among owners that did; one on a newer table is
/// answered as not counting too; a replica out of touch with
/// the log's leader counts for nothing; and a re-sync request is
/// answered only from the same table.
#[test]
fn a_sender_on_an_older_table_is_answered_as_not_counting() {
    let config = ReplicaConfig { rf: 3, ..ReplicaConfig::default() };
    let old = ring(3);
    let new = planned(&old, 4, &[0, 1, 2, 3], 3);
    let mut replica = Replica::new(0, 4, new.clone(), config, 5);
    let key = (0..1_000)
        .map(|i| Bytes::from(format!("k{i}")))
        .find(|k| {
            let owners: Vec<&str> = new.owners(k, 3).iter().map(|m| m.id.as_str()).collect();
            owners.contains(&"0") && old.owners(k, 3).iter().any(|m| m.id == "0")
        })
        .expect("a key node 0 owns on both");
    let record = Record { version: Version { counter: 1, node: 1 }, value: None, expires_at: None, hint: 0 };
    let put = Message::Put { req: 7, key: key.clone(), record, hint_for: None };
    replica.handle(1, 1, old.epoch(), put.clone()).expect("accepted");
    assert_eq!(replica.poll_transmit(), Some((1, new.epoch(), Message::PutAck { req: 7, counted: false })));
    replica.handle(1, 1, new.epoch(), put).expect("accepted");
    assert_eq!(replica.poll_transmit(), Some((1, new.epoch(), Message::PutAck { req: 7, counted: true })));
    replica.handle(1, 1, old.epoch(), Message::Get { req: 8, key: key.clone() }).expect("accepted");
    assert!(matches!(replica.poll_transmit(), Some((1, _, Message::GetReply { counted: false, .. }))));
    // A sender on a table newer than this replica's is not counted for
    // either: this replica is the one behind (simulator seed 1550).
    replica.handle(1, 1, new.epoch() + 1, Message::Get { req: 10, key: key.clone() }).expect("accepted");
    assert!(matches!(replica.poll_transmit(), Some((1, _, Message::GetReply { counted: false, .. }))));
    // Out of touch with the log's leader, nothing it answers counts.
    replica.set_in_contact(false);
    replica.handle(1, 1, new.epoch(), Message::Get { req: 9, key: key.clone() }).expect("accepted");
    assert!(matches!(replica.poll_transmit(), Some((1, _, Message::GetReply { counted: false, .. }))));
    assert!(!replica.counted());
    replica.set_in_contact(true);
    let ask = || Message::SyncRequest { round: 3, cursor: Bytes::new() };
    replica.handle(1, 1, old.epoch(), ask()).expect("accepted");
    assert_eq!(replica.poll_transmit(), None, "no stream for an older table");
    replica.handle(1, 1, new.epoch(), ask()).expect("accepted");
    assert!(matches!(replica.poll_transmit(), Some((1, _, Message::SyncData { round: 3, .. }))));
}

/// A member holding a valid certificate sends what no honest member
/// would: each message is refused with its own error, before it
/// changes anything (records, hints, the clock, the outbox), and the
/// replica serves on: a write coordinated afterwards gets an ordinary
/// version and wins over the refused one at the top of the range.
#[test]
fn hostile_peer_messages_are_refused_and_change_nothing() {
    use PeerMessageError as E;
    let config = ReplicaConfig { rf: 3, ..ReplicaConfig::default() };
    let mut replica = Replica::new(0, 3, ring(3), config, 7);
    let key = Bytes::from_static(b"k");
    let at = |counter: u64| Record {
        version: Version { counter, node: 1 },
        value: Some(Bytes::from_static(b"v")),
        expires_at: None,
        hint: 0,
    };
    let put = |record: Record, hint_for: Option<NodeIx>| Message::Put { req: 1, key: key.clone(), record, hint_for };
    replica.handle(10, 1, 1, put(at(5), None)).expect("an honest message is accepted");
    while replica.poll_transmit().is_some() {}
    let now = 20;
    let top = ceiling_at(now, &config);
    let big = Bytes::from(vec![0u8; config.max_value_len + 1]);
    let sync = |cursor: Bytes, entries: Vec<(Bytes, Record)>| Message::SyncData {
        round: 1,
        cursor: cursor.clone(),
        next: Some(cursor),
        entries,
    };
    let long = Bytes::from(vec![1u8; config.max_key_len + 2]);
    type Case = (NodeIx, Message, fn(&PeerMessageError) -> bool);
    let cases: Vec<Case> = vec![
        (MAX_NODE_ID + 1, put(at(6), None), |e| matches!(e, E::UnknownSender { from: 1_024, .. })),
        (u32::MAX, put(at(6), None), |e| matches!(e, E::UnknownSender { .. })),
        (0, put(at(6), None), |e| matches!(e, E::UnknownSender { from: 0, .. })),
        (1, put(at(u64::MAX), None), |e| matches!(e, E::Version(_))),
        (1, put(at(top + 1), None), |e| matches!(e, E::Version(v) if v.counter == v.limit + 1)),
        (1, Message::GetReply { req: 1, record: Some(at(u64::MAX)), counted: true }, |e| matches!(e, E::Version(_))),
        (2, put(at(6), Some(9)), |e| matches!(e, E::HintTarget { target: 9 })),
        (2, put(at(6), Some(u32::MAX)), |e| matches!(e, E::HintTarget { .. })),
        (2, put(at(6), Some(2)), |e| matches!(e, E::HintTarget { target: 2 })),
        (
            1,
            Message::Put { req: 1, key: Bytes::from(vec![1u8; config.max_key_len + 1]), record: at(6), hint_for: None },
            |e| matches!(e, E::TooLarge { what: "key", .. }),
        ),
        (1, put(Record { value: Some(big.clone()), ..at(6) }, Some(2)), |e| {
            matches!(e, E::TooLarge { what: "value", .. })
        }),
        (1, Message::Get { req: 1, key: Bytes::from(vec![1u8; config.max_key_len + 1]) }, |e| {
            matches!(e, E::TooLarge { .. })
        }),
        // One bad record spoils the whole part: the good one before it
        // is not applied either.
        (1, sync(Bytes::new(), vec![(Bytes::from_static(b"good"), at(7)), (key.clone(), at(u64::MAX))]), |e| {
            matches!(e, E::Version(_))
        }),
        (1, sync(long.clone(), Vec::new()), |e| matches!(e, E::TooLarge { what: "cursor", .. })),
        (1, Message::SyncRequest { round: 1, cursor: long.clone() }, |e| {
            matches!(e, E::TooLarge { what: "cursor", .. })
        }),
    ];
    let records = replica.records();
    for (from, message, expected) in cases {
        let shown = format!("{message:?}");
        let shown = &shown[..shown.len().min(120)];
        let err = replica.handle(now, from, 1, message).expect_err(shown);
        assert!(expected(&err), "{shown}: {err}");
        assert_eq!(replica.records(), records, "{shown} changed the records");
        assert_eq!(replica.hints_held(), 0, "{shown} left a hint");
        assert!(replica.poll_transmit().is_none(), "{shown} was answered");
    }
    // The clock saw none of it: the next write is version 6 and wins.
    replica.client(
        now,
        1,
        Op::Put { key: key.clone(), value: Some(Bytes::from_static(b"w")), expires_at: None, hint: 0 },
        Consistency::One,
    );
    let reply = replica.poll_reply().expect("a ONE write here is answered at once");
    assert_eq!(reply.result, Ok(Outcome::Written(Version { counter: 6, node: 0 })));
    assert_eq!(replica.record(&key).and_then(|r| r.value), Some(Bytes::from_static(b"w")));
}

fn ceiling_at(now: u64, config: &ReplicaConfig) -> u64 {
    version::ceiling(config.wall_epoch_ms + now)
}

/// Parts nobody asked for (another round, another cursor, a member not
/// waited for) are records, no more: they move no stream on and finish
/// none.
#[test]
fn made_up_sync_parts_move_no_stream() {
    let mut replica = Replica::new(0, 3, ring(3), ReplicaConfig::default(), 7);
    replica.restart(0, 8);
    while replica.poll_transmit().is_some() {}
    let round = replica.resync.as_ref().map(|r| r.round).expect("re-syncing");
    let part = |round: u64, cursor: &'static [u8], next: Option<&'static [u8]>| Message::SyncData {
        round,
        cursor: Bytes::from_static(cursor),
        next: next.map(Bytes::from_static),
        entries: Vec::new(),
    };
    for message in [part(round + 1, b"", None), part(round, b"elsewhere", None), part(0, b"", None)] {
        replica.handle(1, 1, 1, message).expect("well-formed");
    }
    assert_eq!(replica.resync_waiting(), vec![1, 2], "nothing finished");
    assert!(replica.poll_transmit().is_none(), "nothing asked for");
    // The real first part moves member 1's stream on, and the next is asked
    // for from its end; a replay of the first part then does nothing.
    replica.handle(2, 1, 1, part(round, b"", Some(b"\x01k"))).expect("ok");
    let asked = replica.poll_transmit();
    assert!(
        matches!(&asked, Some((1, _, Message::SyncRequest { cursor, .. })) if cursor.as_ref() == b"\x01k"),
        "{asked:?}"
    );
    replica.handle(3, 1, 1, part(round, b"", None)).expect("ok");
    assert_eq!(replica.resync_waiting(), vec![1, 2], "a replayed part finishes nothing");
    replica.handle(4, 1, 1, part(round, b"\x01k", None)).expect("ok");
    assert_eq!(replica.resync_waiting(), vec![2], "the stream's own last part finishes it");
}

/// A size probe answers, per key, the largest value length its owners
/// hold, one message per member; a reply for other keys than asked is
/// ignored; at the deadline it answers with what it heard; an oversized
/// probe from a peer is refused by name.
#[test]
fn size_probes_answer_the_largest_copy_per_key() {
    let config = ReplicaConfig { rf: 3, request_timeout_ms: 1_000, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(i, 3, ring(3), config, 60 + u64::from(i))).collect();
    let up = vec![true; 3];
    let put = |key: &str, len: usize| Op::Put {
        key: Bytes::from(key.to_owned()),
        value: Some(Bytes::from(vec![b'x'; len])),
        expires_at: None,
        hint: 0,
    };
    replicas[0].client(0, 1, put("small", 10), Consistency::All);
    replicas[0].client(0, 2, put("big", 5_000), Consistency::All);
    settle(&mut replicas, &up, 0);
    // A newer, larger copy of "big" only on member 2 (a write not yet
    // repaired elsewhere): the probe takes the largest.
    let newer = Record {
        version: Version { counter: 1 << 20, node: 1 },
        value: Some(Bytes::from(vec![b'y'; 9_000])),
        expires_at: None,
        hint: 0,
    };
    replicas[2]
        .handle(0, 1, 1, Message::Put { req: 0, key: Bytes::from_static(b"big"), record: newer, hint_for: None })
        .expect("accepted");
    while replicas[0].poll_reply().is_some() {}
    let keys = vec![Bytes::from_static(b"small"), Bytes::from_static(b"big"), Bytes::from_static(b"none")];
    replicas[0].client(0, 3, Op::Sizes { keys: keys.clone() }, Consistency::All);
    let sent: Vec<(NodeIx, Message)> =
        std::iter::from_fn(|| replicas[0].poll_transmit()).map(|(t, _, m)| (t, m)).collect();
    assert_eq!(sent.len(), 2, "one message per other member: {sent:?}");
    for (to, message) in sent {
        replicas[to as usize].handle(0, 0, 1, message).expect("accepted");
    }
    settle(&mut replicas, &up, 0);
    assert_eq!(replicas[0].poll_reply(), Some(Reply { client_req: 3, result: Ok(Outcome::Sizes(vec![10, 9_000, 0])) }));

    // Member 2 answers for other keys than asked: ignored; member 1 never
    // answers; at the deadline the probe answers with what it knows.
    replicas[0].client(10, 4, Op::Sizes { keys }, Consistency::All);
    let sent: Vec<(NodeIx, Message)> =
        std::iter::from_fn(|| replicas[0].poll_transmit()).map(|(t, _, m)| (t, m)).collect();
    let req = sent.iter().find_map(|(_, m)| if let Message::Sizes { req, .. } = m { Some(*req) } else { None });
    let req = req.expect("a probe was sent");
    replicas[0].handle(10, 2, 1, Message::SizesReply { req, sizes: vec![1 << 40] }).expect("accepted");
    assert_eq!(replicas[0].poll_reply(), None, "a reply of the wrong shape is not an answer");
    replicas[0].tick(10 + 1_000);
    assert_eq!(replicas[0].poll_reply(), Some(Reply { client_req: 4, result: Ok(Outcome::Sizes(vec![10, 5_000, 0])) }));

    let flood = Message::Sizes { req: 1, keys: vec![Bytes::new(); MAX_PROBE_KEYS + 1] };
    assert!(matches!(replicas[1].check(0, 0, &flood), Err(PeerMessageError::TooMany { what: "keys", .. })));
}

/// An update forwarded to a key's primary is answered by that primary
/// only: an answer from another member, even one with the right request
/// id, is ignored.
#[test]
fn a_forwarded_update_is_answered_only_by_its_primary() {
    let three = ring(3);
    let config = ReplicaConfig { rf: 3, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> =
        (0..3).map(|i| Replica::new(i, 3, three.clone(), config, 90 + u64::from(i))).collect();
    let up = vec![true; 3];
    let key = Bytes::from_static(b"counter");
    let owners = ids(&three, &key);
    let (primary, coordinator) = (owners[0], owners[1]);
    let other = owners[2];
    let c = coordinator as usize;
    replicas[c].client(0, 1, Op::Update { key: key.clone(), update: Update::Incr(5) }, Consistency::Quorum);
    let sent: Vec<(NodeIx, Message)> =
        std::iter::from_fn(|| replicas[c].poll_transmit()).map(|(t, _, m)| (t, m)).collect();
    let Some((to, Message::Update { req, .. })) = sent.first().cloned() else { panic!("forwarded: {sent:?}") };
    assert_eq!(to, primary);
    let forged = Message::UpdateReply { req, result: Ok(Effect::Integer(1_000)) };
    replicas[c].handle(0, other, 1, forged).expect("well-formed");
    assert_eq!(replicas[c].poll_reply(), None, "not the primary's answer");
    for (to, message) in sent {
        replicas[to as usize].handle(0, coordinator, 1, message).expect("accepted");
    }
    settle(&mut replicas, &up, 0);
    let reply = replicas[c].poll_reply().expect("the primary's answer");
    assert_eq!(reply, Reply { client_req: 1, result: Ok(Outcome::Updated(Effect::Integer(5))) });
}

/// Stale-while-revalidate at a key's primary: a value past its soft expiry
/// is served at once and refreshed in the background (GETs meanwhile get
/// it too, without another load); the refreshed value is written to the
/// replicas; a write during a refresh abandons it, so the refresh's older
/// read cannot install over the write.
#[test]
fn a_stale_value_is_served_while_the_primary_refreshes_it() {
    let three = ring(3);
    let config = ReplicaConfig { rf: 3, request_timeout_ms: 1_000, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> =
        (0..3).map(|i| Replica::new(i, 3, three.clone(), config, 120 + u64::from(i))).collect();
    let up = vec![true; 3];
    let key = Bytes::from_static(b"user:1");
    let p = ids(&three, &key)[0] as usize;
    let rule = update::FreshRule { grace_ms: 500, beta_milli: 0, draw: 1 };
    let load = || Op::Update {
        key: Bytes::from_static(b"user:1"),
        update: Update::Load { wait_ms: 1_000, fresh: Some(rule) },
    };
    let value = |v: &'static [u8]| Ok(Outcome::Updated(Effect::Value(Some(Bytes::from_static(v)))));
    // A cold load: loaded, written (TTL 1,000 ms, the last 500 the grace).
    replicas[p].client(0, 1, load(), Consistency::Quorum);
    settle(&mut replicas, &up, 0);
    let first = replicas[p].poll_load().expect("a load");
    assert_eq!(first.kind, LoadKind::Load);
    replicas[p].loaded(0, first.id, Ok(Some((Bytes::from_static(b"v1"), 1_000, 10))));
    settle(&mut replicas, &up, 0);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"v1")));
    // Fresh at 400: served, nothing loaded.
    replicas[p].client(400, 2, load(), Consistency::Quorum);
    settle(&mut replicas, &up, 400);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"v1")));
    assert_eq!(replicas[p].poll_load(), None);
    // Stale at 600: served at once, refreshed in the background.
    replicas[p].client(600, 3, load(), Consistency::Quorum);
    settle(&mut replicas, &up, 600);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"v1")));
    let refresh = replicas[p].poll_load().expect("a refresh");
    let LoadKind::Refresh(of) = &refresh.kind else { panic!("a refresh: {refresh:?}") };
    assert_eq!((of.current.clone(), of.stale), (Bytes::from_static(b"v1"), true));
    replicas[p].client(610, 4, load(), Consistency::Quorum);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"v1")), "served while refreshing");
    assert_eq!(replicas[p].poll_load(), None, "one refresh");
    replicas[p].loaded(620, refresh.id, Ok(Some((Bytes::from_static(b"v2"), 1_000, 10))));
    settle(&mut replicas, &up, 620);
    assert_eq!(replicas[p].poll_reply(), None, "nobody waited on the refresh");
    replicas[p].client(630, 5, load(), Consistency::Quorum);
    settle(&mut replicas, &up, 630);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"v2")), "refreshed");
    assert!(replicas.iter().all(|r| r.record(&key).and_then(|r| r.value) == Some(Bytes::from_static(b"v2"))));
    // Stale again at 1,300; a SET while the refresh waits for the origin.
    replicas[p].client(1_300, 6, load(), Consistency::Quorum);
    settle(&mut replicas, &up, 1_300);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"v2")));
    let late = replicas[p].poll_load().expect("a refresh");
    let set = Update::Set {
        value: Bytes::from_static(b"written"),
        ttl_ms: None,
        keep_ttl: false,
        condition: cachet_proto::Condition::Always,
        get: false,
        hint: 0,
    };
    replicas[p].client(1_310, 7, Op::Update { key: key.clone(), update: set }, Consistency::Quorum);
    settle(&mut replicas, &up, 1_310);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(Ok(Outcome::Updated(Effect::Ok))));
    replicas[p].loaded(1_320, late.id, Ok(Some((Bytes::from_static(b"old read"), 1_000, 10))));
    settle(&mut replicas, &up, 1_320);
    replicas[p].client(1_330, 8, load(), Consistency::Quorum);
    settle(&mut replicas, &up, 1_330);
    assert_eq!(replicas[p].poll_reply().map(|r| r.result), Some(value(b"written")), "the write stands");
}

/// An MSET of keys with the same owners is written as one batch: every
/// owner holds all of it under one version or none of it; a member down
/// gets hints; too few members up refuses it with nothing written; keys
/// with other owners are refused.
#[test]
fn a_batch_is_written_whole_on_every_owner_or_not_at_all() {
    let three = ring(3);
    let config = ReplicaConfig { rf: 3, request_timeout_ms: 1_000, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> =
        (0..3).map(|i| Replica::new(i, 3, three.clone(), config, 150 + u64::from(i))).collect();
    let up = vec![true; 3];
    let entries = |tag: &str| -> Vec<BatchEntry> {
        ["a", "b", "c"]
            .iter()
            .map(|k| BatchEntry {
                key: Bytes::from(format!("{{t}}{k}")),
                value: Some(Bytes::from(format!("{tag}-{k}"))),
                expires_at: None,
                hint: 7,
            })
            .collect()
    };
    let keys: Vec<Bytes> = entries("").into_iter().map(|e| e.key).collect();
    replicas[0].client(0, 1, Op::PutMany { entries: entries("one") }, Consistency::Quorum);
    settle(&mut replicas, &up, 0);
    let Some(Reply { result: Ok(Outcome::Written(version)), .. }) = replicas[0].poll_reply() else {
        panic!("the batch was acknowledged")
    };
    for replica in &replicas {
        for key in &keys {
            let record = replica.record(key).expect("every key on every owner");
            assert_eq!((record.version, record.hint), (version, 7), "one version for the whole batch");
        }
    }
    // A batch whose PutBatch to member 2 is lost: member 2 holds none of
    // it, the others all of it.
    replicas[1].client(10, 2, Op::PutMany { entries: entries("two") }, Consistency::Quorum);
    loop {
        let mut out = Vec::new();
        for (from, replica) in replicas.iter_mut().enumerate() {
            while let Some((to, epoch, message)) = replica.poll_transmit() {
                out.push((from as NodeIx, to, epoch, message));
            }
        }
        if out.is_empty() {
            break;
        }
        for (from, to, epoch, message) in out {
            if to == 2 && matches!(message, Message::PutBatch { .. }) {
                continue;
            }
            replicas[to as usize].handle(10, from, epoch, message).expect("accepted");
        }
    }
    assert!(matches!(replicas[1].poll_reply(), Some(Reply { result: Ok(Outcome::Written(_)), .. })));
    let value = |r: &Replica, k: &Bytes| r.record(k).and_then(|r| r.value);
    for key in &keys {
        assert!(value(&replicas[0], key).is_some_and(|v| v.starts_with(b"two")));
        assert!(value(&replicas[1], key).is_some_and(|v| v.starts_with(b"two")));
        assert!(value(&replicas[2], key).is_some_and(|v| v.starts_with(b"one")), "none of the lost batch");
    }
    // Two members down: refused at QUORUM, nothing written.
    replicas[0].set_alive(20, 1, false);
    replicas[0].set_alive(20, 2, false);
    replicas[0].client(20, 3, Op::PutMany { entries: entries("three") }, Consistency::Quorum);
    assert_eq!(replicas[0].poll_reply().map(|r| r.result), Some(Err(OpError::Unavailable)));
    assert!(keys.iter().all(|k| !value(&replicas[0], k).is_some_and(|v| v.starts_with(b"three"))));
    // Keys of other owners: refused.
    replicas[0].set_alive(20, 1, true);
    replicas[0].set_alive(20, 2, true);
    let spread: Vec<BatchEntry> = (0..50)
        .map(|i| BatchEntry { key: Bytes::from(format!("k{i}")), value: None, expires_at: None, hint: 0 })
        .collect();
    let two = ReplicaConfig { rf: 2, ..config };
    let mut narrow = Replica::new(0, 3, three.clone(), two, 170);
    for n in 1..3 {
        narrow.set_alive(0, n, true);
    }
    let one = vec![spread[0].clone()];
    narrow.client(30, 4, Op::PutMany { entries: spread }, Consistency::Quorum);
    assert_eq!(narrow.poll_reply().map(|r| r.result), Some(Err(OpError::Unavailable)), "owners differ");
    narrow.client(30, 5, Op::PutMany { entries: one }, Consistency::Quorum);
    assert_eq!(narrow.poll_reply(), None, "one key's owners agree: it waits for their answers");
}

/// A write whose query is answered only past its deadline (its
/// coordinator was paused with the replies queued) fails and stores
/// nothing: stored then, it would take a version above the writes made
/// meanwhile through other members (its clock has seen them) and undo
/// them.
#[test]
fn a_write_answered_past_its_deadline_stores_nothing() {
    let config = ReplicaConfig { rf: 3, request_timeout_ms: 1_000, retry_ms: 100, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> = (0..3).map(|i| Replica::new(i, 3, ring(3), config, 70 + u64::from(i))).collect();
    let key = Bytes::from_static(b"k");
    let put =
        |v: &'static [u8]| Op::Put { key: key.clone(), value: Some(Bytes::from_static(v)), expires_at: None, hint: 0 };
    replicas[0].client(0, 1, put(b"old"), Consistency::Quorum);
    // The query goes out; the process stops before the answers arrive.
    let queries: Vec<(NodeIx, u64, Message)> = std::iter::from_fn(|| replicas[0].poll_transmit()).collect();
    assert!(!queries.is_empty());
    let mut answers = Vec::new();
    for (to, epoch, message) in queries {
        replicas[to as usize].handle(0, 0, epoch, message).expect("accepted");
        answers.extend(std::iter::from_fn(|| replicas[to as usize].poll_transmit()).map(|(_, e, m)| (to, e, m)));
    }
    // Meanwhile a newer write through member 1 is acknowledged.
    // (Its stores reach member 0 too, queued: its clock sees them first.)
    replicas[1].client(10, 2, put(b"new"), Consistency::Quorum);
    settle(&mut replicas, &[true, true, true], 10);
    assert!(matches!(replicas[1].poll_reply(), Some(Reply { result: Ok(Outcome::Written(_)), .. })));
    // Member 0 resumes past its deadline and takes the queued answers.
    for (from, epoch, message) in answers {
        replicas[0].handle(5_000, from, epoch, message).expect("accepted");
    }
    let reply = replicas[0].poll_reply().expect("answered at once");
    assert_eq!(reply, Reply { client_req: 1, result: Err(OpError::Timeout) });
    assert!(
        std::iter::from_fn(|| replicas[0].poll_transmit()).all(|(_, _, m)| !matches!(m, Message::Put { .. })),
        "nothing stored"
    );
    for r in &replicas[1..] {
        assert_eq!(r.record(&key).and_then(|r| r.value), Some(Bytes::from_static(b"new")));
    }
}

/// A member that asks for stream parts in a loop (it holds a valid
/// certificate, so its asks are well formed) gets no more than the stream
/// rate: each ask replaces its last one (counted), parts are built one at
/// a time, and another member's stream is served in its turn.
#[test]
fn a_member_asking_in_a_loop_gets_no_more_than_the_stream_rate() {
    let config = ReplicaConfig { rf: 3, retry_ms: 100, stream_bytes_per_sec: 1 << 20, ..ReplicaConfig::default() };
    let mut replica = Replica::new(0, 3, ring(3), config, 9);
    for i in 0..2_000u64 {
        let record = Record {
            version: Version { counter: i + 1, node: 1 },
            value: Some(Bytes::from(vec![3u8; 1_024])),
            expires_at: None,
            hint: 0,
        };
        let key = Bytes::from(format!("k{i}"));
        replica.handle(0, 1, 1, Message::Put { req: 0, key, record, hint_for: None }).expect("ok");
    }
    while replica.poll_transmit().is_some() {}
    let (mut to_one, mut to_two) = (0usize, 0usize);
    for now in 0..1_000u64 {
        replica.handle(now, 1, 1, Message::SyncRequest { round: now, cursor: Bytes::new() }).expect("well formed");
        if now == 500 {
            replica.handle(now, 2, 1, Message::SyncRequest { round: 7, cursor: Bytes::new() }).expect("well formed");
        }
        replica.tick(now);
        for (to, _, message) in std::iter::from_fn(|| replica.poll_transmit()) {
            if let Message::SyncData { entries, .. } = message {
                let bytes: usize = entries.iter().map(|(k, r)| k.len() + r.value.as_ref().map_or(0, Bytes::len)).sum();
                if to == 1 { to_one += bytes } else { to_two += bytes }
            }
        }
    }
    // A second at 1 MiB/s, plus the bucket's first part and one in debt.
    assert!(to_one <= (1 << 20) + 2 * (256 << 10), "{to_one} bytes to the looping member");
    assert!(to_two > 0, "the other member was served in its turn");
    assert!(replica.syncs_refused() >= 990, "{} asks dropped", replica.syncs_refused());
}

/// On a staged table a write goes to the owners and to the member taking
/// the slot over, and needs one more acknowledgement per pending member
/// (Cassandra's q + p): with one owner down, the two others' QUORUM
/// acknowledgements are not enough while the pending member is silent,
/// and are with it. Reads ask the owners only, and a pending member's
/// copy does not count for them.
#[test]
fn a_write_on_a_staged_table_needs_the_pending_members_acknowledgement() {
    let old = ring(3);
    let target = planned(&old, 4, &[0, 1, 2, 3], 3);
    let staged = Arc::new(Ring::new(members(4), old.table().staged(target.table()).expect("staged")).expect("ring"));
    let key = (0..1_000)
        .map(|i| Bytes::from(format!("k{i}")))
        .find(|k| staged.pending(k) == [3])
        .expect("a key member 3 takes over");
    let owners = ids(&staged, &key);
    assert!(!owners.contains(&3));
    let config = ReplicaConfig { rf: 3, ..ReplicaConfig::default() };
    let mut replicas: Vec<Replica> =
        (0..4).map(|i| Replica::new(i, 4, staged.clone(), config, 40 + u64::from(i))).collect();
    let (coordinator, down) = (owners[0] as usize, owners[2]);
    for replica in &mut replicas {
        replica.set_alive(0, down, false);
    }
    let put =
        |v: &'static [u8]| Op::Put { key: key.clone(), value: Some(Bytes::from_static(v)), expires_at: None, hint: 0 };
    // The pending member silent too: two owners' acknowledgements of
    // the three needed.
    let mut up = vec![true; 4];
    up[down as usize] = false;
    up[3] = false;
    replicas[coordinator].client(0, 1, put(b"a"), Consistency::Quorum);
    settle(&mut replicas, &up, 0);
    assert_eq!(replicas[coordinator].poll_reply(), None, "not acknowledged without the pending member");
    replicas[coordinator].tick(2_000);
    assert_eq!(replicas[coordinator].poll_reply().map(|r| r.result), Some(Err(OpError::Timeout)));
    // With it, acknowledged; its copy is there, yet reads do not ask it.
    up[3] = true;
    replicas[coordinator].client(2_000, 2, put(b"b"), Consistency::Quorum);
    settle(&mut replicas, &up, 2_000);
    assert!(matches!(replicas[coordinator].poll_reply().map(|r| r.result), Some(Ok(Outcome::Written(_)))));
    assert_eq!(replicas[3].record(&key).and_then(|r| r.value), Some(Bytes::from_static(b"b")));
    assert!(!replicas[3].counted_for(&key), "a pending member's copy answers no read");
    replicas[coordinator].client(2_000, 3, Op::Get { key: key.clone() }, Consistency::Quorum);
    let asked: Vec<NodeIx> =
        std::iter::from_fn(|| replicas[coordinator].poll_transmit()).map(|(to, _, _)| to).collect();
    assert!(!asked.contains(&3), "reads ask owners only: {asked:?}");
}

/// The hints held for a re-syncing member ride along with its stream's
/// first part only as far as one part holds: a part never outgrows the
/// transport's frame, however many hints wait (the rest arrive by hinted
/// hand-off).
#[test]
fn a_streams_first_part_carries_at_most_a_part_of_hints() {
    let config = ReplicaConfig { rf: 3, ..ReplicaConfig::default() };
    let mut replica = Replica::new(0, 3, ring(3), config, 11);
    for i in 0..1_000u64 {
        let record = Record {
            version: Version { counter: i + 1, node: 1 },
            value: Some(Bytes::from(vec![9u8; 1_024])),
            expires_at: None,
            hint: 0,
        };
        let put = Message::Put { req: 0, key: Bytes::from(format!("h{i}")), record, hint_for: Some(2) };
        replica.handle(0, 1, 1, put).expect("an honest hint");
    }
    assert_eq!(replica.hints_held(), 1_000);
    while replica.poll_transmit().is_some() {}
    replica.handle(1, 2, 1, Message::SyncRequest { round: 1, cursor: Bytes::new() }).expect("well formed");
    let first = std::iter::from_fn(|| replica.poll_transmit()).find_map(|(to, _, m)| match m {
        Message::SyncData { entries, .. } if to == 2 => Some(entries),
        _ => None,
    });
    let entries = first.expect("a first part");
    let bytes: usize = entries.iter().map(|(k, r)| k.len() + r.value.as_ref().map_or(0, Bytes::len)).sum();
    assert!(bytes <= SYNC_PART_BYTES + 2_048, "{bytes} bytes in one part");
    assert!(entries.len() < 1_000, "not every hint at once");
    assert_eq!(replica.hints_held(), 1_000, "hints stay until delivered");
}
