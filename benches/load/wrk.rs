//! `wrk` as a second load generator, external to this process: Debian's
//! `wrk` (4.1), `-t2`, absolute-form requests written by a Lua script (the
//! way a user points it at a forward proxy), the counts and latency
//! percentiles printed by the script's `done` hook and read back here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::client::{Meter, Sample, Target};
use crate::systems::find_tool;

/// The `wrk` binary: found on `PATH`, or (measuring, as root, with
/// `apt-get`) installed from Debian's archive. `None` with the reason the
/// rows are absent.
pub fn find_or_install(smoke: bool) -> Result<PathBuf, String> {
    if let Some(wrk) = find_tool("wrk") {
        return Ok(wrk);
    }
    // The smoke run under `cargo test` installs nothing.
    if smoke {
        return Err("absent (not installed; `cargo bench --bench load` installs Debian's `wrk`)".into());
    }
    let Some(apt) = find_tool("apt-get") else {
        return Err("absent (install `wrk`; no apt-get here)".into());
    };
    eprintln!("installing Debian's wrk (apt-get install wrk, at most 5 minutes)");
    let status = std::process::Command::new("timeout")
        .arg("300")
        .arg(apt)
        .args(["install", "-y", "-q", "--no-install-recommends", "wrk"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdout(std::process::Stdio::null())
        .status();
    match (status, find_tool("wrk")) {
        (Ok(s), Some(wrk)) if s.success() => Ok(wrk),
        (s, _) => Err(format!("absent (apt-get install wrk failed: {s:?}; install it as root)")),
    }
}

/// The Lua script that makes wrk send `target`'s requests: absolute-form
/// to a forward proxy with the connection id (and a run token), or
/// origin-form straight to the upstream. Its `done` hook prints one line
/// [`parse`] reads.
fn script(target: &Target) -> String {
    let mut s = String::from("wrk.method = \"GET\"\n");
    match target {
        Target::Direct(addr) => s += &format!("wrk.path = \"/\"\nwrk.headers[\"Host\"] = \"{addr}\"\n"),
        Target::Proxy { upstream, conn_id, auth, .. } => {
            s += &format!("wrk.path = \"http://{upstream}/\"\nwrk.headers[\"Host\"] = \"{upstream}\"\n");
            if let Some(id) = conn_id {
                s += &format!("wrk.headers[\"X-Connection-Id\"] = \"{id}\"\n");
            }
            if let Some(auth) = auth {
                s += &format!("wrk.headers[\"Proxy-Authorization\"] = \"{auth}\"\n");
            }
        }
        Target::Connect { .. } => unreachable!("wrk rows are plain HTTP"),
    }
    s += r#"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("wrk-result requests=%d errors=%d p50=%d p99=%d duration=%d\n",
    summary.requests, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), summary.duration))
end
"#;
    s
}

/// The address wrk connects to.
fn connect_to(target: &Target) -> std::net::SocketAddr {
    match target {
        Target::Direct(a) | Target::Proxy { proxy: a, .. } => *a,
        Target::Connect { .. } => unreachable!("wrk rows are plain HTTP"),
    }
}

/// One wrk run of `conns` connections over two threads for `dur` (whole
/// seconds, at least one) against `target`, measuring the process tree
/// `pid`. `dir` holds the script.
pub async fn run(
    wrk: &Path,
    dir: &Path,
    target: &Target,
    conns: usize,
    dur: Duration,
    pid: Option<u32>,
    tck: u64,
) -> Sample {
    let lua = dir.join(format!("wrk-{}.lua", connect_to(target).port()));
    std::fs::write(&lua, script(target)).unwrap();
    let secs = dur.as_secs().max(1);
    let meter = Meter::start(pid, tck);
    let out = tokio::process::Command::new(wrk)
        .args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s"), "--timeout", "5s", "-s"])
        .arg(&lua)
        .arg(format!("http://{}/", connect_to(target)))
        .output()
        .await
        .expect("wrk runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    let (ok, errors, p50_us, p99_us, secs) =
        parse(&stdout).unwrap_or_else(|| panic!("no wrk-result line in wrk's output:\n{stdout}"));
    let (cpu_us, user_us, peak_rss_kb) = meter.finish(ok);
    Sample { ok, errors, secs, p50_us, p99_us, cpu_us, user_us, peak_rss_kb }
}

/// (answered, errors, p50 µs, p99 µs, seconds) from the `done` hook's line.
fn parse(stdout: &str) -> Option<(u64, u64, u32, u32, f64)> {
    let line = stdout.lines().find_map(|l| l.strip_prefix("wrk-result "))?;
    let field = |name: &str| -> Option<u64> {
        line.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?.parse().ok()
    };
    let requests = field("requests")?;
    let errors = field("errors")?;
    // wrk counts a non-2xx answer both as a request and as an error.
    Some((
        requests.saturating_sub(errors),
        errors,
        field("p50")? as u32,
        field("p99")? as u32,
        field("duration")? as f64 / 1e6,
    ))
}
