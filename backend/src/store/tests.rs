//! The same behaviour from both engines: every test runs on memory and on a real
//! `redis-server` this test starts on a free port.

use std::{
    process::{Child, Command, Stdio},
    time::Instant,
};

use rmcp::model::{ClientCapabilities, Implementation, ProtocolVersion};

use super::*;
use crate::config::{RedisConfig, RedisTopology};

/// A `redis-server` for one test, killed on drop.
struct TestRedis {
    child: Child,
    url: String,
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

async fn start_redis() -> TestRedis {
    let port = free_port();
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("redis-server must be installed (scripts/install-deps): {e}"));
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    TestRedis { child, url }
}

fn settings(ttl: Duration) -> Settings {
    Settings {
        prefix: "t:".into(),
        ttl,
        node_id: "n1".into(),
        event_log_max_len: 5,
        event_log_max_bytes: 1024,
    }
}

/// The stores under test: memory, and Redis (with the server kept alive alongside).
async fn stores(ttl: Duration) -> Vec<(&'static str, Store, Option<TestRedis>)> {
    let memory = Store::with_engine(
        settings(ttl),
        Box::new(memory::MemoryEngine::new(settings(ttl), Bus::new())),
    );
    let server = start_redis().await;
    let link = crate::redis_link::Link::new(
        &RedisConfig {
            topology: RedisTopology::Single(server.url.clone()),
            username: None,
            password: None,
            tls: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
        },
        Duration::from_secs(2),
    )
    .unwrap_or_else(|e| panic!("link: {e}"));
    let redis = Store::with_engine(
        settings(ttl),
        Box::new(redis::RedisEngine::new(
            settings(ttl),
            Arc::new(link),
            Duration::from_secs(2),
        )),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while redis.ping().await.is_err() {
        assert!(Instant::now() < deadline, "store did not connect");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    vec![("memory", memory, None), ("redis", redis, Some(server))]
}

/// Number of keys in the test Redis.
async fn dbsize(server: &TestRedis) -> i64 {
    let client = ::redis::Client::open(server.url.as_str()).unwrap_or_else(|e| panic!("{e}"));
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    ::redis::cmd("DBSIZE")
        .query_async(&mut c)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

fn init() -> InitializeRequestParams {
    InitializeRequestParams::new(ClientCapabilities::default(), Implementation::new("t", "1"))
        .with_protocol_version(ProtocolVersion::V_2025_06_18)
}

async fn create(s: &Store, id: &str, owner: Option<&str>) {
    assert!(s.create(id, &init()).await.is_ok(), "create {id}");
    assert_eq!(
        s.claim(id, owner, 0, false).await.ok(),
        Some(Admission::Admitted),
        "claim {id}"
    );
}

async fn access(s: &Store, id: &str, owner: Option<&str>) -> Option<Access> {
    s.touch(id, owner, false).await.ok().map(|t| t.access)
}

#[tokio::test]
async fn sessions_answer_only_their_owner_and_others_cannot_refresh_them() {
    for (name, s, _redis) in stores(Duration::from_secs(60)).await {
        create(&s, "a1", Some("alice")).await;
        create(&s, "anon", None).await;
        assert_eq!(
            access(&s, "a1", Some("alice")).await,
            Some(Access::Granted),
            "{name}"
        );
        assert_eq!(
            access(&s, "a1", Some("bob")).await,
            Some(Access::OtherOwner),
            "{name}"
        );
        assert_eq!(
            access(&s, "a1", None).await,
            Some(Access::OtherOwner),
            "{name}"
        );
        assert_eq!(
            access(&s, "anon", None).await,
            Some(Access::Granted),
            "{name}"
        );
        assert_eq!(
            access(&s, "anon", Some("alice")).await,
            Some(Access::OtherOwner)
        );
        assert_eq!(
            access(&s, "nope", Some("alice")).await,
            Some(Access::NotFound)
        );
        assert_eq!(
            s.delete_as("a1", Some("bob")).await.ok(),
            Some(Access::OtherOwner)
        );
        assert_eq!(s.delete_as("a1", None).await.ok(), Some(Access::OtherOwner));
        assert_eq!(
            access(&s, "a1", Some("alice")).await,
            Some(Access::Granted),
            "{name}: a refused delete leaves the session alone"
        );
        assert_eq!(
            s.delete_as("a1", Some("alice")).await.ok(),
            Some(Access::Granted)
        );
        assert_eq!(
            s.delete_as("a1", Some("alice")).await.ok(),
            Some(Access::NotFound)
        );
        assert_eq!(
            s.delete("anon").await.ok(),
            Some(true),
            "operators delete any"
        );
    }
}

#[tokio::test]
async fn the_session_limit_counts_live_sessions_of_one_owner_only() {
    for (name, s, _redis) in stores(Duration::from_secs(60)).await {
        for id in ["a1", "a2"] {
            create(&s, id, Some("alice")).await;
        }
        create(&s, "anon", None).await;
        assert_eq!(
            s.admit(Some("alice"), 3).await.ok(),
            Some(Admission::Admitted)
        );
        assert!(
            matches!(s.admit(Some("alice"), 2).await, Ok(Admission::Full { retry_after }) if retry_after <= Duration::from_secs(76)),
            "{name}: two of two: full, retry when the oldest expires"
        );
        assert_eq!(
            s.admit(Some("bob"), 2).await.ok(),
            Some(Admission::Admitted)
        );
        assert_eq!(s.admit(None, 1).await.ok(), Some(Admission::Admitted));
        assert_eq!(
            s.admit(Some("alice"), 0).await.ok(),
            Some(Admission::Admitted)
        );
        assert!(s.create("a3", &init()).await.is_ok());
        assert!(
            matches!(
                s.claim("a3", Some("alice"), 2, false).await,
                Ok(Admission::Full { .. })
            ),
            "{name}: claim enforces the limit too (concurrent initializes)"
        );
        assert_eq!(
            s.delete_as("a1", Some("alice")).await.ok(),
            Some(Access::Granted)
        );
        assert_eq!(
            s.claim("a3", Some("alice"), 2, false).await.ok(),
            Some(Admission::Admitted),
            "{name}"
        );
        assert_eq!(
            s.claim("gone", Some("alice"), 0, false).await.ok(),
            Some(Admission::Missing),
            "{name}: no record to bind"
        );
    }
}

#[tokio::test]
async fn an_opened_record_keeps_its_owner_through_initialize() {
    for (name, s, _redis) in stores(Duration::from_secs(60)).await {
        assert_eq!(
            s.claim("l1", Some("alice"), 5, true).await.ok(),
            Some(Admission::Admitted)
        );
        assert_eq!(s.initialize_existing("l1", &init()).await.ok(), Some(true));
        assert_eq!(access(&s, "l1", Some("alice")).await, Some(Access::Granted));
        assert_eq!(access(&s, "l1", None).await, Some(Access::OtherOwner));
        let listed = s.list(10).await.unwrap_or_default();
        assert_eq!(listed.len(), 1, "{name}");
        assert_eq!(listed[0].owner.as_deref(), Some("alice"));
        assert_eq!(listed[0].client_name.as_deref(), Some("t"));
        assert!(s.delete("l1").await.is_ok());
        assert_eq!(
            s.initialize_existing("l1", &init()).await.ok(),
            Some(false),
            "{name}: an initialize after the stream closed writes nothing"
        );
        assert_eq!(
            access(&s, "l1", Some("alice")).await,
            Some(Access::NotFound)
        );
    }
}

#[tokio::test]
async fn writes_to_a_deleted_session_never_bring_it_back() {
    for (name, s, redis) in stores(Duration::from_secs(60)).await {
        let baseline = match &redis {
            Some(r) => dbsize(r).await,
            None => 0,
        };
        create(&s, "d1", None).await;
        assert_eq!(s.incr_field("d1", "counter", 2).await.ok(), Some(Some(2)));
        assert!(
            s.append_event("d1", "x", "{}", false)
                .await
                .ok()
                .flatten()
                .is_some()
        );
        assert_eq!(s.delete("d1").await.ok(), Some(true));
        assert_eq!(
            s.incr_field("d1", "counter", 1).await.ok(),
            Some(None),
            "{name}"
        );
        assert_eq!(
            s.set_field("d1", "log_level", Some("info")).await.ok(),
            Some(false)
        );
        assert_eq!(
            s.set_legacy_holder("d1", Some("n1")).await.ok(),
            Some(false)
        );
        assert_eq!(
            s.subscribe("d1", "test://a", 5).await.ok(),
            Some(Subscribed::Gone)
        );
        assert_eq!(
            s.append_event("d1", "x", "{}", false).await.ok(),
            Some(None),
            "{name}"
        );
        assert_eq!(
            access(&s, "d1", None).await,
            Some(Access::NotFound),
            "{name}"
        );
        if let Some(r) = &redis {
            assert_eq!(
                dbsize(r).await,
                baseline,
                "{name}: every key of the session is gone"
            );
        }
    }
}

#[tokio::test]
async fn the_event_log_is_one_per_session_and_bounded_by_count_and_bytes() {
    for (name, s, redis) in stores(Duration::from_secs(60)).await {
        create(&s, "e1", None).await;
        let before = match &redis {
            Some(r) => dbsize(r).await,
            None => 0,
        };
        let mut ids = Vec::new();
        for i in 0..8 {
            let stream = if i % 2 == 0 { "a" } else { "b" };
            let id = s.append_event("e1", stream, &format!("p{i}"), false).await;
            ids.push(id.ok().flatten().unwrap_or_default());
        }
        if let Some(r) = &redis {
            assert_eq!(
                dbsize(r).await,
                before + 1,
                "{name}: one log key for all streams"
            );
        }
        let a = s.events_after("e1", "a", None).await.unwrap_or_default();
        let b = s.events_after("e1", "b", None).await.unwrap_or_default();
        assert_eq!(a.len() + b.len(), 5, "{name}: at most 5 entries kept");
        assert!(
            a.iter().all(|(_, p)| ["p4", "p6"].contains(&p.as_str())),
            "{name}: {a:?}"
        );
        assert_eq!(
            b.iter().map(|(_, p)| p.as_str()).collect::<Vec<_>>(),
            ["p3", "p5", "p7"],
            "{name}: each stream sees only its own events, oldest first"
        );
        let after = s
            .events_after("e1", "b", Some(&ids[3]))
            .await
            .unwrap_or_default();
        assert_eq!(after.len(), 2, "{name}: strictly after the given id");
        // 1 KiB of payload at most: one 600-byte event pushes out all but itself and one.
        let big = "x".repeat(600);
        assert!(s.append_event("e1", "a", &big, false).await.is_ok());
        assert!(s.append_event("e1", "a", &big, false).await.is_ok());
        let kept = s.events_after("e1", "a", None).await.unwrap_or_default();
        let b_kept = s.events_after("e1", "b", None).await.unwrap_or_default();
        assert_eq!(kept.len(), 1, "{name}: bytes cap keeps the newest only");
        assert!(b_kept.is_empty(), "{name}");
    }
}

#[tokio::test]
async fn subscriptions_are_capped_per_session() {
    for (name, s, _redis) in stores(Duration::from_secs(60)).await {
        create(&s, "s1", None).await;
        assert_eq!(s.subscribe("s1", "u1", 2).await.ok(), Some(Subscribed::Yes));
        assert_eq!(
            s.subscribe("s1", "u1", 2).await.ok(),
            Some(Subscribed::Yes),
            "again"
        );
        assert_eq!(s.subscribe("s1", "u2", 2).await.ok(), Some(Subscribed::Yes));
        assert_eq!(
            s.subscribe("s1", "u3", 2).await.ok(),
            Some(Subscribed::Full),
            "{name}"
        );
        assert!(s.unsubscribe("s1", "u1").await.is_ok());
        assert!(s.unsubscribe("s1", "u1").await.is_ok(), "twice is harmless");
        assert_eq!(
            s.subscribe("s1", "u3", 2).await.ok(),
            Some(Subscribed::Yes),
            "{name}"
        );
        assert_eq!(
            s.fields_with_prefix("s1", SUBSCRIPTION_PREFIX)
                .await
                .unwrap_or_default(),
            ["u2", "u3"]
        );
    }
}

#[tokio::test]
async fn expired_sessions_leave_nothing_behind() {
    for (name, s, redis) in stores(Duration::from_millis(800)).await {
        let baseline = match &redis {
            Some(r) => dbsize(r).await,
            None => 0,
        };
        create(&s, "x1", Some("alice")).await;
        assert!(s.append_event("x1", "a", "p", true).await.is_ok());
        assert_eq!(s.set_legacy_holder("x1", Some("n1")).await.ok(), Some(true));
        let restore = s.touch("x1", Some("alice"), true).await.ok();
        assert!(
            restore.and_then(|t| t.init).is_some(),
            "{name}: touch hands over init for a restore"
        );
        // The memory store reads std's clock, which tokio cannot pause: wait, polling.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let gone = access(&s, "x1", Some("bob")).await == Some(Access::NotFound);
            let keys = match &redis {
                Some(r) => dbsize(r).await,
                None => 0,
            };
            if gone && keys == baseline {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: session and all its keys must expire ({keys} keys, baseline {baseline})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            s.admit(Some("alice"), 1).await.ok(),
            Some(Admission::Admitted),
            "{name}"
        );
        assert_eq!(s.count().await.ok(), Some(0), "{name}");
    }
}

fn create_op<'a>(fields: &'a [(&'a str, String)], ttl_ms: u64, lease_ms: u64) -> task::TaskOp<'a> {
    task::TaskOp::Create {
        fields,
        now: now_ms(),
        ttl_ms,
        lease_ms,
    }
}

fn task_fields(owner: &str) -> Vec<(&'static str, String)> {
    vec![
        ("owner", owner.to_owned()),
        ("status", "working".into()),
        ("runner", "r1".into()),
        ("created", "1".into()),
        ("nin", "0".into()),
        ("nre", "0".into()),
    ]
}

async fn task_op(s: &Store, id: &str, op: task::TaskOp<'_>) -> task::TaskReply {
    s.task(id, op)
        .await
        .unwrap_or_else(|e| panic!("task op on {id}: {e}"))
}

fn client<'a>(owner: &'a str, act: task::ClientAct<'a>) -> task::TaskOp<'a> {
    task::TaskOp::Client {
        owner,
        now: now_ms(),
        act,
    }
}

fn runner<'a>(runner: &'a str, act: task::RunnerAct<'a>) -> task::TaskOp<'a> {
    task::TaskOp::Runner {
        runner,
        now: now_ms(),
        act,
    }
}

fn record(reply: task::TaskReply) -> HashMap<String, String> {
    match reply {
        task::TaskReply::Record(r) => r,
        other => panic!("expected a record, got {other:?}"),
    }
}

#[tokio::test]
async fn task_records_follow_one_table_on_both_engines() {
    use task::{ClientAct as C, RunnerAct as R, TaskReply};
    for (name, s, _redis) in stores(Duration::from_secs(30)).await {
        let id = "0123456789abcdef0123456789abcdef";
        let fields = task_fields("alice");
        let created = task_op(&s, id, create_op(&fields, 60_000, 60_000)).await;
        assert_eq!(created, TaskReply::Applied(1), "{name}");
        assert_eq!(
            record(task_op(&s, id, client("alice", C::Read)).await)["status"],
            "working"
        );
        assert_eq!(
            task_op(&s, id, client("bob", C::Read)).await,
            TaskReply::Foreign,
            "{name}"
        );
        assert_eq!(
            task_op(&s, id, client("", C::Cancel)).await,
            TaskReply::Foreign,
            "{name}"
        );
        assert_eq!(
            task_op(
                &s,
                "ffffffffffffffffffffffffffffffff",
                client("alice", C::Read)
            )
            .await,
            TaskReply::Gone
        );

        // Two questions; a partial answer removes exactly the answered one before the ack.
        let asked = [
            ("a".to_owned(), "{\"q\":1}".to_owned()),
            ("b".to_owned(), "{\"q\":2}".to_owned()),
        ];
        let ask = R::Ask {
            max: 3,
            requests: &asked,
        };
        assert!(
            matches!(
                task_op(&s, id, runner("r1", ask)).await,
                TaskReply::Runner { cancel: false, .. }
            ),
            "{name}"
        );
        let too_many = [
            ("c".to_owned(), "{}".to_owned()),
            ("d".to_owned(), "{}".to_owned()),
        ];
        assert_eq!(
            task_op(
                &s,
                id,
                runner(
                    "r1",
                    R::Ask {
                        max: 3,
                        requests: &too_many
                    }
                )
            )
            .await,
            TaskReply::Full,
            "{name}"
        );
        assert_eq!(
            task_op(&s, id, runner("r2", R::Take)).await,
            TaskReply::Fenced,
            "{name}: another runner is fenced"
        );
        let again = [("a".to_owned(), "{\"q\":1}".to_owned())];
        let ask_again = R::Ask {
            max: 3,
            requests: &again,
        };
        assert!(
            matches!(
                task_op(&s, id, runner("r1", ask_again)).await,
                TaskReply::Runner { cancel: false, .. }
            ),
            "{name}"
        );
        let r = record(task_op(&s, id, client("alice", C::Read)).await);
        assert_eq!(r["nin"], "2", "{name}: a key asked again is counted once");
        let answer = [
            ("a".to_owned(), "{\"x\":1}".to_owned()),
            ("zz".to_owned(), "{}".to_owned()),
        ];
        assert_eq!(
            task_op(&s, id, client("alice", C::Update(&answer))).await,
            TaskReply::Applied(1),
            "{name}: unknown keys are ignored"
        );
        assert_eq!(
            task_op(&s, id, client("alice", C::Update(&answer))).await,
            TaskReply::Applied(0),
            "{name}: answered keys are ignored"
        );
        let r = record(task_op(&s, id, client("alice", C::Read)).await);
        assert!(
            !r.contains_key("in:a") && r.contains_key("in:b"),
            "{name}: {r:?}"
        );
        assert_eq!(r["nin"], "1", "{name}");
        let renew = R::Renew {
            lease_ms: 60_000,
            msg: Some("half way"),
        };
        assert_eq!(
            task_op(&s, id, runner("r1", renew)).await,
            TaskReply::Runner {
                cancel: false,
                waiting: 1,
                answers: vec![]
            },
            "{name}"
        );
        assert_eq!(
            task_op(&s, id, runner("r1", R::Take)).await,
            TaskReply::Runner {
                cancel: false,
                waiting: 0,
                answers: vec![("a".into(), "{\"x\":1}".into())]
            },
            "{name}"
        );
        assert_eq!(
            record(task_op(&s, id, client("alice", C::Read)).await)["msg"],
            "half way"
        );

        // A cancel drops the pending question, and the runner sees it on its next step.
        assert_eq!(
            task_op(&s, id, client("alice", C::Cancel)).await,
            TaskReply::Applied(1),
            "{name}"
        );
        let r = record(task_op(&s, id, client("alice", C::Read)).await);
        assert!(!r.contains_key("in:b") && r["nin"] == "0", "{name}: {r:?}");
        assert!(
            matches!(
                task_op(&s, id, runner("r1", ask)).await,
                TaskReply::Runner { cancel: true, .. }
            ),
            "{name}"
        );
        let finish = R::Finish {
            status: "cancelled",
            field: "",
            payload: "",
            msg: "",
        };
        assert_eq!(
            task_op(&s, id, runner("r2", finish)).await,
            TaskReply::Fenced,
            "{name}"
        );
        assert!(
            matches!(
                task_op(&s, id, runner("r1", finish)).await,
                TaskReply::Runner { .. }
            ),
            "{name}"
        );
        assert_eq!(
            record(task_op(&s, id, client("alice", C::Read)).await)["status"],
            "cancelled"
        );
        assert_eq!(
            task_op(&s, id, client("alice", C::Cancel)).await,
            TaskReply::Applied(0),
            "{name}: cancel after the end is an ack"
        );
        assert_eq!(
            task_op(&s, id, runner("r1", R::Take)).await,
            TaskReply::Fenced,
            "{name}: ended tasks take no writes"
        );
    }
}

#[tokio::test]
async fn a_task_whose_lease_ran_out_reads_failed_and_fences_its_runner() {
    use task::{ClientAct as C, RunnerAct as R, TaskReply};
    for (name, s, _redis) in stores(Duration::from_secs(30)).await {
        let id = "00000000000000000000000000000001";
        let fields = task_fields("");
        task_op(&s, id, create_op(&fields, 60_000, 0)).await;
        let r = record(task_op(&s, id, client("", C::Read)).await);
        assert_eq!(r["status"], "failed", "{name}");
        assert_eq!(r["msg"], task::LOST_MESSAGE, "{name}");
        assert!(r["error"].contains("-32603"), "{name}: {r:?}");
        let renew = R::Renew {
            lease_ms: 60_000,
            msg: None,
        };
        assert_eq!(
            task_op(&s, id, runner("r1", renew)).await,
            TaskReply::Fenced,
            "{name}"
        );
    }
}

#[tokio::test]
async fn expired_tasks_and_their_owner_sets_leave_nothing_behind() {
    use task::{ClientAct as C, TaskReply};
    for (name, s, redis) in stores(Duration::from_secs(30)).await {
        let baseline = match &redis {
            Some(r) => dbsize(r).await,
            None => 0,
        };
        let expires = now_ms() + 600;
        for (i, id) in [
            "0000000000000000000000000000000a",
            "0000000000000000000000000000000b",
        ]
        .iter()
        .enumerate()
        {
            let admitted = s.admit_task(Some("alice"), id, expires, 2).await.ok();
            assert_eq!(admitted, Some(Admission::Admitted), "{name}: task {i}");
            let fields = task_fields("alice");
            task_op(&s, id, create_op(&fields, 600, 60_000)).await;
        }
        let third = s
            .admit_task(
                Some("alice"),
                "0000000000000000000000000000000c",
                expires,
                2,
            )
            .await
            .ok();
        assert!(
            matches!(third, Some(Admission::Full { .. })),
            "{name}: {third:?}"
        );
        let bob = s
            .admit_task(Some("bob"), "0000000000000000000000000000000d", expires, 2)
            .await
            .ok();
        assert_eq!(
            bob,
            Some(Admission::Admitted),
            "{name}: limits are per principal"
        );
        // A place taken for a task whose record was never written is given back.
        let x = "00000000000000000000000000000010";
        let taken = s.admit_task(Some("alice"), x, expires, 3).await.ok();
        assert_eq!(taken, Some(Admission::Admitted), "{name}");
        assert!(s.release_task(Some("alice"), x).await.is_ok(), "{name}");
        let y = "00000000000000000000000000000011";
        let next = s.admit_task(Some("alice"), y, expires, 3).await.ok();
        assert_eq!(
            next,
            Some(Admission::Admitted),
            "{name}: the released place is free"
        );
        assert!(s.release_task(Some("alice"), y).await.is_ok(), "{name}");
        assert_eq!(
            s.admit_task(None, "0000000000000000000000000000000e", expires, 2)
                .await
                .ok(),
            Some(Admission::Admitted)
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let gone = task_op(
                &s,
                "0000000000000000000000000000000a",
                client("alice", C::Read),
            )
            .await
                == TaskReply::Gone;
            let keys = match &redis {
                Some(r) => dbsize(r).await,
                None => 0,
            };
            if gone && keys == baseline {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name}: tasks and owner sets must expire ({keys} keys, baseline {baseline})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let again = s
            .admit_task(
                Some("alice"),
                "0000000000000000000000000000000f",
                now_ms() + 600,
                2,
            )
            .await
            .ok();
        assert_eq!(again, Some(Admission::Admitted), "{name}");
    }
}
