//! Starting `credproxy serve` as a process and reading its listening line:
//! one helper for the tests (`support`) and the load bench
//! (`benches/load`, which includes this file by path).

#![allow(dead_code, reason = "the tests and the bench each use a part")]

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};

/// A `credproxy serve` process that printed its listening line. Killed
/// when dropped.
pub struct Served {
    pub child: tokio::process::Child,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    /// The start-up line itself ("credproxy listening proxy=… admin=… org=…").
    pub line: String,
}

/// Spawns `cmd` — a `credproxy serve` command line, with whatever wrapper,
/// working directory and environment the caller gave it — and waits for
/// its listening line, at most `wait` for each line of its log. The rest of
/// its log is read and dropped (a full pipe would stall it), or echoed to
/// the test's stderr when `CREDPROXY_TEST_INSTANCE_LOGS` is set (for
/// chasing a failure: `CREDPROXY_TEST_INSTANCE_LOGS=1 scripts/test --test
/// webhooks -- --nocapture`).
pub async fn serve(mut cmd: tokio::process::Command, wait: Duration) -> Served {
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("the credproxy binary starts");
    let mut lines = BufReader::new(child.stderr.take().expect("stderr is piped")).lines();
    let mut found = None;
    while let Ok(Ok(Some(line))) = tokio::time::timeout(wait, lines.next_line()).await {
        if let Some((proxy, admin)) = listening_addrs(&line) {
            found = Some((proxy, admin, line));
            break;
        }
    }
    let Some((proxy, admin, line)) = found else {
        panic!("credproxy did not print its listening line (waited up to {wait:?} for each log line)");
    };
    let echo = std::env::var_os("CREDPROXY_TEST_INSTANCE_LOGS").is_some();
    tokio::spawn(async move {
        while let Ok(Some(l)) = lines.next_line().await {
            if echo {
                eprintln!("[instance] {l}");
            }
        }
    });
    Served { child, proxy, admin, line }
}

/// The proxy and admin addresses of a start-up line
/// (`credproxy listening proxy=ADDR admin=ADDR …`).
pub fn listening_addrs(line: &str) -> Option<(SocketAddr, SocketAddr)> {
    if !line.contains("credproxy listening") {
        return None;
    }
    let field = |name: &str| line.split(&format!("{name}=")).nth(1)?.split_whitespace().next()?.parse().ok();
    Some((field("proxy")?, field("admin")?))
}
