//! Read-through loaders against a real PostgreSQL (started by `cargo xtask
//! test` or `.ci/run`, reached through `CACHET_PG`), over real QUIC.
//!
//! Each test gets a database of its own, so tests run in parallel and
//! PostgreSQL's `pg_stat_statements` counts each test's origin queries
//! separately.

use bytes::Bytes;
use cachet::loader::{LoaderConfig, LoaderModuleError, Loaders, LoadersError};
use cachet::node::{Clock, ManualClock, Node, NodeConfig, NodeOptions, Running};
use cachet::policies::{self, PolicySpec};
use cachet::server::{ServeOptions, tls::TlsSource};
use cachet::wasm::PolicyEngine;
use cachet_client::{Client, ClientConfig, ClientError, ErrorCode};
use cachet_tests::{TempDir, hostile_component, hostile_loader_component, users_loader_component};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

fn pg_url() -> String {
    std::env::var("CACHET_PG").expect(
        "CACHET_PG is not set: the loader tests need a PostgreSQL server; \
         run them through `cargo xtask test` (which starts one) or set CACHET_PG",
    )
}

/// A database of its own for one test, and a client on it.
struct Database {
    name: String,
    client: tokio_postgres::Client,
}

impl Database {
    async fn create(tag: &str) -> Self {
        let name = format!("cachet_{tag}_{}", std::process::id());
        let admin = connect(&pg_url()).await;
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name}")).await.expect("drop");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create database");
        let client = connect(&format!("{} dbname={name}", pg_url())).await;
        client.batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements").await.expect("pg_stat_statements");
        Self { name, client }
    }

    fn url(&self) -> String {
        format!("{} dbname={}", pg_url(), self.name)
    }

    /// The `users` table the example loader reads, as a view over
    /// `users_data` that takes `delay` seconds per query (a slow database).
    async fn users(&self, delay: &str) {
        let sql = format!(
            "CREATE TABLE users_data (id bigint PRIMARY KEY, name text NOT NULL, email text NOT NULL);
             INSERT INTO users_data VALUES (1, 'v0', 'ada@example.org'), (2, 'Grace', 'grace@example.org');
             CREATE VIEW users AS SELECT u.id, u.name, u.email FROM users_data u, pg_sleep({delay}) s;"
        );
        self.client.batch_execute(&sql).await.expect("users");
    }

    async fn rename(&self, id: i64, name: &str) {
        self.client.execute("UPDATE users_data SET name = $2 WHERE id = $1", &[&id, &name]).await.expect("update");
    }

    /// Executions of the example loader's query in this database, as
    /// PostgreSQL counted them.
    async fn loader_queries(&self) -> i64 {
        loader_queries(&self.client).await
    }
}

/// [`Database::loader_queries`] on any connection to the database.
async fn loader_queries(client: &tokio_postgres::Client) -> i64 {
    let row = client
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements
             WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
               AND query LIKE '%FROM users WHERE id%'",
            &[],
        )
        .await
        .expect("pg_stat_statements");
    row.get(0)
}

async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, connection) =
        tokio_postgres::connect(url, tokio_postgres::NoTls).await.expect("connects to PostgreSQL");
    tokio::spawn(connection);
    client
}

/// A node with loaders, served over QUIC, on a clock the test moves.
struct LoaderNode {
    node: Arc<Node>,
    clock: Arc<ManualClock>,
    running: Option<Running>,
    dir: TempDir,
}

impl Drop for LoaderNode {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown();
        }
    }
}

impl LoaderNode {
    /// `namespaces` is the `[[namespace]]` TOML, with `{users}` and
    /// `{hostile}` standing for the module paths; `origins` the origins.
    fn start(origins: &str, namespaces: &str) -> Self {
        Self::start_on(2, origins, namespaces)
    }

    /// [`Self::start`] with `threads` I/O threads.
    fn start_on(threads: usize, origins: &str, namespaces: &str) -> Self {
        let dir = TempDir::new("loaders");
        let users = dir.0.join("users.wasm");
        let hostile = dir.0.join("hostile.wasm");
        std::fs::write(&users, users_loader_component()).expect("write");
        std::fs::write(&hostile, hostile_loader_component()).expect("write");
        let text = format!("seed = 11\n{origins}\n{namespaces}")
            .replace("{users}", &users.to_string_lossy())
            .replace("{hostile}", &hostile.to_string_lossy());
        let path = dir.0.join("loaders.toml");
        std::fs::write(&path, text).expect("write");
        let loaders = LoaderConfig::load(&path).expect("valid loader config");
        let engine = PolicyEngine::new().expect("engine");
        let policy = policies::resolve(&engine, &PolicySpec { name_or_path: "lru".into(), ..PolicySpec::default() })
            .expect("policy");
        let clock = Arc::new(ManualClock::default());
        clock.advance(1_000);
        let config = NodeConfig { shards: 2, max_value_size: 64 << 10, ..NodeConfig::default() };
        let mut options = NodeOptions::new(config, policy);
        options.clock = Some(clock.clone() as Arc<dyn Clock>);
        options.loaders = Some(loaders);
        options.quic = Some(ServeOptions {
            listen: "127.0.0.1:0".parse().expect("addr"),
            threads,
            tls: TlsSource::DevCa { data_dir: dir.0.clone() },
            max_connections: 100,
            max_streams: 64,
            max_frame: (64 << 10) + 1024,
            idle_timeout: Duration::from_secs(60),
            clients: Default::default(),
        });
        let running = Node::start(options).expect("node starts");
        Self { node: running.node().clone(), clock, running: Some(running), dir }
    }

    async fn client(&self) -> Client {
        let addr = self.running.as_ref().and_then(Running::quic_addr).expect("running");
        let mut config = ClientConfig::new(addr).with_data_dir(&self.dir.0).expect("ca");
        config.timeout = Duration::from_secs(20);
        Client::connect(config).await.expect("connects")
    }

    fn counter(&self, pick: impl Fn(&cachet::loader::LoaderCounters) -> &std::sync::atomic::AtomicU64) -> u64 {
        pick(self.node.loaders().expect("loaders").counters()).load(Ordering::SeqCst)
    }

    /// Waits (bounded) until no load or refresh is running.
    async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.node.loaders().expect("loaders").in_flight() > 0 {
            assert!(Instant::now() < deadline, "loads did not finish");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A node whose `user:` namespace loads through the example loader from
/// `db`; `extra` is more namespace settings (TOML lines).
fn users_node(db: &Database, extra: &str) -> LoaderNode {
    let namespace = "[[namespace]]\nprefix = \"user:\"\nmodule = \"{users}\"\norigins = [\"users-db\"]";
    LoaderNode::start(&users_origin(db), &format!("{namespace}{extra}"))
}

fn users_origin(db: &Database) -> String {
    format!("[origins.users-db]\npostgres = \"{}\"\nstatement-timeout-ms = 5000\n", db.url())
}

fn name_of(value: &[u8]) -> String {
    let text = std::str::from_utf8(value).expect("utf-8");
    let start = text.find("\"name\":\"").expect("name") + 8;
    text[start..].split('"').next().expect("name end").to_string()
}

fn server_code(err: &ClientError) -> ErrorCode {
    match err {
        ClientError::Server(reply) => reply.code,
        other => panic!("expected a server error, got {other}"),
    }
}

/// A load's reply that comes back after its client has gone must not reach
/// the next client. The node's QUIC endpoint reuses a closed connection's
/// handle for the next one, and a new client's first request goes on the
/// same stream with the same request id as the old client's did: without
/// the connection's serial number on the waiting reply, B would read A's
/// row as its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_that_outlives_its_client_never_answers_the_next_one() {
    let db = Database::create("late").await;
    db.users("1").await;
    // One I/O thread: A's and B's connections share one endpoint.
    let namespace = "[[namespace]]\nprefix = \"user:\"\nmodule = \"{users}\"\norigins = [\"users-db\"]";
    let node = LoaderNode::start_on(1, &users_origin(&db), namespace);
    let a = node.client().await;
    let asked = {
        let a = a.clone();
        tokio::spawn(async move { a.get("user:1").await })
    };
    // A leaves while its load (1 s) runs; its connection drains.
    tokio::time::sleep(Duration::from_millis(200)).await;
    a.close().await;
    assert!(asked.await.expect("task").is_err(), "A's request ends with its connection");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let b = node.client().await;
    let value = b.get("user:2").await.expect("B's load").expect("row 2 exists");
    assert_eq!(name_of(&value), "Grace", "B got its own row, not A's late one");
    assert_eq!(node.counter(|c| &c.loads), 2, "both loads ran");
}

/// 10,000 concurrent GETs of one cold key make exactly one query, counted
/// by PostgreSQL itself; everyone gets the row. The load takes 2 s, so
/// the GETs really overlap it even on a busy machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_concurrent_misses_make_one_query() {
    let db = Database::create("flight").await;
    db.users("2").await;
    let node = users_node(&db, "\nload-timeout-ms = 10000");
    let client = Arc::new(node.client().await);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..10_000 {
        let client = client.clone();
        tasks.spawn(async move { client.get("user:1").await });
    }
    let mut served = 0;
    while let Some(result) = tasks.join_next().await {
        let value = result.expect("task").expect("GET succeeds").expect("the row");
        assert_eq!(value, Bytes::from_static(br#"{"id":1,"name":"v0","email":"ada@example.org"}"#));
        served += 1;
    }
    assert_eq!(served, 10_000);
    assert_eq!(db.loader_queries().await, 1, "PostgreSQL saw more than one load query");
    assert_eq!(node.counter(|c| &c.loads), 1);
    // Most GETs really were concurrent with the load (else the test proves
    // nothing about single flight): they joined it rather than hitting.
    let joined = node.counter(|c| &c.coalesced);
    assert!(joined >= 5_000, "only {joined} GETs waited on the flight");
}

/// Missing rows are cached negatively; bad keys and other namespaces behave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_found_is_cached_and_bad_keys_are_refused() {
    let db = Database::create("negative").await;
    db.users("0").await;
    let node = users_node(&db, "\nnegative-ttl-ms = 5000");
    let client = node.client().await;
    assert_eq!(client.get("user:404").await.expect("get"), None);
    assert_eq!(client.get("user:404").await.expect("get"), None);
    assert_eq!(db.loader_queries().await, 1, "the second miss came from the negative cache");
    assert_eq!(node.counter(|c| &c.negative_hits), 1);
    node.clock.advance(5_001);
    assert_eq!(client.get("user:404").await.expect("get"), None);
    assert_eq!(db.loader_queries().await, 2, "the negative entry expired");
    // The row appears; a write-side DEL forgets the negative answer at once.
    db.client.batch_execute("INSERT INTO users_data VALUES (404, 'Late', 'late@example.org')").await.expect("insert");
    client.delete(&["user:404"]).await.expect("del");
    let value = client.get("user:404").await.expect("get").expect("now found");
    assert_eq!(name_of(&value), "Late");

    let err = client.get("user:abc").await.expect_err("not a number");
    assert_eq!(server_code(&err), ErrorCode::LoadFailed);
    assert!(err.to_string().contains("user:<number>"), "{err}");
    // Keys outside every namespace are a plain cache.
    assert_eq!(client.get("other:1").await.expect("get"), None);
    client.set("other:1", "x").await.expect("set");
    assert_eq!(client.get("other:1").await.expect("get"), Some(Bytes::from_static(b"x")));
}

/// 1,000 randomized races between a load and an update + DEL: the cache
/// never keeps the value read before the invalidation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loads_racing_invalidations_never_install_stale_values() {
    let db = Database::create("races").await;
    db.users("random() * 0.004").await;
    let node = users_node(&db, "");
    let client = Arc::new(node.client().await);
    let mut state = 0x5eed_u64;
    for i in 1..=1_000u32 {
        // The last round's check cached the row: forget it, so the racing
        // GET really loads (a hit races nothing).
        client.delete(&["user:1"]).await.expect("del");
        let reader = client.clone();
        let load = tokio::spawn(async move { reader.get("user:1").await });
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        tokio::time::sleep(Duration::from_micros(state % 4_000)).await;
        let name = format!("v{i}");
        db.rename(1, &name).await;
        client.delete(&["user:1"]).await.expect("del");
        load.await.expect("task").expect("racing GET succeeds");
        let now = client.get("user:1").await.expect("get").expect("row");
        assert_eq!(name_of(&now), name, "round {i}: a stale value was installed");
    }
    let breaks = node.counter(|c| &c.lease_breaks);
    assert!(breaks > 0, "no load ever raced an invalidation; the test proved nothing");
    eprintln!("lease breaks in 1000 rounds: {breaks}");
}

/// An UPDATE's NOTIFY (change data capture) invalidates the key without
/// any client DEL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_from_postgres_invalidate() {
    let db = Database::create("cdc").await;
    db.users("0").await;
    db.client
        .batch_execute(
            "CREATE FUNCTION users_changed() RETURNS trigger AS $$
             BEGIN PERFORM pg_notify('users_changed', NEW.id::text); RETURN NEW; END $$ LANGUAGE plpgsql;
             CREATE TRIGGER users_changed AFTER UPDATE ON users_data FOR EACH ROW EXECUTE FUNCTION users_changed();",
        )
        .await
        .expect("trigger");
    let node = users_node(
        &db,
        "\n\
         invalidate = { origin = \"users-db\", channel = \"users_changed\" }",
    );
    let client = node.client().await;
    // The feed connects in the background; wait until it is listening.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = db
            .client
            .query_one("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'LISTEN%'", &[])
            .await
            .expect("activity")
            .get(0);
        if listening > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the invalidation feed never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v0");
    assert_eq!(name_of(&client.get("user:2").await.expect("get").expect("row")), "Grace");
    db.rename(1, "v1").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let name = name_of(&client.get("user:1").await.expect("get").expect("row"));
        if name == "v1" {
            break;
        }
        assert_eq!(name, "v0");
        assert!(Instant::now() < deadline, "the notification never invalidated user:1");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(node.counter(|c| &c.invalidations) >= 1);
    // Only the changed key was reloaded.
    assert_eq!(db.loader_queries().await, 3);
}

/// Inside the grace window the old value is served while exactly one
/// background refresh runs (it takes 1.5 s, longer than the 200 GETs);
/// then the new value is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_while_revalidate_serves_old_values_with_one_refresh() {
    let db = Database::create("swr").await;
    db.users("1.5").await;
    let node = users_node(
        &db,
        "\n\
         ttl-ms = 1000\ngrace-ms = 10000\nxfetch-beta = 0.0",
    );
    let client = Arc::new(node.client().await);
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v0");
    db.rename(1, "v1").await;
    node.clock.advance(2_000); // past the soft expiry, inside the grace window
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..200 {
        let client = client.clone();
        tasks.spawn(async move { client.get("user:1").await });
    }
    while let Some(result) = tasks.join_next().await {
        let value = result.expect("task").expect("get").expect("stale value served");
        assert_eq!(name_of(&value), "v0", "inside the grace window the old value is served at once");
    }
    node.settle().await;
    assert_eq!(node.counter(|c| &c.refreshes), 1, "exactly one background refresh");
    assert_eq!(db.loader_queries().await, 2, "one load and one refresh reached PostgreSQL");
    assert!(node.counter(|c| &c.stale_served) >= 200);
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v1");
    // Past the grace window too, a value is gone and is loaded afresh.
    db.rename(1, "v2").await;
    node.clock.advance(20_000);
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v2");
}

/// XFetch: far from expiry no GET refreshes; just before it, one does, and
/// before the value expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_refresh_happens_just_before_expiry() {
    let db = Database::create("xfetch").await;
    db.users("0.2").await;
    let node = users_node(
        &db,
        "\n\
         ttl-ms = 60000\nxfetch-beta = 1.0",
    );
    let client = node.client().await;
    client.get("user:1").await.expect("get").expect("row"); // loads; the load time (~200 ms) is recorded
    node.clock.advance(30_000); // 30 s left: exp(-30000/200) ~ 0
    for _ in 0..100 {
        client.get("user:1").await.expect("get").expect("row");
    }
    assert_eq!(node.counter(|c| &c.early_refreshes), 0, "refreshed far too early");
    db.rename(1, "v1").await;
    node.clock.advance(29_990); // 10 ms left: each GET refreshes with p ~ 0.95
    for _ in 0..20 {
        client.get("user:1").await.expect("get").expect("row");
    }
    node.settle().await;
    assert_eq!(node.counter(|c| &c.early_refreshes), 1, "one early refresh (others joined it)");
    // Refreshed before expiry: the clock has not reached it, yet v1 is served.
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v1");
}

/// Misbehaving loaders and origins: each GET gets a typed error within its
/// deadline, nothing is stored, and the node keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_loaders_and_failing_origins_get_typed_errors() {
    let db = Database::create("hostile").await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    // `rows` has room to reach the row limit however loaded the machine
    // (under `db`'s 300 ms a slow run timed out first).
    let origins = format!(
        "[origins.db]\npostgres = \"{url}\"\nstatement-timeout-ms = 300\n\
         [origins.rows]\npostgres = \"{url}\"\nstatement-timeout-ms = 3500\n\
         [origins.down]\npostgres = \"host=127.0.0.1 port={closed} user=postgres\"\nconnect-timeout-ms = 300\n",
        url = db.url()
    );
    let node = LoaderNode::start(
        &origins,
        "[[namespace]]\nprefix = \"h:\"\nmodule = \"{hostile}\"\norigins = [\"db\", \"rows\", \"down\"]\n\
         fuel-per-call = 50000000\nmax-memory-bytes = 8388608\nload-timeout-ms = 4000",
    );
    let client = node.client().await;
    client.set("keep", "me").await.expect("set");
    let cases: [(&str, ErrorCode, &str); 9] = [
        ("h:loop", ErrorCode::LoadFailed, "budget"),
        ("h:trap", ErrorCode::LoadFailed, "trapped"),
        ("h:grow", ErrorCode::LoadFailed, "memory"),
        ("h:huge", ErrorCode::LoadFailed, "limited to"),
        ("h:forbidden", ErrorCode::OriginFailed, "not allowed"),
        ("h:sql:db:SELECT pg_sleep(3)::text", ErrorCode::OriginFailed, "timed out"),
        ("h:sql:db:SELECT (1/0)::text", ErrorCode::OriginFailed, "division by zero"),
        ("h:sql:down:SELECT 1::text", ErrorCode::OriginFailed, "unavailable"),
        (
            "h:sql:rows:SELECT g::text FROM generate_series(1, 2000000) g",
            ErrorCode::OriginFailed,
            "more than 10000 rows",
        ),
    ];
    for (key, code, words) in cases {
        let started = Instant::now();
        let err = client.get(key).await.expect_err(key);
        assert_eq!(server_code(&err), code, "{key}: {err}");
        assert!(err.to_string().contains(words), "{key}: {err}");
        assert!(started.elapsed() < Duration::from_secs(6), "{key} took {:?}", started.elapsed());
        assert_eq!(client.exists(&[key]).await.expect("exists"), 0, "{key} stored something");
    }
    // A good load still works, and stored data is untouched.
    assert_eq!(client.get("h:echo:fine").await.expect("get"), Some(Bytes::from_static(b"fine")));
    assert_eq!(client.get("h:sql:db:SELECT 'row'::text").await.expect("get"), Some(Bytes::from_static(b"row")));
    assert_eq!(client.get("keep").await.expect("get"), Some(Bytes::from_static(b"me")));
    assert!(node.counter(|c| &c.failures) >= 9);
}

/// Modules that are not loaders are refused with an error naming why.
#[test]
fn invalid_loader_modules_are_refused() {
    let dir = TempDir::new("bad-loaders");
    let cases: [(&str, &[u8], &str); 2] =
        [("garbage", b"\0asm garbage", "not a loader component"), ("policy", hostile_component(), "wrong interface")];
    for (name, bytes, expected) in cases {
        let module = dir.0.join(format!("{name}.wasm"));
        std::fs::write(&module, bytes).expect("write");
        let config = LoaderConfig {
            namespaces: vec![cachet::loader::NamespaceConfig {
                prefix: "x:".into(),
                module,
                origins: vec![],
                ttl_ms: 1000,
                grace_ms: 0,
                jitter: 0.0,
                xfetch_beta: 1.0,
                negative_ttl_ms: 0,
                load_timeout_ms: 1000,
                fuel_per_call: 1_000_000,
                max_memory_bytes: 1 << 20,
                invalidate: None,
                write: cachet::loader::config::WriteMode::None,
                write_queue: 1,
                write_attempts: 1,
                read_only: false,
            }],
            ..LoaderConfig::default()
        };
        let Err(err) = Loaders::new(&config) else { panic!("{name} was accepted") };
        assert!(
            matches!(
                err,
                LoadersError::Invalid {
                    source: LoaderModuleError::NotAComponent(_) | LoaderModuleError::WrongInterface(_),
                    ..
                }
            ),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(expected), "{name}: {err}");
    }
}

/// The Redis-protocol port loads too, answering pipelined commands in
/// order, and turns loader failures into Redis errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_clients_load_through_the_resp_port() {
    let node =
        LoaderNode::start("", "[[namespace]]\nprefix = \"h:\"\nmodule = \"{hostile}\"\nfuel-per-call = 50000000");
    let options = cachet::resp::RespOptions {
        max_connections: 10,
        ..cachet::resp::RespOptions::new("127.0.0.1:0".parse().expect("addr"))
    };
    let resp = cachet::resp::start(node.node.clone(), options).expect("RESP port");
    let url = format!("redis://{}/", resp.local_addr());
    let replies = tokio::task::spawn_blocking(move || {
        let client = redis::Client::open(url).expect("url");
        let mut con = client.get_connection().expect("connects");
        let (a, b, c): (Option<String>, Option<String>, Option<String>) = redis::pipe()
            .cmd("GET")
            .arg("h:echo:one")
            .cmd("GET")
            .arg("plain")
            .cmd("GET")
            .arg("h:none:x")
            .query(&mut con)
            .expect("pipeline");
        let failed: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("h:trap").query(&mut con);
        let again: Option<String> = redis::cmd("GET").arg("h:echo:one").query(&mut con).expect("get");
        (a, b, c, failed.map_err(|e| e.to_string()), again)
    })
    .await
    .expect("client thread");
    resp.shutdown();
    assert_eq!(replies.0.as_deref(), Some("one"));
    assert_eq!(replies.1, None);
    assert_eq!(replies.2, None);
    let err = replies.3.expect_err("a trapping loader is an error");
    assert!(err.contains("trapped"), "{err}");
    assert_eq!(replies.4.as_deref(), Some("one"));
    assert_eq!(node.counter(|c| &c.loads), 3, "the second GET of h:echo:one was a hit");
    // The same counts reach the metrics endpoint's text.
    let text = cachet::metrics::endpoint::render(&node.node);
    assert!(text.contains("cachet_loader_events_total{kind=\"load\"} 3"), "{text}");
    assert!(text.contains("cachet_loader_events_total{kind=\"failure\"} 1"), "{text}");
}

fn kv_namespaces(write: &str) -> String {
    format!(
        "[[namespace]]\nprefix = \"h:kv:\"\nmodule = \"{{hostile}}\"\norigins = [\"db\"]\nwrite = \"{write}\"\n\
         [[namespace]]\nprefix = \"h:slowkv:\"\nmodule = \"{{hostile}}\"\norigins = [\"db\"]\nwrite = \"{write}\"\n\
         write-queue = 5\n\
         [[namespace]]\nprefix = \"h:down:\"\nmodule = \"{{hostile}}\"\norigins = [\"down\"]\nwrite = \"{write}\"\n\
         write-attempts = 2\nload-timeout-ms = 1000\n"
    )
}

fn kv_origins(db: &Database) -> String {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    format!(
        "[origins.db]\npostgres = \"{}\"\n[origins.down]\npostgres = \"host=127.0.0.1 port={closed} user=postgres\"\n\
         connect-timeout-ms = 200\n",
        db.url()
    )
}

async fn row(db: &Database, k: &str) -> Option<String> {
    db.client.query_opt("SELECT v FROM kv WHERE k = $1", &[&k]).await.expect("select").map(|r| r.get(0))
}

/// Write-through: the origin has the value before the client hears OK; a
/// failed store changes nothing; other writes to such keys are refused; a
/// load racing a write never overwrites the written value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_stores_before_answering() {
    let db = Database::create("through").await;
    db.client.batch_execute("CREATE TABLE kv (k text PRIMARY KEY, v text NOT NULL)").await.expect("kv");
    let node = LoaderNode::start(&kv_origins(&db), &kv_namespaces("through"));
    let client = Arc::new(node.client().await);

    client.set("h:kv:a", "1").await.expect("set");
    assert_eq!(row(&db, "a").await.as_deref(), Some("1"), "stored before the reply");
    assert_eq!(client.get("h:kv:a").await.expect("get"), Some(Bytes::from_static(b"1")));
    assert_eq!(node.counter(|c| &c.loads), 0, "the written value was cached, no load needed");
    assert_eq!(client.delete(&["h:kv:a"]).await.expect("del"), 1);
    assert_eq!(row(&db, "a").await, None, "deleted at the origin");
    assert_eq!(client.get("h:kv:a").await.expect("get"), None);

    // A store that fails (origin down): an error, and the cache unchanged.
    let err = client.set("h:down:x", "1").await.expect_err("origin down");
    assert_eq!(server_code(&err), ErrorCode::OriginFailed, "{err}");
    assert_eq!(client.exists(&["h:down:x"]).await.expect("exists"), 0);

    // Writes that cannot go through the loader are refused, naming why.
    for err in [
        client.incr("h:kv:n", 1).await.map(|_| ()).expect_err("incr"),
        client.mset(vec![(Bytes::from_static(b"h:kv:m"), Bytes::from_static(b"1"))]).await.expect_err("mset"),
        client.delete(&["h:kv:p", "h:kv:q"]).await.map(|_| ()).expect_err("two keys"),
    ] {
        assert!(matches!(server_code(&err), ErrorCode::NotAllowed | ErrorCode::InvalidArgument), "{err}");
    }
    assert_eq!(row(&db, "n").await, None);

    // The Redis-protocol port writes through the same way.
    let options = cachet::resp::RespOptions {
        max_connections: 10,
        ..cachet::resp::RespOptions::new("127.0.0.1:0".parse().expect("addr"))
    };
    let resp = cachet::resp::start(node.node.clone(), options).expect("RESP port");
    let url = format!("redis://{}/", resp.local_addr());
    let replies = tokio::task::spawn_blocking(move || {
        let mut con = redis::Client::open(url).expect("url").get_connection().expect("connects");
        let set: redis::RedisResult<String> =
            redis::cmd("SET").arg("h:kv:resp").arg("r1").arg("EX").arg(60).query(&mut con);
        let append: redis::RedisResult<i64> = redis::cmd("APPEND").arg("h:kv:resp").arg("x").query(&mut con);
        let nx: redis::RedisResult<String> = redis::cmd("SET").arg("h:kv:resp").arg("r2").arg("NX").query(&mut con);
        let get: Option<String> = redis::cmd("GET").arg("h:kv:resp").query(&mut con).expect("get");
        (set.map_err(|e| e.to_string()), append.map_err(|e| e.to_string()), nx.map_err(|e| e.to_string()), get)
    })
    .await
    .expect("redis client");
    resp.shutdown();
    assert_eq!(replies.0.as_deref(), Ok("OK"));
    assert!(replies.1.as_ref().is_err_and(|e| e.contains("written to its origin")), "{:?}", replies.1);
    assert!(replies.2.is_err(), "SET NX is refused: {:?}", replies.2);
    assert_eq!(replies.3.as_deref(), Some("r1"));
    assert_eq!(row(&db, "resp").await.as_deref(), Some("r1"));

    // Loads racing writes: the written value always wins.
    for i in 0..200 {
        client.delete(&["h:kv:r"]).await.expect("del");
        db.client
            .execute(
                "INSERT INTO kv VALUES ('r', $1) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                &[&format!("old{i}")],
            )
            .await
            .expect("seed row");
        let reader = client.clone();
        let load = tokio::spawn(async move { reader.get("h:kv:r").await });
        let value = format!("new{i}");
        client.set("h:kv:r", value.clone()).await.expect("set");
        load.await.expect("task").expect("racing GET");
        assert_eq!(client.get("h:kv:r").await.expect("get"), Some(Bytes::from(value.clone())), "round {i}");
        assert_eq!(row(&db, "r").await, Some(value));
    }
}

/// Write-behind: answered at once, stored in order; a full queue refuses
/// (nothing changes); writes the origin never takes are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_stores_in_order_and_bounds_its_queue() {
    let db = Database::create("behind").await;
    db.client.batch_execute("CREATE TABLE kv (k text PRIMARY KEY, v text NOT NULL)").await.expect("kv");
    let node = LoaderNode::start(&kv_origins(&db), &kv_namespaces("behind"));
    let client = Arc::new(node.client().await);
    let loaders = node.node.loaders().expect("loaders");

    // 100 keys, 10 versions each, written concurrently across keys.
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..100 {
        let client = client.clone();
        tasks.spawn(async move {
            for v in 0..10 {
                client.set(format!("h:kv:{k}"), format!("{v}")).await?;
            }
            Ok::<_, ClientError>(())
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("task").expect("write-behind SETs are answered");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while loaders.write_queue_depth() > 0 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.counter(|c| &c.writes_behind_stored), 1_000);
    for k in 0..100 {
        assert_eq!(row(&db, &k.to_string()).await.as_deref(), Some("9"), "key {k} ends at its last version");
    }
    assert_eq!(loaders.write_lag().count(), 1_000);
    let text = cachet::metrics::endpoint::render(&node.node);
    assert!(text.contains("cachet_loader_events_total{kind=\"write_behind_stored\"} 1000"), "{text}");
    assert!(text.contains("cachet_write_queue_depth 0"), "{text}");

    // A slow origin fills the 5-write queue: later writes are refused and
    // change nothing; the accepted ones all land.
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..20 {
        let client = client.clone();
        tasks.spawn(async move { (k, client.set(format!("h:slowkv:{k}"), "x").await) });
    }
    let mut accepted = Vec::new();
    while let Some(done) = tasks.join_next().await {
        match done.expect("task") {
            (k, Ok(())) => accepted.push(k),
            (k, Err(err)) => {
                assert_eq!(server_code(&err), ErrorCode::Busy, "{err}");
                assert_eq!(client.exists(&[format!("h:slowkv:{k}")]).await.expect("exists"), 0);
            }
        }
    }
    assert!(accepted.len() < 20, "the queue bound never refused a write");
    assert!(node.counter(|c| &c.writes_refused) >= 1);
    let deadline = Instant::now() + Duration::from_secs(60);
    while loaders.write_queue_depth() > 0 {
        assert!(Instant::now() < deadline, "the slow queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for k in accepted {
        assert_eq!(row(&db, &k.to_string()).await.as_deref(), Some("x"));
    }

    // While a delete waits in the queue, the origin still has the row: a
    // read must not load it back.
    db.client.batch_execute("INSERT INTO kv VALUES ('d', 'old')").await.expect("row");
    assert_eq!(client.get("h:slowkv:d").await.expect("get"), Some(Bytes::from_static(b"old")));
    client.delete(&["h:slowkv:d"]).await.expect("queued delete");
    assert_eq!(client.get("h:slowkv:d").await.expect("get"), None, "the queued delete is the value");
    client.set("h:slowkv:d", "new").await.expect("queued set");
    assert_eq!(client.get("h:slowkv:d").await.expect("get"), Some(Bytes::from_static(b"new")));
    let deadline = Instant::now() + Duration::from_secs(30);
    while loaders.write_queue_depth() > 0 {
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(row(&db, "d").await.as_deref(), Some("new"));

    // The origin is down: the write is answered, retried, then dropped and
    // counted (the documented loss of write-behind).
    client.set("h:down:y", "1").await.expect("queued");
    let deadline = Instant::now() + Duration::from_secs(30);
    while node.counter(|c| &c.write_failures) == 0 {
        assert!(Instant::now() < deadline, "the failing write was never given up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Warming GETs a key list through the loader at a bounded rate: the
/// origin's query rate (counted by PostgreSQL, sampled twice a second)
/// never exceeds it, and the cache ends up holding every key. The node's
/// hot keys rank what it read most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warming_is_rate_limited_and_hot_keys_rank_reads() {
    let db = Database::create("warm").await;
    db.users("0").await;
    db.client
        .batch_execute(
            "INSERT INTO users_data SELECT g, 'user ' || g, 'u' || g || '@example.org' FROM generate_series(3, 300) g",
        )
        .await
        .expect("rows");
    let node = users_node(&db, "");
    let client = Arc::new(node.client().await);
    let mut list: Vec<Bytes> = (1..=300).map(|i| Bytes::from(format!("user:{i}"))).collect();
    list.push(Bytes::from_static(b"user:99999"));
    let rate = 200;
    let sampling = tokio::spawn({
        let db = connect(&db.url()).await;
        async move {
            let mut seen = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            for _ in 0..8 {
                tick.tick().await;
                let at = Instant::now();
                seen.push((at, loader_queries(&db).await));
            }
            seen
        }
    });
    let report = cachet::warm::warm(client.clone(), list.clone(), rate, 16, || {}).await;
    assert_eq!((report.keys, report.present, report.missing, report.failed), (301, 300, 1, 0));
    assert!(report.elapsed >= Duration::from_millis(1_450), "301 keys at 200/s took {:?}", report.elapsed);
    assert_eq!(db.loader_queries().await, 301, "one query per key");
    let seen = sampling.await.expect("sampler");
    // Between two samples (about half a second apart, measured), never
    // more queries than the rate allows, give or take a few loads whose
    // queries finished close together.
    for pair in seen.windows(2) {
        let ((t0, n0), (t1, n1)) = (pair[0], pair[1]);
        let allowed = (f64::from(rate) * (t1 - t0).as_secs_f64()).ceil() as i64 + 5;
        assert!(n1 - n0 <= allowed, "{} queries in {:?} (at most {allowed}): {seen:?}", n1 - n0, t1 - t0);
    }
    // Warm again: everything is cached, the origin sees nothing.
    let again = cachet::warm::warm(client.clone(), list, 1_000, 16, || {}).await;
    assert_eq!(again.present, 300);
    assert_eq!(db.loader_queries().await, 301, "hits and a negatively cached miss make no query");

    for (key, reads) in [("user:7", 60), ("user:8", 40)] {
        for _ in 0..reads {
            client.get(key).await.expect("get");
        }
    }
    // Hot keys are for admin callers only (the client's plain stats leave
    // them out); the node's own list is what its admin stats return.
    assert!(client.stats().await.expect("stats").hot_keys.is_empty());
    let hot = node.node.hot_keys();
    let names: Vec<String> = hot.iter().take(2).map(|h| String::from_utf8_lossy(&h.key).into_owned()).collect();
    assert_eq!(names, ["user:7", "user:8"], "{hot:?}");
    assert!(hot[0].reads >= 60);
}

/// An HTTP origin (a real `python3 -m http.server`): allow-listed base URL,
/// statuses passed to the loader, paths that would leave the base refused,
/// a dead server reported as unavailable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_origins_serve_loaders_within_their_base() {
    let site = TempDir::new("http-origin");
    std::fs::create_dir_all(site.0.join("api")).expect("dir");
    std::fs::write(site.0.join("api/a.txt"), "alpha").expect("file");
    std::fs::write(site.0.join("secret.txt"), "outside the base").expect("file");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
    let mut server = std::process::Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1", "--directory"])
        .arg(&site.0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("python3 -m http.server starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the HTTP server never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let origins = format!(
        "[origins.web]\nhttp = [\"http://127.0.0.1:{port}/api/\"]\nrequest-timeout-ms = 2000\n\
         [origins.other]\nhttp = [\"http://127.0.0.1:{port}/\"]\n"
    );
    let node =
        LoaderNode::start(&origins, "[[namespace]]\nprefix = \"h:\"\nmodule = \"{hostile}\"\norigins = [\"web\"]");
    let client = node.client().await;
    assert_eq!(client.get("h:http:web:a.txt").await.expect("get"), Some(Bytes::from_static(b"alpha")));
    assert_eq!(client.get("h:http:web:missing.txt").await.expect("get"), None, "404 is not found");
    for (key, code, words) in [
        ("h:http:web:../secret.txt", ErrorCode::OriginFailed, "climb out"),
        ("h:http:web:/secret.txt", ErrorCode::OriginFailed, "relative"),
        ("h:http:web:%2e%2e/secret.txt", ErrorCode::OriginFailed, "climb out"),
        ("h:http:other:secret.txt", ErrorCode::OriginFailed, "not allowed"),
    ] {
        let err = client.get(key).await.expect_err(key);
        assert_eq!(server_code(&err), code, "{key}: {err}");
        assert!(err.to_string().contains(words), "{key}: {err}");
    }
    let _ = server.kill();
    let _ = server.wait();
    let err = client.get("h:http:web:b.txt").await.expect_err("server gone");
    assert_eq!(server_code(&err), ErrorCode::OriginFailed);
    assert!(err.to_string().contains("unavailable"), "{err}");
    // Still cached from before the server died.
    assert_eq!(client.get("h:http:web:a.txt").await.expect("get"), Some(Bytes::from_static(b"alpha")));
}

/// A refresh that fails keeps the old value served through the grace
/// window; after it, the failure reaches the client as a typed error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_refresh_serves_the_stale_value_until_the_grace_ends() {
    let db = Database::create("stale_if_error").await;
    db.client.batch_execute("CREATE TABLE t (v text); INSERT INTO t VALUES ('kept')").await.expect("table");
    let origins = format!("[origins.db]\npostgres = \"{}\"\n", db.url());
    let node = LoaderNode::start(
        &origins,
        "[[namespace]]\nprefix = \"h:\"\nmodule = \"{hostile}\"\norigins = [\"db\"]\nttl-ms = 1000\ngrace-ms = 5000\n\
         xfetch-beta = 0.0",
    );
    let client = node.client().await;
    let key = "h:sql:db:SELECT v FROM t";
    assert_eq!(client.get(key).await.expect("get"), Some(Bytes::from_static(b"kept")));
    db.client.batch_execute("DROP TABLE t").await.expect("drop");
    node.clock.advance(2_000); // in the grace window
    for _ in 0..3 {
        assert_eq!(client.get(key).await.expect("stale value"), Some(Bytes::from_static(b"kept")));
        node.settle().await;
    }
    assert!(node.counter(|c| &c.failures) >= 1, "the refresh failed");
    node.clock.advance(5_000); // past the grace window: gone
    let err = client.get(key).await.expect_err("no value left, the load fails");
    assert_eq!(server_code(&err), ErrorCode::OriginFailed, "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");
}

/// With fuel to spare, a looping loader is still stopped at its wall-clock
/// deadline (epoch interruption), and the node goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_is_stopped_at_its_wall_clock_deadline() {
    let node = LoaderNode::start(
        "",
        "[[namespace]]\nprefix = \"h:\"\nmodule = \"{hostile}\"\nfuel-per-call = 1000000000000000\nload-timeout-ms = 300",
    );
    let client = node.client().await;
    let started = Instant::now();
    let err = client.get("h:loop").await.expect_err("stopped");
    assert_eq!(server_code(&err), ErrorCode::LoadFailed, "{err}");
    assert!(err.to_string().contains("missed its") && err.to_string().contains("ms deadline"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
    assert_eq!(client.get("h:echo:ok").await.expect("get"), Some(Bytes::from_static(b"ok")));
}

/// Whether the connections of database `db` from the node (pool or, with
/// `feed`, the change feed's LISTEN) are encrypted, as PostgreSQL sees
/// them; `None` while there is none.
async fn node_connections_encrypted(db: &Database, feed: bool) -> Option<bool> {
    let row = db
        .client
        .query_one(
            "SELECT count(*), bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
             WHERE a.application_name = 'cachet' AND a.datname = current_database()
               AND (a.query LIKE 'LISTEN%') = $1",
            &[&feed],
        )
        .await
        .expect("pg_stat_ssl");
    (row.get::<_, i64>(0) > 0).then(|| row.get(1))
}

/// Waits (bounded) until the change feed of `db` is listening.
async fn wait_for_feed(db: &Database) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while node_connections_encrypted(db, true).await.is_none() {
        assert!(Instant::now() < deadline, "the invalidation feed never listened");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Notifications sent before the change feed first connects are lost, so
/// its first LISTEN invalidates the namespace too: a value loaded before
/// then is reloaded. The feed's connection goes through a proxy that holds
/// it until the test has loaded a value and changed its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_change_feed_invalidates_on_its_first_connection() {
    let db = Database::create("cdcfirst").await;
    db.users("0").await;
    let (gate, opened) = tokio::sync::watch::channel(false);
    let upstream = {
        let url = pg_url();
        let field = |key: &str| {
            url.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key))
                .expect("CACHET_PG names host and port")
                .to_string()
        };
        format!("{}:{}", field("host="), field("port="))
    };
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let proxy_port = proxy.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            let mut opened = opened.clone();
            let upstream = upstream.clone();
            tokio::spawn(async move {
                if opened.wait_for(|open| *open).await.is_err() {
                    return;
                }
                let mut outbound = tokio::net::TcpStream::connect(upstream).await.expect("PostgreSQL");
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    let feed_url = format!("host=127.0.0.1 port={proxy_port} user=postgres dbname={}", db.name);
    let node = LoaderNode::start(
        &format!("{}[origins.feed]\npostgres = \"{feed_url}\"\nconnect-timeout-ms = 60000\n", users_origin(&db)),
        "[[namespace]]\nprefix = \"user:\"\nmodule = \"{users}\"\norigins = [\"users-db\"]\n\
         invalidate = { origin = \"feed\", channel = \"users_changed\" }",
    );
    let client = node.client().await;
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v0");
    // Changed, and announced to no one: the feed is not listening yet.
    db.rename(1, "v1").await;
    db.client.batch_execute("NOTIFY users_changed, '1'").await.expect("notify");
    assert_eq!(name_of(&client.get("user:1").await.expect("get").expect("row")), "v0", "cached");
    gate.send_replace(true);
    wait_for_feed(&db).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let name = name_of(&client.get("user:1").await.expect("get").expect("row"));
        if name == "v1" {
            break;
        }
        assert!(Instant::now() < deadline, "the feed's first connection left user:1 stale ({name})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `read-only` namespace's loads run in read-only transactions: a loader
/// that tries to DELETE, UPDATE or DROP is refused by PostgreSQL, and the
/// table is unchanged; reads still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_namespaces_cannot_write_through_their_loader() {
    let db = Database::create("readonly").await;
    db.client
        .batch_execute(
            "CREATE TABLE kv (k text PRIMARY KEY, v text NOT NULL); INSERT INTO kv VALUES ('a', '1'), ('b', '2');",
        )
        .await
        .expect("kv");
    let node = LoaderNode::start(
        &format!("[origins.db]\npostgres = \"{}\"\n", db.url()),
        "[[namespace]]\nprefix = \"h:\"\nmodule = \"{hostile}\"\norigins = [\"db\"]\nread-only = true",
    );
    let client = node.client().await;
    for key in [
        "h:sql:db:DELETE FROM kv RETURNING v",
        "h:sql:db:UPDATE kv SET v = 'x' RETURNING v",
        "h:sql:db:INSERT INTO kv VALUES ('c', '3') RETURNING v",
        "h:sql:db:DROP TABLE kv",
        "h:sql:db:COMMIT",
    ] {
        let result = client.get(key).await;
        if key.ends_with("COMMIT") {
            // Ends the read-only transaction, and with it what this call
            // could run: nothing is written.
            assert!(matches!(result, Ok(None) | Err(_)), "{key}: {result:?}");
            continue;
        }
        let err = result.expect_err(key);
        assert_eq!(server_code(&err), ErrorCode::OriginFailed, "{key}: {err}");
        assert!(err.to_string().contains("read-only transaction"), "{key}: {err}");
    }
    let rows: Vec<(String, String)> = db
        .client
        .query("SELECT k, v FROM kv ORDER BY k", &[])
        .await
        .expect("kv")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows, [("a".to_string(), "1".to_string()), ("b".to_string(), "2".to_string())]);
    assert_eq!(
        client.get("h:sql:db:SELECT v FROM kv WHERE k = 'b'").await.expect("a read"),
        Some(Bytes::from_static(b"2"))
    );
}

/// The CA of the test PostgreSQL's certificate (`cargo xtask test` makes
/// one and sets `CACHET_PG_CA`).
fn pg_ca() -> String {
    std::env::var("CACHET_PG_CA").expect(
        "CACHET_PG_CA is not set: the TLS loader tests need the CA of the PostgreSQL server's certificate; \
         run them through `cargo xtask test` (or `cargo xtask postgres`)",
    )
}

/// `sslmode=require` and `verify-full` encrypt the origin's connections and
/// the change feed's (PostgreSQL's pg_stat_ssl says so); no sslmode stays
/// plaintext; `verify-full` against another CA is refused with a typed
/// TLS error, before any query is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_origins_and_feeds_use_tls_when_asked() {
    let db = Database::create("tls").await;
    db.users("0").await;
    // Plaintext, as before, when the connection string says nothing.
    let plain = users_node(&db, "");
    assert_eq!(name_of(&plain.client().await.get("user:1").await.expect("get").expect("row")), "v0");
    assert_eq!(node_connections_encrypted(&db, false).await, Some(false));
    // The node's own development CA: a valid CA, but not PostgreSQL's.
    let other = TempDir::new("wrong-ca");
    let wrong_ca = other.0.join("ca.pem");
    std::fs::copy(plain.dir.0.join("ca.pem"), &wrong_ca).expect("copy");
    drop(plain);
    let ca = pg_ca();
    for (tls, name) in [("sslmode=require", "v0"), (&format!("sslmode=verify-full sslrootcert={ca}"), "v1")] {
        db.client.batch_execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'cachet' AND datname = current_database()").await.expect("terminate");
        db.rename(1, name).await;
        let origins = format!("[origins.users-db]\npostgres = \"{} {tls}\"\n", db.url());
        let node = LoaderNode::start(
            &origins,
            "[[namespace]]\nprefix = \"user:\"\nmodule = \"{users}\"\norigins = [\"users-db\"]\n\
             invalidate = { origin = \"users-db\", channel = \"users_changed\" }",
        );
        let client = node.client().await;
        wait_for_feed(&db).await;
        assert_eq!(name_of(&client.get("user:1").await.expect(tls).expect("row")), name, "{tls}");
        assert_eq!(node_connections_encrypted(&db, false).await, Some(true), "{tls}: the pool");
        assert_eq!(node_connections_encrypted(&db, true).await, Some(true), "{tls}: the change feed");
    }

    // Another CA: refused, as a TLS failure, through a node and to the
    // origin's caller.
    let url = format!("{} sslmode=verify-full sslrootcert={}", db.url(), wrong_ca.display());
    let node = LoaderNode::start(
        &format!("[origins.users-db]\npostgres = \"{url}\"\n"),
        "[[namespace]]\nprefix = \"user:\"\nmodule = \"{users}\"\norigins = [\"users-db\"]",
    );
    let err = node.client().await.get("user:2").await.expect_err("refused");
    assert!(err.to_string().contains("TLS to the origin failed"), "{err}");
    let config = cachet::loader::config::OriginConfig {
        postgres: Some(url),
        http: None,
        pool_size: 1,
        statement_timeout_ms: 2_000,
        connect_timeout_ms: 2_000,
        request_timeout_ms: 2_000,
    };
    let origins = cachet::loader::Origins::new(
        &[("users-db".to_string(), config)].into_iter().collect(),
        tokio::runtime::Handle::current(),
    )
    .expect("origins");
    let result = tokio::task::spawn_blocking(move || origins.query_blocking("users-db", "SELECT 1::text", &[], false))
        .await
        .expect("query");
    let Err(cachet::loader::OriginFailure::Tls(why)) = result else { panic!("not refused as TLS: {result:?}") };
    assert!(why.contains("UnknownIssuer") || why.contains("issuer"), "{why}");
}
