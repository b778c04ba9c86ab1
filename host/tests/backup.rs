//! `jobhook backup`: a consistent copy of a running engine's SQLite store, checked before it is
//! called good, that an engine started on it serves; refused over an existing file, for a
//! damaged store (nothing left behind) and for a PostgreSQL store; killed part-way, it leaves
//! nothing under the backup's name.

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use jobhook_testkit::engine::EngineProcess;
use jobhook_testkit::{guest, sample_context_json};

fn engine_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_jobhook"))
}

fn jobhook(args: &[&str]) -> Output {
    Command::new(engine_bin())
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run jobhook")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A configuration in `dir` with its SQLite store in `dir/<data>` and one handler for every
/// job type.
fn config_in(dir: &Path, data: &str) -> PathBuf {
    let config = dir.join("jobhook.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\n[store]\ndata_dir = \"{data}\"\n\n\
             [[handlers]]\nname = \"log\"\ncomponent = \"{}\"\njob_types = [\"*\"]\n",
            guest("log-context").display()
        ),
    )
    .expect("config");
    config
}

/// Posts `n` events; their ids.
async fn post_events(url: &str, n: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let response = client
            .post(format!("{url}/v1/job-complete"))
            .header("content-type", "application/json")
            .body(sample_context_json().to_string())
            .send()
            .await
            .expect("POST");
        assert_eq!(response.status(), 202);
        let body: serde_json::Value =
            serde_json::from_slice(&response.bytes().await.expect("body")).expect("JSON");
        ids.push(body["event_id"].as_str().expect("event_id").to_owned());
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_taken_while_the_engine_runs_is_checked_private_and_restores_every_event() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path(), "data");
    let engine = EngineProcess::start(engine_bin(), &config, &dir.path().join("engine.log"));
    let ids = post_events(&engine.url, 20).await;

    // While it runs, and without stopping it.
    let to = dir.path().join("backup.sqlite");
    let args = |to: &Path| {
        [
            "backup".to_owned(),
            "--config".to_owned(),
            config.display().to_string(),
            "--to".to_owned(),
            to.display().to_string(),
        ]
    };
    let run = |to: &Path| jobhook(&args(to).each_ref().map(String::as_str));
    let out = run(&to);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let said = text(&out.stdout);
    assert!(
        said.contains("backup written and checked (quick_check ok): 20 events"),
        "{said}"
    );
    let mode = std::fs::metadata(&to).expect("backup").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let health = reqwest::get(format!("{}/healthz", engine.url))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200, "the engine goes on");

    // Nowhere it cannot create a file, saying where and blaming the destination.
    let nowhere = dir.path().join("missing/backup.sqlite");
    let out = run(&nowhere);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(&format!(
            "error: cannot write the backup to {}: the directory {} does not exist",
            nowhere.display(),
            dir.path().join("missing").display()
        )),
        "{}",
        text(&out.stderr)
    );

    // Never over a file.
    let before = std::fs::read(&to).expect("backup");
    let again = run(&to);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains(
            "a file of that name exists; a backup is never written over one: give a new name"
        ),
        "{}",
        text(&again.stderr)
    );
    assert_eq!(std::fs::read(&to).expect("backup"), before);
    engine.terminate(Duration::from_secs(20));

    // Restored into a data directory of its own, it is served: every event is there.
    let restored = tempfile::tempdir().expect("tempdir");
    let config = config_in(restored.path(), "data");
    std::fs::create_dir(restored.path().join("data")).expect("data dir");
    std::fs::set_permissions(
        restored.path().join("data"),
        std::fs::Permissions::from_mode(0o700),
    )
    .expect("mode");
    std::fs::copy(&to, restored.path().join("data/jobhook.sqlite")).expect("restore");
    let engine = EngineProcess::start(engine_bin(), &config, &restored.path().join("engine.log"));
    let client = reqwest::Client::new();
    for id in &ids {
        let response = client
            .get(format!("{}/v1/events/{id}", engine.url))
            .send()
            .await
            .expect("GET");
        assert_eq!(response.status(), 200, "event {id} was not restored");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_store_is_not_backed_up_and_the_error_says_what_to_do() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path(), "data");
    let engine = EngineProcess::start(engine_bin(), &config, &dir.path().join("engine.log"));
    post_events(&engine.url, 200).await;
    engine.terminate(Duration::from_secs(20));
    // The second half of the file overwritten, as a copy cut short or a failing disk leaves it:
    // table pages among them for certain (damage only to index pages would be mended by the
    // copy, which rebuilds the indexes, and the copy would rightly be called good).
    let database = dir.path().join("data/jobhook.sqlite");
    // Everything in the database file itself, none of it left in the WAL, whose pages a reader
    // would take instead of the damaged ones.
    rusqlite::Connection::open(&database)
        .and_then(|c| {
            c.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            })
        })
        .expect("checkpoint");
    let length = std::fs::metadata(&database).expect("database").len();
    assert!(length > 64 * 1024, "{length}");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .open(&database)
        .expect("open");
    file.seek(SeekFrom::Start(length / 2)).expect("seek");
    let rest = usize::try_from(length - length / 2).expect("length");
    file.write_all(&vec![0xA5; rest]).expect("damage");
    drop(file);

    let to = dir.path().join("backup.sqlite");
    let out = jobhook(&[
        "backup",
        "--config",
        &config.display().to_string(),
        "--to",
        &to.display().to_string(),
    ]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success(), "{}", text(&out.stdout));
    assert!(
        stderr.contains("damaged") && stderr.contains("restore it from a backup"),
        "{stderr}"
    );
    assert!(!to.exists(), "a failed backup leaves no file");
}

#[test]
fn a_postgres_store_is_pointed_to_its_own_tools() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("jobhook.toml");
    std::fs::write(dir.path().join("pw"), "secret").expect("password");
    std::fs::set_permissions(
        dir.path().join("pw"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("mode");
    std::fs::write(
        &config,
        format!(
            "[store]\nkind = \"postgres\"\nurl = \"postgres://jobhook@127.0.0.1:5432/jobhook\"\n\
             password = {{ file = \"pw\" }}\n\n[[handlers]]\nname = \"log\"\ncomponent = \"{}\"\n\
             job_types = [\"*\"]\n",
            guest("log-context").display()
        ),
    )
    .expect("config");
    let out = jobhook(&[
        "backup",
        "--config",
        &config.display().to_string(),
        "--to",
        &dir.path().join("b.sqlite").display().to_string(),
    ]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("back the database up with PostgreSQL's own tools (pg_dump"),
        "{}",
        text(&out.stderr)
    );
}

/// Events of [`LARGE_CONTEXT_BYTES`] each that [`a_backup_killed_part_way_leaves_nothing_under_its_name`]
/// puts in the store: about 64 MiB, a copy long enough (hundreds of milliseconds) to be
/// stopped in the middle.
const LARGE_STORE_EVENTS: u32 = 16_000;

/// Bytes of each such event's context.
const LARGE_CONTEXT_BYTES: u32 = 4_000;

/// A backup killed part-way (SIGKILL: an OOM kill, a cron job's `timeout`, a reboot) leaves
/// nothing under the name it was given — a partial file there, once opened by any SQLite tool,
/// was an empty but valid store that a restore started an empty engine from — only its hidden
/// `.partial` file (and SQLite's journal of it), which no later backup to that name meets.
#[test]
fn a_backup_killed_part_way_leaves_nothing_under_its_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = config_in(dir.path(), "data");
    let data = dir.path().join("data");
    drop(jobhook::queue::store::sqlite::SqliteStore::open(&data).expect("a store"));
    rusqlite::Connection::open(data.join("jobhook.sqlite"))
        .expect("open the store")
        .execute(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?1)
             INSERT INTO events (id, received_at, source, context)
             SELECT printf('00000000-0000-7000-8000-%012d', i), i, 'api',
                    json_object('JobId', i, 'Padding', hex(randomblob(?2 / 2)))
             FROM n",
            [LARGE_STORE_EVENTS, LARGE_CONTEXT_BYTES],
        )
        .expect("fill the store");
    let out = dir.path().join("out");
    std::fs::create_dir(&out).expect("out");
    let to = out.join("kb.sqlite");

    let mut backup = Command::new(engine_bin())
        .args(["backup", "--config"])
        .arg(&config)
        .arg("--to")
        .arg(&to)
        .env_remove("RUST_LOG")
        .spawn()
        .expect("start jobhook backup");
    let pid = i32::try_from(backup.id()).expect("pid");
    // Stopped as soon as anything of the copy is on disk.
    let written = |out: &Path| -> Vec<(String, u64)> {
        std::fs::read_dir(out)
            .expect("list out")
            .filter_map(|entry| {
                let entry = entry.ok()?;
                let len = entry.metadata().ok()?.len();
                Some((entry.file_name().to_string_lossy().into_owned(), len))
            })
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !written(&out).iter().any(|(_, len)| *len > 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was written: {:?}",
            written(&out)
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill() with a child's pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let part_way = written(&out);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let status = backup.wait().expect("wait for jobhook backup");
    assert!(!status.success(), "{status:?}");
    assert!(
        part_way
            .iter()
            .all(|(name, _)| name.starts_with(".kb.sqlite.") && name.contains(".partial")),
        "{part_way:?}"
    );
    assert!(!to.exists(), "{:?}", written(&out));

    // A backup to the same name goes ahead; the partial file stays as it was, for the
    // operator to delete.
    let output = jobhook(&[
        "backup",
        "--config",
        &config.display().to_string(),
        "--to",
        &to.display().to_string(),
    ]);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert!(
        text(&output.stdout).contains(&format!("{LARGE_STORE_EVENTS} events")),
        "{}",
        text(&output.stdout)
    );
    // Nothing of the second backup but the backup itself.
    let mut after: Vec<String> = written(&out).into_iter().map(|(name, _)| name).collect();
    let mut expected: Vec<String> = part_way.into_iter().map(|(name, _)| name).collect();
    expected.push("kb.sqlite".to_owned());
    after.sort();
    expected.sort();
    assert_eq!(after, expected);
    assert_eq!(
        std::fs::metadata(&to)
            .expect("the backup")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
}
