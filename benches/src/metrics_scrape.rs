//! Reading Prometheus text-format metrics from a `basaltd` over plain HTTP.
//!
//! The request is a hand-written `HTTP/1.0` GET: HTTP/1.0 makes the server close the connection
//! after the body, so the body is simply everything after the headers, with no chunked encoding or
//! keep-alive to handle. That keeps an HTTP client dependency out of the crate for one request
//! per node per run.
//!
//! Parsing follows the text exposition format closely enough for counters, gauges and the
//! `_sum` / `_count` series of histograms: a metric's value is the sum over all its label sets,
//! which is what "the node's total" means for every metric the tools read.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

/// A whole scrape may take this long; a node that is paused or wedged must not stall a report.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// Metrics bodies are small; anything larger than this is not a `basaltd` metrics page.
const MAX_RESPONSE_BYTES: usize = 16 * 1024 * 1024;

#[derive(thiserror::Error, Debug)]
pub enum ScrapeError {
    #[error("scraping {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("scraping {addr}: no response within {SCRAPE_TIMEOUT:?}")]
    Timeout { addr: String },
    #[error("scraping {addr}: {reason}")]
    BadResponse { addr: String, reason: String },
}

/// Fetches `GET /metrics` from `addr` and returns the body.
pub async fn fetch_metrics<A>(addr: A) -> Result<String, ScrapeError>
where
    A: ToSocketAddrs + fmt::Display,
{
    let shown = addr.to_string();
    match tokio::time::timeout(SCRAPE_TIMEOUT, fetch(addr, &shown)).await {
        Ok(result) => result,
        Err(_) => Err(ScrapeError::Timeout { addr: shown }),
    }
}

async fn fetch<A: ToSocketAddrs>(addr: A, shown: &str) -> Result<String, ScrapeError> {
    let io = |source| ScrapeError::Io {
        addr: shown.to_string(),
        source,
    };
    let mut stream = TcpStream::connect(addr).await.map_err(io)?;
    let request = format!("GET /metrics HTTP/1.0\r\nHost: {shown}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    let mut response = Vec::new();
    (&mut stream)
        .take(MAX_RESPONSE_BYTES as u64 + 1)
        .read_to_end(&mut response)
        .await
        .map_err(io)?;
    if response.len() > MAX_RESPONSE_BYTES {
        return Err(ScrapeError::BadResponse {
            addr: shown.to_string(),
            reason: format!("response larger than {MAX_RESPONSE_BYTES} bytes"),
        });
    }
    http_body(&response).map_err(|reason| ScrapeError::BadResponse {
        addr: shown.to_string(),
        reason,
    })
}

/// The body of a complete HTTP/1.x response, if its status is 200.
fn http_body(response: &[u8]) -> Result<String, String> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| "response has no end of headers".to_string())?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut parts = status_line.split_whitespace();
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(format!("malformed status line {status_line:?}"));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(format!("malformed status line {status_line:?}"));
    }
    if code != "200" {
        return Err(format!("server answered {status_line:?}"));
    }
    let chunked = head.lines().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("transfer-encoding") && value.trim().eq_ignore_ascii_case("chunked")
        })
    });
    if chunked {
        return Err("chunked body in reply to an HTTP/1.0 request".into());
    }
    Ok(body.to_string())
}

/// The value of metric `name` in a text exposition, summed over all its label sets; `None` if no
/// sample of that exact name is present.
pub fn parse_metric(exposition: &str, name: &str) -> Option<f64> {
    let mut total: Option<f64> = None;
    for line in exposition.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sample_name, value)) = split_sample(line) else {
            continue;
        };
        if sample_name == name {
            *total.get_or_insert(0.0) += value;
        }
    }
    total
}

/// The value of metric `name` summed over the label sets that include `label="value"`; `None`
/// if no such sample is present.
pub fn parse_metric_labeled(exposition: &str, name: &str, label: &str, value: &str) -> Option<f64> {
    let wanted = format!("{label}=\"{value}\"");
    let mut total: Option<f64> = None;
    for line in exposition.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((sample_name, labels, v)) = split_labeled_sample(line) else {
            continue;
        };
        if sample_name == name && has_label(labels, &wanted) {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

/// Whether the label set `labels` (the text between the braces) holds exactly `pair`
/// (`name="value"`), not merely a label whose value ends with it.
fn has_label(labels: &str, pair: &str) -> bool {
    let mut at = 0;
    while let Some(found) = labels[at..].find(pair) {
        let start = at + found;
        let before = labels[..start].chars().next_back();
        if matches!(before, None | Some(',') | Some(' ')) {
            return true;
        }
        at = start + pair.len();
    }
    false
}

/// Splits `name{labels} value [timestamp]` into name and value.
fn split_sample(line: &str) -> Option<(&str, f64)> {
    split_labeled_sample(line).map(|(name, _, value)| (name, value))
}

/// Splits `name{labels} value [timestamp]` into name, the text inside the braces (empty when
/// there are none) and value.
fn split_labeled_sample(line: &str) -> Option<(&str, &str, f64)> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace()).unwrap_or(line.len());
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = "";
    if rest.starts_with('{') {
        let end = labels_end(rest)?;
        labels = &rest[1..end - 1];
        rest = &rest[end..];
    }
    let value = rest.split_whitespace().next()?;
    Some((name, labels, value.parse().ok()?))
}

/// The byte offset just past the `}` closing a label set that starts at `labels[0] == '{'`.
/// Label values may contain `}` and escaped quotes, so quoting is tracked.
fn labels_end(labels: &str) -> Option<usize> {
    let mut in_quotes = false;
    let mut escaped = false;
    for (at, c) in labels.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quotes => escaped = true,
            '"' => in_quotes = !in_quotes,
            '}' if !in_quotes => return Some(at + 1),
            _ => {}
        }
    }
    None
}

/// Fetches `addr`'s metrics and returns metric `name` (see [`parse_metric`]).
pub async fn scrape_metric<A>(addr: A, name: &str) -> Result<Option<f64>, ScrapeError>
where
    A: ToSocketAddrs + fmt::Display,
{
    Ok(parse_metric(&fetch_metrics(addr).await?, name))
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;

    const EXPOSITION: &str = r#"# HELP basalt_storage_fsyncs_total Fsyncs.
# TYPE basalt_storage_fsyncs_total counter
basalt_storage_fsyncs_total 42
# TYPE basalt_storage_entries_per_fsync histogram
basalt_storage_entries_per_fsync_bucket{le="1"} 3
basalt_storage_entries_per_fsync_bucket{le="+Inf"} 10
basalt_storage_entries_per_fsync_sum 125.5
basalt_storage_entries_per_fsync_count 10
grpc_requests_total{method="Put",odd="a}b \"q\""} 7 1700000000000
grpc_requests_total{method="Get"} 3
weird_value NaN
"#;

    #[test]
    fn parses_plain_histogram_and_labelled_samples() {
        assert_eq!(parse_metric(EXPOSITION, "basalt_storage_fsyncs_total"), Some(42.0));
        assert_eq!(
            parse_metric(EXPOSITION, "basalt_storage_entries_per_fsync_sum"),
            Some(125.5)
        );
        assert_eq!(
            parse_metric(EXPOSITION, "basalt_storage_entries_per_fsync_count"),
            Some(10.0)
        );
        // Summed over label sets, including one whose value holds `}` and escaped quotes.
        assert_eq!(parse_metric(EXPOSITION, "grpc_requests_total"), Some(10.0));
        assert_eq!(
            parse_metric(EXPOSITION, "basalt_storage_entries_per_fsync_bucket"),
            Some(13.0)
        );
        assert!(parse_metric(EXPOSITION, "weird_value").is_some_and(f64::is_nan));
    }

    #[test]
    fn labeled_samples_are_selected_by_an_exact_label() {
        let text = "basalt_peer_rpcs_sent_total{kind=\"heartbeat\"} 10\n\
                    basalt_peer_rpcs_sent_total{kind=\"append\"} 3\n\
                    basalt_peer_rpcs_sent_total{x=\"a\",kind=\"heartbeat\"} 5\n\
                    basalt_peer_rpcs_sent_total{kind=\"not_heartbeat\"} 100\n\
                    basalt_peer_rpcs_sent_totally{kind=\"heartbeat\"} 7\n";
        assert_eq!(
            parse_metric_labeled(text, "basalt_peer_rpcs_sent_total", "kind", "heartbeat"),
            Some(15.0)
        );
        assert_eq!(
            parse_metric_labeled(text, "basalt_peer_rpcs_sent_total", "kind", "append"),
            Some(3.0)
        );
        assert_eq!(
            parse_metric_labeled(text, "basalt_peer_rpcs_sent_total", "kind", "vote"),
            None
        );
        assert_eq!(parse_metric(text, "basalt_peer_rpcs_sent_total"), Some(118.0));
    }

    #[test]
    fn a_prefix_of_a_name_is_not_the_name() {
        assert_eq!(parse_metric(EXPOSITION, "basalt_storage_fsyncs"), None);
        assert_eq!(parse_metric(EXPOSITION, "basalt_storage_entries_per_fsync"), None);
        assert_eq!(parse_metric("", "x"), None);
    }

    #[test]
    fn http_body_requires_a_200() {
        assert_eq!(
            http_body(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nx 1\n").unwrap(),
            "x 1\n"
        );
        assert!(http_body(b"HTTP/1.1 404 Not Found\r\n\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(http_body(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(http_body(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n").is_err());
    }

    #[tokio::test]
    async fn scrapes_a_server_over_http_1_0() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            while !request.ends_with(b"\r\n\r\n") {
                let mut byte = [0u8; 1];
                socket.read_exact(&mut byte).await.unwrap();
                request.push(byte[0]);
            }
            let response = format!("HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n{EXPOSITION}");
            socket.write_all(response.as_bytes()).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let value = scrape_metric(addr, "basalt_storage_entries_per_fsync_sum")
            .await
            .unwrap();
        assert_eq!(value, Some(125.5));
        let request = server.await.unwrap();
        assert!(request.starts_with("GET /metrics HTTP/1.0\r\n"), "{request}");
    }

    #[tokio::test]
    async fn a_closed_port_is_an_io_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        assert!(matches!(fetch_metrics(addr).await, Err(ScrapeError::Io { .. })));
    }
}
