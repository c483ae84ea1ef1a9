//! User-space instructions per request, counted by callgrind: credproxy,
//! the baseline build and nginx, one thread each, counters zeroed after a
//! warm-up and dumped after the last answer — a deterministic number where
//! CPU time on a shared machine is not.

use std::path::Path;
use std::time::Duration;

use crate::client::{run_hooked, Target};
use crate::knobs::Knobs;
use crate::systems::{baseline_config, credproxy_bin, find_tool, spawn_credproxy, spawn_nginx, Setup, AUDIT_OFF};
use crate::ORG;

/// Counts credproxy's (and the baseline's, and nginx's) instructions per
/// request and prints them; says so when valgrind is not installed.
pub async fn section(k: &Knobs, setup: &Setup, tck: u64, targets: &mut crate::report::Targets) {
    if !k.callgrind {
        return;
    }
    let Some((valgrind, control)) = find_tool("valgrind").zip(find_tool("callgrind_control")) else {
        println!("\ninstructions per request: absent (install Debian's `valgrind` to count them)");
        return;
    };
    let dir = setup.dir.path();
    // LOAD_CALLGRIND_DIR keeps the dumps (for callgrind_annotate).
    let cg = k.callgrind_dir.clone().unwrap_or_else(|| dir.join("callgrind"));
    std::fs::create_dir_all(&cg).unwrap();
    let wrapper = callgrind_wrapper(&valgrind, &cg);
    let one_thread = dir.join("credproxy-1.toml");
    let text = std::fs::read_to_string(&setup.config).unwrap();
    let text = text.replace(&format!("worker_threads = {}", k.workers), "worker_threads = 1");
    std::fs::write(&one_thread, text).unwrap();
    let log = k.baseline_log();
    // The audit trail goes with the access log (LOAD_ACCESS_LOG=1).
    let audit = if k.access_log { &[][..] } else { AUDIT_OFF };
    let dur = k.dur / 2;

    // This build, checking the upstream saw the token on every request.
    let counted = |config: std::path::PathBuf,
                   target: fn(&Setup, std::net::SocketAddr) -> Target,
                   audit: &'static [(&'static str, &'static str)],
                   name| {
        let (wrapper, control, cg) = (&wrapper, &control, &cg);
        async move {
            let (served, _) = spawn_credproxy(wrapper, credproxy_bin(), &config, dir, log, audit).await;
            let (t0, w0) = setup.seen.counts();
            let pid = served.child.id().unwrap();
            let ir = instructions_per_request(control, cg, pid, &target(setup, served.proxy), dur, tck).await;
            let (t1, w1) = setup.seen.counts();
            assert_eq!(w1 - w0, t1 - t0, "{name} under callgrind: requests without the token");
            ir
        }
    };
    let cp_ir = counted(one_thread.clone(), Setup::via, audit, "credproxy").await;
    // CONNECT + TLS interception, keep-alive inside the tunnel: TLS both
    // ways (to the caller, and to the upstream's TLS port).
    let connect_ir = counted(one_thread.clone(), Setup::via_connect, audit, "credproxy-connect").await;
    // Generous quotas checked on every request.
    let limits_ir = counted(one_thread.clone(), Setup::via_limited, audit, "credproxy+limits").await;
    // runtime.thread_per_core: one single-threaded runtime for the proxy.
    let tpc = dir.join("credproxy-tpc-1.toml");
    std::fs::write(&tpc, format!("{}thread_per_core = true\n", std::fs::read_to_string(&one_thread).unwrap())).unwrap();
    let tpc_ir = counted(tpc, Setup::via, audit, "credproxy-tpc").await;
    // Shared mode: the same, with a run token on every request, on the
    // sidecar's runtime (what shared mode costs).
    let text = std::fs::read_to_string(&one_thread).unwrap();
    let shared_text = text.replace(&format!("org_id = \"{ORG}\""), "mode = \"shared\"");
    let shared = dir.join("credproxy-shared-1.toml");
    std::fs::write(&shared, format!("{shared_text}thread_per_core = false\n")).unwrap();
    let shared_ir = counted(shared.clone(), Setup::via_shared, audit, "credproxy-shared").await;
    // The shared tier as production runs it: run token, quotas, audit line
    // (to stdout, which the bench discards) on every request, and shared
    // mode's default runtime (thread-per-core)...
    let prod = dir.join("credproxy-prod-1.toml");
    std::fs::write(&prod, &shared_text).unwrap();
    let prod_ir = counted(prod, Setup::via_prod, &[], "credproxy-prod").await;
    // ...and on the work-stealing runtime, for comparison.
    let prod_ws_ir = counted(shared, Setup::via_prod, &[], "credproxy-prod-ws").await;
    // The baseline binary too, so a change's count is read before and after in one run.
    let base_ir = match (&k.baseline_bin, setup.baseline_conn()) {
        (Some(base), Some(conn)) => {
            // The baseline's own store (see `Setup::start`).
            let (bv, _) = spawn_credproxy(&wrapper, base, &baseline_config(&one_thread), dir, log, audit).await;
            let pid = bv.child.id().unwrap();
            Some(instructions_per_request(&control, &cg, pid, &setup.via_conn(bv.proxy, conn), dur, tck).await)
        }
        _ => None,
    };
    let ng_ir = match find_tool("nginx") {
        Some(bin) => {
            let (ngv, addr) = spawn_nginx(&wrapper, &bin, &dir.join("nginx-cg"), setup.upstream, None, false).await;
            let target = Target::Proxy { proxy: addr, upstream: setup.upstream, conn_id: None, auth: None };
            Some(instructions_per_request(&control, &cg, ngv.id(), &target, dur, tck).await)
        }
        None => None,
    };
    crate::report::instructions(cp_ir, prod_ir, base_ir, ng_ir, targets);
    println!(
        "credproxy-shared {shared_ir:.0} instructions per request, credproxy-shared/credproxy {:.3}",
        shared_ir / cp_ir
    );
    println!(
        "credproxy+limits {limits_ir:.0} instructions per request, credproxy+limits/credproxy {:.3}",
        limits_ir / cp_ir
    );
    println!(
        "credproxy-connect {connect_ir:.0} instructions per request, credproxy-connect/credproxy {:.3}",
        connect_ir / cp_ir
    );
    println!("credproxy-tpc {tpc_ir:.0} instructions per request, credproxy-tpc/credproxy {:.3}", tpc_ir / cp_ir);
    println!(
        "credproxy-prod-ws (runtime.thread_per_core = false) {prod_ws_ir:.0} instructions per request, \
         credproxy-prod/credproxy-prod-ws {:.3}",
        prod_ir / prod_ws_ir
    );
}

/// `valgrind --tool=callgrind`, writing its dumps into `dir`.
fn callgrind_wrapper(valgrind: &Path, dir: &Path) -> Vec<std::ffi::OsString> {
    vec![
        valgrind.into(),
        "--tool=callgrind".into(),
        "--compress-strings=no".into(),
        format!("--callgrind-out-file={}/cg.%p", dir.display()).into(),
    ]
}

fn callgrind_control(control: &Path, flag: &str, pid: u32) {
    let out =
        std::process::Command::new(control).args([flag, &pid.to_string()]).output().expect("callgrind_control runs");
    assert!(out.status.success(), "callgrind_control {flag} {pid}: {}", String::from_utf8_lossy(&out.stderr));
}

/// The instruction count of the newest dump of `pid` in `dir`.
fn dumped_instructions(dir: &Path, pid: u32) -> u64 {
    let prefix = format!("cg.{pid}.");
    let newest = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n: u32 = name.strip_prefix(&prefix)?.parse().ok()?;
            Some((n, e.path()))
        })
        .max()
        .expect("callgrind wrote a dump")
        .1;
    let text = std::fs::read_to_string(&newest).unwrap();
    let line = text.lines().find_map(|l| l.strip_prefix("summary:").or_else(|| l.strip_prefix("totals:")));
    line.and_then(|v| v.split_whitespace().next()?.parse().ok()).expect("callgrind dump has a summary")
}

/// User-space instructions per request of the process `pid` (running under
/// callgrind): counters zeroed once connections are open and warm, dumped
/// after the last answer, divided by the requests answered.
async fn instructions_per_request(
    control: &Path,
    dir: &Path,
    pid: u32,
    target: &Target,
    dur: Duration,
    tck: u64,
) -> f64 {
    let s = run_hooked(target, 4, dur, None, tck, &|| callgrind_control(control, "-z", pid), &|| {
        callgrind_control(control, "-d", pid)
    })
    .await;
    assert_eq!(s.errors, 0, "requests failed under callgrind");
    dumped_instructions(dir, pid) as f64 / s.ok.max(1) as f64
}
