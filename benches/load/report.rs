//! What the bench prints: the table of rows, the ratios between systems,
//! the instruction counts.

use crate::client::Sample;
use crate::statistics::{percentile, ratios, summarize};
use crate::systems::System;

/// One line per measurement as it finishes (stderr, to watch a long run).
pub fn progress(round: usize, name: &str, s: &Sample) {
    eprintln!(
        "  round {} {name:<18} {:>8.0} req/s  cpu {:>8}  (user {:>8})  p99 {:>6} µs",
        round + 1,
        s.ok as f64 / s.secs,
        s.cpu_us.map_or("-".into(), |c| format!("{c:.1} µs")),
        s.user_us.map_or("-".into(), |c| format!("{c:.1} µs")),
        percentile(&s.latencies_us, 0.99)
    );
}

/// The header line of a run.
pub fn plan(systems: &[System], conns: usize, secs: f64, rounds: usize, workers: usize) {
    println!(
        "load: {conns} connections, {secs:.1} s per measurement, {rounds} rounds, {workers} credproxy threads / nginx workers, alternating {}",
        systems.iter().map(|s| s.name).collect::<Vec<_>>().join(" → ")
    );
}

/// The table (medians over rounds) and the ratios a run has rows for.
pub fn results(systems: &[System], samples: &[Vec<Sample>], has_nginx: bool) {
    if !has_nginx {
        println!("nginx: absent (install Debian's `nginx` to compare)");
    }
    println!();
    println!("| system | req/s | p50 µs | p99 µs | proxy CPU µs/req | of which user | proxy peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (s, v) in systems.iter().zip(samples) {
        let r = summarize(v);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {} | {} | {} |",
            s.name,
            r.rps,
            r.p50,
            r.p99,
            r.cpu.map_or("-".into(), |c| format!("{c:.1}")),
            r.user.map_or("-".into(), |c| format!("{c:.1}")),
            r.rss_kb.map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
        );
    }
    let get = |n: &str| systems.iter().position(|s| s.name == n).map(|i| samples[i].as_slice());
    println!();
    println!("ratios: median of the per-round ratios (each round runs the systems back to back)");
    if let (Some(cpx), Some(direct)) = (get("credproxy"), get("direct")) {
        let (_, p99, rps) = ratios(cpx, direct);
        println!("credproxy/direct: throughput {rps:.2}, p99 {p99:.2}");
    }
    if let (Some(limited), Some(cpx)) = (get("credproxy+limits"), get("credproxy")) {
        let (cpu, p99, rps) = ratios(limited, cpx);
        println!(
            "credproxy+limits/credproxy: CPU per request {cpu:.2} (target ≤ 1.03), p99 {p99:.2}, throughput {rps:.2}"
        );
    }
    if let (Some(shared), Some(cpx)) = (get("credproxy-shared"), get("credproxy")) {
        let (cpu, p99, rps) = ratios(shared, cpx);
        println!(
            "credproxy-shared/credproxy: CPU per request {cpu:.2} (target ≤ 1.05), p99 {p99:.2}, throughput {rps:.2}"
        );
    }
    if let (Some(cpx), Some(b)) = (get("credproxy"), get("baseline")) {
        let (cpu, p99, rps) = ratios(cpx, b);
        println!("credproxy/baseline: CPU per request {cpu:.2}, p99 {p99:.2}, throughput {rps:.2}");
    }
    let Some(n) = get("nginx") else { return };
    // A LOAD_SYSTEMS subset prints only the ratios it has rows for.
    for (name, target) in [("credproxy", true), ("credproxy+accesslog", false), ("credproxy-connect", false)] {
        let Some(r) = get(name) else { continue };
        // Each configuration against nginx configured alike.
        let logged = name == "credproxy+accesslog";
        let n = if logged { get("nginx+accesslog").unwrap_or(n) } else { n };
        let name = if logged && get("nginx+accesslog").is_some() {
            "credproxy+accesslog/nginx+accesslog".to_owned()
        } else {
            format!("{name}/nginx")
        };
        let (cpu, p99, rps) = ratios(r, n);
        let (t_cpu, t_p99) = if target { (" (target ≤ 0.80)", " (target ≤ 1.00)") } else { ("", "") };
        println!("{name}: CPU per request {cpu:.2}{t_cpu}, p99 {p99:.2}{t_p99}, throughput {rps:.2}");
    }
}

/// The callgrind counts (instructions per request).
pub fn instructions(credproxy: f64, baseline: Option<f64>, nginx: Option<f64>) {
    println!();
    match nginx {
        Some(n) => println!(
            "user-space instructions per request (callgrind, one thread each): credproxy {credproxy:.0}, nginx {n:.0}, credproxy/nginx {:.2}",
            credproxy / n
        ),
        None => println!("user-space instructions per request (callgrind, one thread): credproxy {credproxy:.0}; nginx absent"),
    }
    if let Some(b) = baseline {
        println!("baseline {b:.0} instructions per request, credproxy/baseline {:.3}", credproxy / b);
    }
}
