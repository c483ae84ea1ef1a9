//! The load bench's knobs, read once from the environment.

use std::path::PathBuf;
use std::time::Duration;

pub struct Knobs {
    /// `cargo test --all-targets` runs this without `--bench`: every row
    /// briefly, with the same sanity checks, and no timing claims.
    pub smoke: bool,
    /// Per measurement (LOAD_SECS, whole seconds, default 2).
    pub dur: Duration,
    /// Client connection counts (LOAD_CONNS, comma-separated, default
    /// "16,50"): every row at the first, credproxy and nginx at each.
    pub conns: Vec<usize>,
    /// Rounds of all systems (LOAD_ROUNDS, default 5).
    pub rounds: usize,
    /// Connections resolved into the cache for the memory figure
    /// (LOAD_CACHE_CONNECTIONS, default 100000; 0 skips start-up and memory).
    pub cache_n: usize,
    /// credproxy runtime threads = nginx worker processes (LOAD_WORKERS, default 2).
    pub workers: usize,
    /// A subset of the rows (LOAD_SYSTEMS, comma-separated).
    pub systems: Option<Vec<String>>,
    /// Another credproxy binary measured as a `baseline` row and under
    /// callgrind (LOAD_BASELINE_BIN).
    pub baseline_bin: Option<PathBuf>,
    /// LOAD_CALLGRIND=0 skips the instruction counts.
    pub callgrind: bool,
    /// Keep callgrind's dumps here (LOAD_CALLGRIND_DIR).
    pub callgrind_dir: Option<PathBuf>,
    /// LOAD_ACCESS_LOG=1: the `baseline` row and the callgrind runs with the
    /// access log on (to compare two builds' log writers).
    pub access_log: bool,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

impl Knobs {
    pub fn from_env() -> Self {
        // `cargo bench` passes `--bench`.
        let smoke = !std::env::args().any(|a| a == "--bench");
        let secs: u64 = env_or("LOAD_SECS", 2);
        Self {
            smoke,
            dur: if smoke { Duration::from_millis(300) } else { Duration::from_secs(secs) },
            conns: match std::env::var("LOAD_CONNS") {
                Ok(v) => v.split(',').map(|c| c.trim().parse().expect("LOAD_CONNS: counts like 16,50")).collect(),
                Err(_) if smoke => vec![4, 8],
                Err(_) => vec![16, 50],
            },
            rounds: if smoke { 1 } else { env_or("LOAD_ROUNDS", 5usize).max(1) },
            cache_n: if smoke { 500 } else { env_or("LOAD_CACHE_CONNECTIONS", 100_000) },
            workers: env_or("LOAD_WORKERS", 2usize).max(1),
            systems: std::env::var("LOAD_SYSTEMS").ok().map(|s| s.split(',').map(str::to_owned).collect()),
            baseline_bin: std::env::var_os("LOAD_BASELINE_BIN").map(PathBuf::from),
            callgrind: std::env::var("LOAD_CALLGRIND").as_deref() != Ok("0"),
            callgrind_dir: std::env::var_os("LOAD_CALLGRIND_DIR").map(PathBuf::from),
            access_log: std::env::var("LOAD_ACCESS_LOG").as_deref() == Ok("1"),
        }
    }

    /// The log filter of the `baseline` row and of the callgrind runs:
    /// access log off, unless LOAD_ACCESS_LOG=1 (the `credproxy+accesslog`
    /// row is then the one to set beside `baseline`).
    pub fn baseline_log(&self) -> &'static str {
        if self.access_log {
            "info"
        } else {
            "info,credproxy::access=off"
        }
    }
}
