//! `cargo bench --bench load`: one run comparing, against the same hyper
//! hello upstream on loopback,
//!
//! - `direct`: the load generator talks to the upstream itself;
//! - `credproxy`: absolute-form `http://` through credproxy, bearer connection
//!   (cache hit), the built release binary as its own process;
//! - `credproxy+limits`: the same process, a connection of an integration
//!   with generous quotas (rate limits per connection and per integration,
//!   an in-flight cap) that never bite: what checking them costs;
//! - `credproxy+accesslog`: the same with the default access log (one line
//!   per request to stderr), which the other rows and nginx have off;
//! - `credproxy-shared`: the same in shared mode, a run token in
//!   `Proxy-Authorization` on every request of each keep-alive connection;
//! - `credproxy-connect`: `CONNECT` + TLS interception, HTTP/1.1 inside, to the
//!   upstream's TLS port;
//! - `nginx`: nginx (Debian package) proxying with a static `Authorization`
//!   header and an upstream keep-alive pool; marked absent if not installed;
//! - `credproxy-prod`: a shared tier as production runs it: run tokens, the
//!   `credproxy+limits` connection's quotas, the audit trail on (a line per
//!   request to stdout);
//! - `nginx+accesslog`: the same with nginx's default access log (combined
//!   format, to a file), to set beside `credproxy+accesslog`;
//! - `credproxy@50`, `nginx@50`: the pair again at each further connection
//!   count (LOAD_CONNS);
//! - `credproxy-wrk@16`, `nginx-wrk@16`, …: the pair driven by `wrk -t2`
//!   (Debian's; installed with apt-get when missing) with an absolute-form
//!   Lua script, at every connection count — an external load generator
//!   beside this bench's own hyper clients.
//!
//! Systems alternate (A B C D, A B C D, …) and each row is the median of the
//! rounds. A ratio between two systems is the median of the per-round
//! ratios: the two ran back to back, so a round that the machine's other
//! load slowed down slows both, and cancels out. CPU per request is the proxy process's utime+stime (all nginx
//! processes) from `/proc/<pid>/stat` over the run, divided by the requests
//! answered. The upstream counts requests carrying the injected header: a
//! credproxy request that arrived without it fails the run.
//!
//! Then, when valgrind is installed: user-space instructions per request of
//! credproxy and of nginx, one thread each, counted by callgrind (zeroed
//! after a warm-up, dumped after the last answer) — a deterministic number
//! where CPU time on a shared machine is not. Then: start-to-ready time of
//! the binary on the embedded-default layout, and resident memory per cached
//! connection (100k connections resolved into the cache in this process).
//! Last, every target of the run with its measured value: met or not.
//!
//! Knobs (environment): LOAD_SECS (per measurement, default 2), LOAD_CONNS
//! (client connection counts, default 16,50), LOAD_ROUNDS (default 5),
//! LOAD_CACHE_CONNECTIONS (default 100000; 0 skips start-up and memory),
//! LOAD_WORKERS (credproxy runtime threads = nginx worker processes,
//! default 2), LOAD_SYSTEMS (comma-separated subset of the rows),
//! LOAD_BASELINE_BIN (another credproxy binary, e.g. the previous commit's,
//! measured as a `baseline` row beside `credproxy` at every connection
//! count and through wrk, and under callgrind too), LOAD_CALLGRIND=0 (skip
//! the instruction counts), LOAD_CALLGRIND_DIR
//! (keep callgrind's dumps there, for `callgrind_annotate`), LOAD_ACCESS_LOG=1
//! (the `baseline` row and the callgrind runs with the access log on).
//!
//! Parts: `knobs` (the environment), `systems` (the upstream, the processes,
//! one [`systems::System`] per row), `client` (the load generator and what a
//! run measured), `statistics` (medians, paired ratios), `callgrind`
//! (instruction counts), `footprint` (start-up, memory), `report` (what is
//! printed, and the targets), `wrk` (the external load generator). Starting credproxy and reading its listening line is
//! `tests/support/process.rs`, shared with the tests.

#![allow(clippy::print_stdout, clippy::print_stderr, reason = "a bench prints its results")]

mod callgrind;
mod client;
mod footprint;
mod knobs;
#[path = "../../tests/support/process.rs"]
mod process;
mod report;
mod statistics;
mod systems;
mod wrk;

use std::path::PathBuf;

use client::{clock_ticks_per_sec, run, Sample};
use knobs::Knobs;
use systems::{Load, Setup, System};

const TOKEN: &str = "bench-token-0123456789abcdef";
const ADMIN_TOKEN: &str = "bench-admin-token-0123456789";
const ORG: &str = "org_bench";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn main() {
    // Without `--bench` (`cargo test --all-targets`) this is a smoke run:
    // every row briefly, with the same sanity checks (every credproxy
    // request carried the injected header), no timing claims.
    let knobs = Knobs::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    if knobs.smoke {
        println!("load bench smoke run (cargo bench --bench load measures)");
    }
    rt.block_on(bench(&knobs));
}

/// Setup, measure, report; then instruction counts, start-up and memory.
async fn bench(k: &Knobs) {
    let began = std::time::Instant::now();
    let tck = clock_ticks_per_sec();
    let mut setup = Setup::start(k).await;
    let systems = setup.systems(k);
    report::plan(&systems, &k.conns, k.dur.as_secs_f64(), k.rounds, k.workers, &setup.wrk);
    let samples = measure(k, &setup, &systems, tck).await;
    let mut targets = report::Targets::default();
    report::results(&systems, &samples, setup.has_nginx(), &mut targets);
    // Nothing else runs while callgrind counts.
    setup.stop_proxies();
    callgrind::section(k, &setup, tck, &mut targets).await;
    if k.cache_n >= 2 {
        footprint::section(k.cache_n, &mut targets).await;
    }
    targets.print(k.smoke);
    println!("\nthe bench ran {:.0} s (after the build)", began.elapsed().as_secs_f64());
}

/// Every round runs every system once, back to back. Each run is checked:
/// no failed request, and every request a credential-injecting system
/// forwarded reached the upstream with the credential (nginx: its static
/// header).
async fn measure(k: &Knobs, setup: &Setup, systems: &[System], tck: u64) -> Vec<Vec<Sample>> {
    let mut samples: Vec<Vec<Sample>> = systems.iter().map(|_| Vec::new()).collect();
    for round in 0..k.rounds {
        for (i, s) in systems.iter().enumerate() {
            let (t0, w0) = setup.seen.counts();
            let sample = match (s.load, &setup.wrk) {
                (Load::Own(conns), _) => run(&s.target, conns, k.dur, s.pid, tck).await,
                (Load::Wrk(conns), Ok(bin)) => {
                    wrk::run(bin, setup.dir.path(), &s.target, conns, k.dur, s.pid, tck).await
                }
                (Load::Wrk(_), Err(why)) => unreachable!("a wrk row without wrk: {why}"),
            };
            let (t1, w1) = setup.seen.counts();
            let name = &s.name;
            assert_eq!(sample.errors, 0, "{name}: {} failed requests in round {round}", sample.errors);
            if s.injects {
                let missing = (t1 - t0) - (w1 - w0);
                assert_eq!(missing, 0, "{name}: {missing} requests reached the upstream without the token");
                assert!(w1 - w0 >= sample.ok, "{name}: {} answered, only {} carried the token", sample.ok, w1 - w0);
            }
            if name.starts_with("nginx") {
                assert_eq!(w1 - w0, t1 - t0, "{name}: requests without the static header");
            }
            report::progress(round, name, &sample);
            samples[i].push(sample);
        }
    }
    samples
}
