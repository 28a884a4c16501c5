//! Replays a decompressed trace CSV (`timestamp,key,size`, as in
//! `shared/traces/csv/`) through W-TinyLFU natively, count-based, at the
//! standard sweep of cache sizes, and prints the miss ratios.
//!
//! ```text
//! cargo run --release -p cachet-policy-wtinylfu --example replay -- TRACE.csv [--lcs-hash|--model] [--window R] [--fractions 0.01,0.1]
//! ```
//!
//! Keys are hashed as `cachet sim` hashes them (XXH3 of the key's 8
//! little-endian bytes), sizes are `floor(f × distinct keys)` skipping sizes
//! of 4 or fewer, and the miss ratio counts cold misses, as the host does.
//! `--lcs-hash` instead probes the sketch with the reference simulator's
//! hash (XXH64 of the object id, seeds 0x12345678 and 0x12344321, low 32
//! bits), which no deployed policy can see; it shows how much of the
//! remaining difference is the sketch's collisions. `--model` also runs an
//! unbounded model, written here, of the reference's semantics (with its
//! hash) next to the policy, to tell policy bugs from reference quirks.

use cachet_policy_sdk::testing::{Harness, entries};
use cachet_policy_sdk::{Config, Policy};
use cachet_policy_wtinylfu::{SketchHash, WTinyLfu, WTinyLfuWith};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};

/// The reference simulator's sketch probes; the "key hash" it is given is
/// the raw object id.
struct ReferenceHash;

impl SketchHash for ReferenceHash {
    fn bases(key: u64) -> (u32, u32) {
        let bytes = key.to_le_bytes();
        (xxhash_rust::xxh64::xxh64(&bytes, 0x1234_5678) as u32, xxhash_rust::xxh64::xxh64(&bytes, 0x1234_4321) as u32)
    }
}

const SWEEP: [f64; 8] = [0.001, 0.003, 0.01, 0.03, 0.1, 0.2, 0.4, 0.8];

fn misses<P: Policy>(keys: &[u64], size: u64, config: &Config) -> u64 {
    let mut h = Harness::<P>::with_config(entries(size), 0, config).expect("config");
    keys.iter().filter(|&&k| !h.request(k, 1)).count() as u64
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let path = args.first().expect("usage: replay TRACE.csv [--lcs-hash|--model] [--window R] [--fractions F,..]");
    let model = args.iter().any(|a| a == "--model");
    let lcs = model || args.iter().any(|a| a == "--lcs-hash");
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1));
    let mut pairs = Vec::new();
    if let Some(r) = flag("--window") {
        pairs.push(("window-ratio".to_string(), r.clone()));
    }
    let config = Config::new(pairs);
    let fractions: Vec<f64> = flag("--fractions")
        .map(|f| f.split(',').map(|x| x.parse().expect("fraction")).collect())
        .unwrap_or_else(|| SWEEP.to_vec());

    let file = std::fs::File::open(path).expect("open trace");
    let mut raw = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.expect("read");
        if i == 0 {
            assert_eq!(line, "timestamp,key,size", "header");
            continue;
        }
        let key: u64 = line.split(',').nth(1).expect("key field").parse().expect("key");
        raw.push(key);
    }
    let distinct = raw.iter().collect::<HashSet<_>>().len() as u64;
    let keys: Vec<u64> =
        if lcs { raw } else { raw.iter().map(|k| xxhash_rust::xxh3::xxh3_64(&k.to_le_bytes())).collect() };
    println!("{path}: {} requests, {distinct} distinct, hash {}", keys.len(), if lcs { "reference" } else { "cachet" });
    for f in fractions {
        let size = (f * distinct as f64).floor() as u64;
        if size <= 4 {
            continue;
        }
        if model {
            let mut mm = Model::new(size, flag("--window").map_or(0.01, |r| r.parse().expect("ratio")));
            let mmiss = keys.iter().filter(|&&k| !mm.request(k)).count();
            println!("model\t{size}\t{:.4}", mmiss as f64 / keys.len() as f64);
        }
        let m = if lcs {
            misses::<WTinyLfuWith<ReferenceHash>>(&keys, size, &config)
        } else {
            misses::<WTinyLfu>(&keys, size, &config)
        };
        println!("{f}\t{size}\t{:.4}", m as f64 / keys.len() as f64);
    }
}

/// A recency list over raw keys (front = least recent), for the model.
#[derive(Default)]
struct Lru {
    links: std::collections::HashMap<u64, (Option<u64>, Option<u64>)>,
    head: Option<u64>,
    tail: Option<u64>,
}

impl Lru {
    fn len(&self) -> u64 {
        self.links.len() as u64
    }
    fn contains(&self, k: u64) -> bool {
        self.links.contains_key(&k)
    }
    fn front(&self) -> Option<u64> {
        self.head
    }
    fn push_back(&mut self, k: u64) {
        self.links.insert(k, (self.tail, None));
        match self.tail {
            Some(t) => self.links.get_mut(&t).expect("tail").1 = Some(k),
            None => self.head = Some(k),
        }
        self.tail = Some(k);
    }
    fn remove(&mut self, k: u64) -> bool {
        let Some((p, n)) = self.links.remove(&k) else { return false };
        match p {
            Some(p) => self.links.get_mut(&p).expect("prev").1 = n,
            None => self.head = n,
        }
        match n {
            Some(n) => self.links.get_mut(&n).expect("next").0 = p,
            None => self.tail = p,
        }
        true
    }
}

/// A direct, unbounded transcription of the reference's W-TinyLFU semantics
/// (count-based), used to tell policy bugs from reference quirks.
struct Model {
    c: u64,
    m: u64,
    p: u64,
    q: u64,
    window: Lru,
    prob: Lru,
    prot: Lru,
    cbf: Vec<u32>,
    k: u32,
    counter: u64,
}

impl Model {
    fn new(c: u64, ratio: f64) -> Self {
        let w = (c as f64 * ratio) as u64;
        let m = c - w;
        let bpe = -(0.001f64.ln()) / 0.480_453_013_918_201;
        let k = (std::f64::consts::LN_2 * bpe).ceil() as u32;
        let n = ((bpe * m as f64).ceil() as usize).max(2 * k as usize);
        Self {
            c,
            m,
            p: (0.2 * m as f64) as u64,
            q: (0.8 * m as f64) as u64,
            window: Lru::default(),
            prob: Lru::default(),
            prot: Lru::default(),
            cbf: vec![0; n],
            k,
            counter: 0,
        }
    }
    fn pos(&self, key: u64) -> Vec<usize> {
        let (a, b) = ReferenceHash::bases(key);
        let n = self.cbf.len() as u32;
        (0..self.k).map(|i| (a.wrapping_add(i.wrapping_mul(b)) % n) as usize).collect()
    }
    fn est(&self, key: u64) -> u32 {
        self.pos(key).into_iter().map(|i| self.cbf[i]).min().unwrap_or(0)
    }
    fn add(&mut self, key: u64) {
        for i in self.pos(key) {
            self.cbf[i] += 1;
        }
    }
    fn main_n(&self) -> u64 {
        self.prob.len() + self.prot.len()
    }
    fn main_victim(&self) -> Option<u64> {
        self.prob.front().or(self.prot.front())
    }
    fn main_evict(&mut self) {
        if let Some(v) = self.main_victim() {
            let _ = self.prob.remove(v) || self.prot.remove(v);
        }
    }
    fn main_insert(&mut self, key: u64) {
        if self.prob.len() < self.p {
            self.prob.push_back(key);
        } else if self.prot.len() < self.q {
            self.prot.push_back(key);
        } else {
            while self.main_n() + 1 > self.m {
                self.main_evict();
            }
            self.prob.push_back(key);
        }
    }
    fn evict(&mut self) {
        loop {
            let Some(cand) = self.window.front() else {
                self.main_evict();
                return;
            };
            let done = if self.main_n() < self.m {
                self.window.remove(cand);
                self.main_insert(cand);
                false
            } else {
                let v = self.main_victim().expect("victim");
                if self.est(cand) > self.est(v) {
                    self.main_evict();
                    self.window.remove(cand);
                    self.main_insert(cand);
                    // The reference's loop goes on after a win.
                    false
                } else {
                    self.window.remove(cand);
                    true
                }
            };
            self.add(cand);
            if done {
                return;
            }
        }
    }
    fn request(&mut self, key: u64) -> bool {
        if self.window.contains(key) {
            self.window.remove(key);
            self.window.push_back(key);
            return true;
        }
        if self.prob.contains(key) || self.prot.contains(key) {
            self.add(key);
            self.counter += 1;
            if self.counter >= 32 * self.m {
                self.counter = 0;
                for c in &mut self.cbf {
                    *c >>= 1;
                }
            }
            if self.prot.remove(key) {
                self.prot.push_back(key);
            } else {
                self.prob.remove(key);
                self.prot.push_back(key);
                while self.prot.len() > self.q {
                    let d = self.prot.front().expect("prot");
                    self.prot.remove(d);
                    self.prob.push_back(d);
                    while self.prob.len() > self.p {
                        self.main_evict();
                    }
                }
            }
            return true;
        }
        while self.window.len() + self.main_n() + 1 > self.c {
            self.evict();
        }
        self.window.push_back(key);
        self.add(key);
        false
    }
}
