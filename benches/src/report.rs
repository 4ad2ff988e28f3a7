//! The result of a `basalt-bench` run, as a short human-readable table or as JSON, plus the
//! number and duration formatting the demo shares.
//!
//! Invariants: the JSON field names are a machine interface (scripts compare runs with them), so
//! they only ever gain fields; units are in the names (`_us`, `_secs`, `_per_sec`). The text form
//! is for people and may change freely. Latencies are `None` rather than zero when no operation
//! succeeded, so an empty run never reads as an infinitely fast one.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latency percentiles of the successful measured operations, in microseconds.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LatencySummary {
    pub p50_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

impl LatencySummary {
    /// `None` for an empty histogram.
    pub fn from_histogram(histogram: &Histogram<u64>) -> Option<Self> {
        if histogram.is_empty() {
            return None;
        }
        Some(LatencySummary {
            p50_us: histogram.value_at_quantile(0.50),
            p99_us: histogram.value_at_quantile(0.99),
            p999_us: histogram.value_at_quantile(0.999),
            max_us: histogram.max(),
            mean_us: histogram.mean(),
        })
    }
}

/// What the servers did during the measurement window, from their Prometheus metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ServerStats {
    /// Raft log entries made durable per fsync, over all scraped nodes: the group-commit factor.
    /// `None` if no fsync happened in the window.
    pub entries_per_fsync: Option<f64>,
    /// Fsyncs per second, summed over all scraped nodes.
    pub fsyncs_per_sec: f64,
    pub nodes_scraped: usize,
    /// Reads each scraped node served (from its replicas, in any mode) during the window, in
    /// the order the nodes were given: how reads spread over the replicas.
    pub reads_served_per_node: Vec<u64>,
}

/// One run's result.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BenchReport {
    /// The keyspace the run used; `None` is the default keyspace.
    pub keyspace: Option<String>,
    /// Its shards when the run started (known only when `keyspace` is set).
    pub shards: Option<u32>,
    pub workload: String,
    pub read_ratio: f64,
    /// The read mode the workload's reads asked for; `None`: the keyspace's default.
    pub read_mode: Option<String>,
    /// What was measured, e.g. "local cluster of 3 nodes" or "3 endpoints".
    pub target: String,
    pub clients: usize,
    pub connections: usize,
    pub value_size: usize,
    pub keys: u64,
    pub seed: u64,
    pub warmup_secs: f64,
    pub duration_secs: f64,
    /// Successful operations inside the measurement window.
    pub ops: u64,
    /// Failed operations inside the measurement window.
    pub errors: u64,
    pub first_error: Option<String>,
    pub throughput_ops_per_sec: f64,
    pub latency: Option<LatencySummary>,
    pub server: Option<ServerStats>,
    /// Why `server` is missing, when it is.
    pub server_note: Option<String>,
}

impl BenchReport {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .expect("BenchReport holds only strings, numbers and options, which always serialise")
    }

    pub fn render_text(&self) -> String {
        let mut workload = if self.workload == "mixed" {
            format!("mixed ({:.0}% reads)", self.read_ratio * 100.0)
        } else {
            self.workload.clone()
        };
        if let Some(mode) = &self.read_mode {
            workload += &format!(" ({mode} reads)");
        }
        let keyspace = match (&self.keyspace, self.shards) {
            (Some(k), Some(n)) => format!(", keyspace {k} ({n} shards)"),
            (Some(k), None) => format!(", keyspace {k}"),
            _ => String::new(),
        };
        let mut out = format!(
            "basalt-bench: {workload} on {}{keyspace}, {} clients over {} connections, {}-byte values, {} keys\n\
             measured {} after {} of warm-up (seed {})\n\n",
            self.target,
            self.clients,
            self.connections,
            self.value_size,
            group_thousands(self.keys),
            format_duration(Duration::from_secs_f64(self.duration_secs)),
            format_duration(Duration::from_secs_f64(self.warmup_secs)),
            self.seed,
        );
        out += &format!(
            "  throughput  {} ops/s  ({} ops)\n",
            group_thousands(self.throughput_ops_per_sec.round() as u64),
            group_thousands(self.ops)
        );
        match &self.latency {
            Some(l) => {
                out += &format!(
                    "  latency     p50 {}  p99 {}  p99.9 {}  max {}\n",
                    format_micros(l.p50_us),
                    format_micros(l.p99_us),
                    format_micros(l.p999_us),
                    format_micros(l.max_us)
                );
            }
            None => out += "  latency     n/a (no operation succeeded)\n",
        }
        match &self.first_error {
            Some(first) if self.errors > 0 => {
                out += &format!("  errors      {}  (first: {first})\n", group_thousands(self.errors));
            }
            _ => out += &format!("  errors      {}\n", group_thousands(self.errors)),
        }
        match (&self.server, &self.server_note) {
            (Some(server), _) => {
                let per_fsync = server
                    .entries_per_fsync
                    .map_or_else(|| "n/a".to_string(), |e| format!("{e:.2}"));
                out += &format!(
                    "  server      {per_fsync} entries per fsync, {} fsyncs/s over {} nodes\n",
                    group_thousands(server.fsyncs_per_sec.round() as u64),
                    server.nodes_scraped
                );
                let reads: u64 = server.reads_served_per_node.iter().sum();
                if reads > 0 {
                    let shares: Vec<String> = server
                        .reads_served_per_node
                        .iter()
                        .map(|n| format!("{:.0} %", *n as f64 * 100.0 / reads as f64))
                        .collect();
                    out += &format!("  reads       served per node: {}\n", shares.join(" / "));
                }
            }
            (None, Some(note)) => out += &format!("  server      n/a ({note})\n"),
            (None, None) => out += "  server      n/a\n",
        }
        out
    }
}

/// `1234567` as `1,234,567`.
pub fn group_thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

/// A latency in the unit that keeps three significant figures readable: `850us`, `1.23ms`, `2.50s`.
pub fn format_micros(us: u64) -> String {
    if us < 1_000 {
        format!("{us}us")
    } else if us < 1_000_000 {
        format!("{:.2}ms", us as f64 / 1e3)
    } else {
        format!("{:.2}s", us as f64 / 1e6)
    }
}

/// A wall-clock span for people: `850ms`, `1.2s`, `2m05s`.
pub fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    if millis < 1_000 {
        format!("{millis}ms")
    } else if millis < 60_000 {
        format!("{:.1}s", duration.as_secs_f64())
    } else {
        let secs = duration.as_secs();
        format!("{}m{:02}s", secs / 60, secs % 60)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> BenchReport {
        BenchReport {
            keyspace: None,
            shards: None,
            workload: "mixed".into(),
            read_ratio: 0.5,
            read_mode: None,
            target: "local cluster of 3 nodes".into(),
            clients: 64,
            connections: 4,
            value_size: 128,
            keys: 10_000,
            seed: 42,
            warmup_secs: 2.0,
            duration_secs: 10.0,
            ops: 123_456,
            errors: 0,
            first_error: None,
            throughput_ops_per_sec: 12_345.6,
            latency: Some(LatencySummary {
                p50_us: 850,
                p99_us: 4_560,
                p999_us: 12_345,
                max_us: 2_500_000,
                mean_us: 1_000.0,
            }),
            server: Some(ServerStats {
                entries_per_fsync: Some(7.456),
                fsyncs_per_sec: 1_234.4,
                nodes_scraped: 3,
                reads_served_per_node: vec![50, 25, 25],
            }),
            server_note: None,
        }
    }

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(group_thousands(0), "0");
        assert_eq!(group_thousands(999), "999");
        assert_eq!(group_thousands(1_000), "1,000");
        assert_eq!(group_thousands(123_456), "123,456");
        assert_eq!(group_thousands(1_234_567), "1,234,567");
        assert_eq!(group_thousands(u64::MAX), "18,446,744,073,709,551,615");
    }

    #[test]
    fn latencies_pick_a_readable_unit() {
        assert_eq!(format_micros(850), "850us");
        assert_eq!(format_micros(1_234), "1.23ms");
        assert_eq!(format_micros(2_500_000), "2.50s");
        assert_eq!(format_duration(Duration::from_millis(850)), "850ms");
        assert_eq!(format_duration(Duration::from_millis(1_250)), "1.2s");
        assert_eq!(format_duration(Duration::from_secs(125)), "2m05s");
    }

    #[test]
    fn text_report_shows_every_headline_number() {
        let text = sample_report().render_text();
        for expected in [
            "mixed (50% reads) on local cluster of 3 nodes",
            "64 clients over 4 connections",
            "128-byte values, 10,000 keys",
            "measured 10.0s after 2.0s of warm-up (seed 42)",
            "throughput  12,346 ops/s  (123,456 ops)",
            "p50 850us  p99 4.56ms  p99.9 12.35ms  max 2.50s",
            "errors      0\n",
            "7.46 entries per fsync, 1,234 fsyncs/s over 3 nodes",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn text_report_explains_what_is_missing() {
        let mut report = sample_report();
        report.workload = "put".into();
        report.ops = 0;
        report.errors = 3;
        report.first_error = Some("deadline exceeded".into());
        report.latency = None;
        report.server = None;
        report.server_note = Some("pass --metrics to read server metrics".into());
        let text = report.render_text();
        assert!(text.starts_with("basalt-bench: put on"), "{text}");
        assert!(text.contains("latency     n/a (no operation succeeded)"), "{text}");
        assert!(text.contains("errors      3  (first: deadline exceeded)"), "{text}");
        assert!(
            text.contains("server      n/a (pass --metrics to read server metrics)"),
            "{text}"
        );
    }

    #[test]
    fn json_report_has_stable_field_names() {
        let json: serde_json::Value = serde_json::from_str(&sample_report().to_json()).unwrap();
        assert_eq!(json["throughput_ops_per_sec"], 12_345.6);
        assert_eq!(json["latency"]["p99_us"], 4_560);
        assert_eq!(json["latency"]["p999_us"], 12_345);
        assert_eq!(json["server"]["entries_per_fsync"], 7.456);
        assert_eq!(json["errors"], 0);
        assert_eq!(json["ops"], 123_456);
        assert!(json["first_error"].is_null());
    }

    #[test]
    fn latency_summary_of_a_histogram() {
        let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap();
        assert_eq!(LatencySummary::from_histogram(&histogram), None);
        for us in 1..=1000 {
            histogram.record(us).unwrap();
        }
        let summary = LatencySummary::from_histogram(&histogram).unwrap();
        assert_eq!(summary.p50_us, 500);
        assert_eq!(summary.p99_us, 990);
        assert_eq!(summary.p999_us, 999);
        assert_eq!(summary.max_us, 1000);
    }
}
