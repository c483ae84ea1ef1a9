//! Rows and ratios from samples: medians over rounds, and ratios as the
//! median of per-round ratios (two systems of one round ran back to back,
//! so what slowed the machine in that round slowed both).

use crate::client::Sample;

pub fn percentile(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median over rounds of `f(a) / f(b)` for the rounds' paired samples.
fn paired(a: &[Sample], b: &[Sample], f: impl Fn(&Sample) -> Option<f64>) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x).zip(f(y)).map_or(f64::NAN, |(x, y)| x / y)).collect();
    if ratios.is_empty() {
        f64::NAN
    } else {
        median(ratios)
    }
}

/// CPU per request, p99 and throughput of `a` against `b`, paired by round.
pub fn ratios(a: &[Sample], b: &[Sample]) -> (f64, f64, f64) {
    (
        paired(a, b, |s| s.cpu_us),
        paired(a, b, |s| Some(f64::from(s.p99_us))),
        paired(a, b, |s| Some(s.ok as f64 / s.secs)),
    )
}

pub struct Row {
    pub rps: f64,
    pub p50: f64,
    pub p99: f64,
    pub cpu: Option<f64>,
    pub user: Option<f64>,
    pub rss_kb: Option<u64>,
}

pub fn summarize(samples: &[Sample]) -> Row {
    Row {
        rps: median(samples.iter().map(|s| s.ok as f64 / s.secs).collect()),
        p50: median(samples.iter().map(|s| f64::from(s.p50_us)).collect()),
        p99: median(samples.iter().map(|s| f64::from(s.p99_us)).collect()),
        cpu: samples.iter().map(|s| s.cpu_us).collect::<Option<Vec<_>>>().map(median),
        user: samples.iter().map(|s| s.user_us).collect::<Option<Vec<_>>>().map(median),
        rss_kb: samples.iter().filter_map(|s| s.peak_rss_kb).max(),
    }
}
