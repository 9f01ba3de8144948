//! The standard `process_*` metrics of a Prometheus client (CPU time, resident memory, open
//! file descriptors, start time), read from `/proc/self` once a second. The exporter has no
//! process collector of its own; these are what a dashboard expects next to `tms_*`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often the gauges are read; a scrape sees values at most this old.
const EVERY: Duration = Duration::from_secs(1);

/// Describes the metrics and sets them once, so the first scrape already has them.
pub(crate) fn install() {
    metrics::describe_gauge!(
        "process_cpu_seconds_total",
        "User and system CPU time used by the process, in seconds"
    );
    metrics::describe_gauge!(
        "process_resident_memory_bytes",
        "Resident memory of the process, in bytes"
    );
    metrics::describe_gauge!("process_open_fds", "Open file descriptors of the process");
    metrics::describe_gauge!(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds"
    );
    if let Some(start) = start_time_seconds() {
        metrics::gauge!("process_start_time_seconds").set(start);
    }
    sample();
}

/// Refreshes the gauges every second until `stop`.
pub(crate) async fn run(stop: CancellationToken) {
    let mut tick = tokio::time::interval(EVERY);
    while tokio::select! {
        _ = stop.cancelled() => false,
        _ = tick.tick() => true,
    } {
        sample();
    }
}

fn sample() {
    let ticks = rustix::param::clock_ticks_per_second() as f64;
    if let Some(stat) = stat_fields()
        && let (Some(utime), Some(stime)) = (field(&stat, 14), field(&stat, 15))
    {
        metrics::gauge!("process_cpu_seconds_total").set((utime + stime) / ticks);
    }
    // statm: sizes in pages; the second is the resident set.
    if let Some(resident) = std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|t| t.split_whitespace().nth(1)?.parse::<f64>().ok())
    {
        metrics::gauge!("process_resident_memory_bytes")
            .set(resident * rustix::param::page_size() as f64);
    }
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        // Less the descriptor that reading the directory holds itself.
        let open = dir.count().saturating_sub(1);
        metrics::gauge!("process_open_fds").set(open as f64);
    }
}

/// `/proc/self/stat` split after the command name (which may hold spaces and parentheses),
/// so that field N of proc(5) is at index N - 3.
fn stat_fields() -> Option<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/stat").ok()?;
    let after_name = &text[text.rfind(')')? + 1..];
    Some(after_name.split_whitespace().map(str::to_owned).collect())
}

/// Field `n` (1-based, as numbered in proc(5)) of `/proc/self/stat`.
fn field(fields: &[String], n: usize) -> Option<f64> {
    fields.get(n.checked_sub(3)?)?.parse().ok()
}

/// Boot time (`btime` of `/proc/stat`) plus the process's start (field 22, clock ticks
/// after boot).
fn start_time_seconds() -> Option<f64> {
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    let started = field(&stat_fields()?, 22)?;
    Some(boot + started / rustix::param::clock_ticks_per_second() as f64)
}
