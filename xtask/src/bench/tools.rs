//! The load tools, run inside a client pod, and the parsing of what they print: `iperf3`
//! (throughput), `sockperf` (round trip), `wrk` (new connections, the server closes; and
//! requests on keep-alive connections), `ambit-probe crr` (new connections, the client
//! closes) and `ambit-hold` (idle connections). Every run is bounded by `timeout`; a tool that fails, or whose output
//! lacks the figure, is an error naming the command line.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, ChildStdin, Command, Stdio},
    time::Duration,
};

use ambit_tests::{Node, Pod, command_line};
use anyhow::{Context as _, bail};
use serde_json::Value;

pub const IPERF3_PORT: u16 = 5201;
pub const SOCKPERF_PORT: u16 = 11111;
pub const HTTP_PORT: u16 = 8000;
pub const HOLD_PORT: u16 = 9000;
/// sockperf's smallest message: its own header (sequence number, flags) is 14 bytes, and it
/// refuses `-m 1`. The round trip of 14 bytes is that of 1 byte for all we can measure.
pub const SOCKPERF_MESSAGE: u32 = 14;
/// File descriptors for `ambit-hold`: one per held connection plus a margin.
pub const HOLD_NOFILE: &str = "--nofile=4096";
/// Seconds a tool may take beyond its own duration (connects, warm-up, report).
const GRACE: u64 = 30;

/// Starts the servers every tool talks to in `server`: httpbin, iperf3, sockperf and
/// `ambit-hold serve`.
pub fn start_servers(node: &mut Node, server: &Pod) -> anyhow::Result<()> {
    node.serve_http(server, HTTP_PORT)?;
    start_iperf3(node, server)?;
    let ip = server.ip.to_string();
    let port = SOCKPERF_PORT.to_string();
    node.serve(
        server,
        "sockperf",
        &["server", "--tcp", "-i", &ip, "-p", &port],
        SOCKPERF_PORT,
    )?;
    // 1,000 held connections need more descriptors than the usual soft limit of 1,024.
    let hold = node.binaries.hold.to_string_lossy().into_owned();
    node.serve(
        server,
        "prlimit",
        &[HOLD_NOFILE, &hold, "serve", &HOLD_PORT.to_string()],
        HOLD_PORT,
    )
}

/// Starts an `iperf3` server in `server`.
pub fn start_iperf3(node: &mut Node, server: &Pod) -> anyhow::Result<()> {
    node.serve(
        server,
        "iperf3",
        &["-s", "-p", &IPERF3_PORT.to_string()],
        IPERF3_PORT,
    )
}

/// What `iperf3 -J` measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Throughput {
    /// Received by the server, all streams together.
    pub bits_per_second: f64,
    pub bytes: f64,
}

/// `iperf3` from `client` to `server` with `streams` parallel streams for `seconds`.
pub fn iperf3(
    node: &Node,
    client: &Pod,
    server: Ipv4Addr,
    streams: u32,
    seconds: u32,
) -> anyhow::Result<Throughput> {
    let mut cmd = in_pod(node, client, "iperf3", seconds);
    cmd.args(["-J", "--connect-timeout", "3000", "-c", &server.to_string()])
        .args(["-p", &IPERF3_PORT.to_string()])
        .args(["-P", &streams.to_string(), "-t", &seconds.to_string()]);
    // iperf3 -J reports its errors in the JSON on stdout, so parse before checking status.
    let output = cmd
        .output()
        .with_context(|| format!("cannot run {}", command_line(&cmd)))?;
    parse_iperf3(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("{} ({})", command_line(&cmd), output.status))
}

pub fn parse_iperf3(json: &str) -> anyhow::Result<Throughput> {
    let report: Value = serde_json::from_str(json).context("output is not JSON")?;
    if let Some(error) = report["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let received = &report["end"]["sum_received"];
    match (
        received["bits_per_second"].as_f64(),
        received["bytes"].as_f64(),
    ) {
        (Some(bits_per_second), Some(bytes)) => Ok(Throughput {
            bits_per_second,
            bytes,
        }),
        _ => bail!("no end.sum_received.bits_per_second and bytes in the report"),
    }
}

/// Round trip times reported by `sockperf ping-pong --full-rtt`, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundTrip {
    pub median_us: f64,
    pub p99_us: f64,
    /// Round trips of the whole run, warm-up included: what the agent's CPU over the run
    /// is divided by.
    pub round_trips: f64,
}

pub fn sockperf(
    node: &Node,
    client: &Pod,
    server: Ipv4Addr,
    seconds: u32,
) -> anyhow::Result<RoundTrip> {
    // sockperf spends 400 ms warming up and drops the edges of the run; in 1 s it may
    // keep no observation at all.
    let seconds = seconds.max(2);
    let mut cmd = in_pod(node, client, "sockperf", seconds);
    cmd.args(["ping-pong", "--tcp", "--full-rtt"])
        .args(["-i", &server.to_string(), "-p", &SOCKPERF_PORT.to_string()])
        .args([
            "-m",
            &SOCKPERF_MESSAGE.to_string(),
            "-t",
            &seconds.to_string(),
        ]);
    // sockperf exits 0 even on bad arguments: the parse is what tells success.
    let output = ambit_tests::check(&mut cmd)?;
    parse_sockperf(&String::from_utf8_lossy(&output.stdout)).with_context(|| command_line(&cmd))
}

pub fn parse_sockperf(text: &str) -> anyhow::Result<RoundTrip> {
    // Lines look like `sockperf: ---> percentile 50.000 =   80.069`.
    let percentile = |which: &str| -> anyhow::Result<f64> {
        let prefix = format!("percentile {which} =");
        text.lines()
            .find_map(|line| line.split_once(&prefix).map(|(_, v)| v.trim()))
            .with_context(|| format!("no `{prefix}` line in sockperf's output:\n{text}"))?
            .parse()
            .with_context(|| format!("sockperf's {prefix} is not a number"))
    };
    // `sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; SentMessages=23157;
    // ReceivedMessages=23156`.
    let round_trips = text
        .lines()
        .filter(|line| line.contains("[Total Run]"))
        .find_map(|line| line.split_once("ReceivedMessages=").map(|(_, v)| v.trim()))
        .context("no `[Total Run] ... ReceivedMessages=` line in sockperf's output")?
        .parse()
        .context("sockperf's ReceivedMessages is not a number")?;
    Ok(RoundTrip {
        median_us: percentile("50.000")?,
        p99_us: percentile("99.000")?,
        round_trips,
    })
}

/// What a `wrk` run did: requests per second and in all. With `Connection: close` (see
/// [`wrk`]) each request is one connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WrkRate {
    pub per_second: f64,
    pub requests: f64,
}

/// Concurrent connections wrk keeps opening; enough to keep two cores busy, few enough
/// that the rate is bound by connection setup rather than by queueing.
const WRK_CONNECTIONS: &str = "4";

pub fn wrk(node: &Node, client: &Pod, server: Ipv4Addr, seconds: u32) -> anyhow::Result<WrkRate> {
    let mut cmd = in_pod(node, client, "wrk", seconds);
    cmd.args([
        "-t",
        "1",
        "-c",
        WRK_CONNECTIONS,
        "-d",
        &format!("{seconds}s"),
    ])
    .args(["-H", "Connection: close"])
    .arg(format!("http://{server}:{HTTP_PORT}/"));
    let output = ambit_tests::check(&mut cmd)?;
    parse_wrk(&String::from_utf8_lossy(&output.stdout)).with_context(|| command_line(&cmd))
}

/// Keep-alive connections of [`wrk_keepalive`] and wrk's threads: enough concurrent
/// requests to keep the server and the proxy busy on two cores.
const WRK_KEEPALIVE_CONNECTIONS: &str = "8";
const WRK_KEEPALIVE_THREADS: &str = "2";
/// The route [`wrk_keepalive`] requests: httpbin's `/ip` (a small JSON body).
pub const HTTP_KEEPALIVE_PATH: &str = "/ip";

/// `wrk` with keep-alive (HTTP/1.1, its default): a few connections, each sending request
/// after request for `seconds`, with `headers` (`Name: value`) on every request.
pub fn wrk_keepalive(
    node: &Node,
    client: &Pod,
    server: Ipv4Addr,
    seconds: u32,
    headers: &[&str],
) -> anyhow::Result<WrkRate> {
    let mut cmd = in_pod(node, client, "wrk", seconds);
    cmd.args(["-t", WRK_KEEPALIVE_THREADS, "-c", WRK_KEEPALIVE_CONNECTIONS])
        .args(["-d", &format!("{seconds}s")]);
    for header in headers {
        cmd.args(["-H", header]);
    }
    cmd.arg(format!("http://{server}:{HTTP_PORT}{HTTP_KEEPALIVE_PATH}"));
    let output = ambit_tests::check(&mut cmd)?;
    parse_wrk(&String::from_utf8_lossy(&output.stdout)).with_context(|| command_line(&cmd))
}

pub fn parse_wrk(text: &str) -> anyhow::Result<WrkRate> {
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix));
    let per_second: f64 = field("Requests/sec:")
        .with_context(|| format!("no Requests/sec in wrk's output:\n{text}"))?
        .trim()
        .parse()
        .context("wrk's Requests/sec is not a number")?;
    // `31481 requests in 2.10s, 4.14MB read`
    let requests: f64 = text
        .lines()
        .find_map(|l| l.split_once(" requests in ").map(|(n, _)| n.trim()))
        .with_context(|| format!("no `N requests in` line in wrk's output:\n{text}"))?
        .parse()
        .context("wrk's request count is not a number")?;
    // A refused or reset connection is counted in `Socket errors`, an HTTP error in
    // `Non-2xx`; either means the path was broken, and the rate would measure failures.
    if let Some(line) = text
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"))
    {
        bail!("wrk saw failures: {}", line.trim());
    }
    Ok(WrkRate {
        per_second,
        requests,
    })
}

/// What `ambit-probe crr` measured: netperf's `TCP_CRR` (connect, 1-byte request, 1-byte
/// reply, the client closes), one connection at a time, against `ambit-hold serve`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Crr {
    pub per_second: f64,
    pub connections: f64,
    /// Connect to reply, per connection.
    pub median_us: f64,
    pub p99_us: f64,
}

/// `ambit-probe crr` from `client` to the server pod's echo server. The client closes each
/// connection: the case `wrk` (where the server closes first) cannot show, such as a small
/// write of the proxy's held back by Nagle's algorithm until the client's delayed ACK.
pub fn crr(node: &Node, client: &Pod, server: Ipv4Addr, seconds: u32) -> anyhow::Result<Crr> {
    let mut cmd = in_pod(
        node,
        client,
        &node.binaries.probe.to_string_lossy(),
        seconds,
    );
    cmd.args(["crr", &format!("{server}:{HOLD_PORT}")]).args([
        "--seconds",
        &seconds.to_string(),
        "--timeout-ms",
        "3000",
    ]);
    let output = ambit_tests::check(&mut cmd)?;
    parse_crr(&String::from_utf8_lossy(&output.stdout)).with_context(|| command_line(&cmd))
}

pub fn parse_crr(json: &str) -> anyhow::Result<Crr> {
    let report: Value = serde_json::from_str(json.trim()).context("output is not JSON")?;
    let field = |name: &str| {
        report[name]
            .as_f64()
            .with_context(|| format!("no {name} in {json}"))
    };
    // A failed connection means the path was broken: the rate would measure failures.
    if field("failed")? > 0.0 {
        bail!("ambit-probe crr saw failures: {json}");
    }
    Ok(Crr {
        per_second: field("per_second")?,
        connections: field("connections")?,
        median_us: field("p50_us")?,
        p99_us: field("p99_us")?,
    })
}

/// `ambit-hold connect` in a client pod, holding its connections until dropped.
pub struct Held {
    child: Child,
    /// Closing it tells `ambit-hold` to let go.
    stdin: Option<ChildStdin>,
}

/// Seconds `ambit-hold` keeps its connections if nobody closes its stdin.
const HOLD_SECONDS: u64 = 60;

/// Opens `count` connections from `client` to the server pod's `ambit-hold serve`; returns
/// once each has echoed a byte, so every hop of the path is established.
pub fn hold(node: &Node, client: &Pod, server: Ipv4Addr, count: u32) -> anyhow::Result<Held> {
    let mut cmd = node.command(client, "timeout");
    cmd.args(["--kill-after=5", &(HOLD_SECONDS + 10).to_string()])
        .args(["prlimit", HOLD_NOFILE])
        .arg(&node.binaries.hold)
        .arg("connect")
        .arg(format!("{server}:{HOLD_PORT}"))
        .args([count.to_string(), HOLD_SECONDS.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let line = command_line(&cmd);
    let mut child = cmd.spawn().with_context(|| format!("cannot run {line}"))?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take().context("stdout is piped")?;
    let mut held = Held { child, stdin };
    // The read ends at the latest when `timeout` kills ambit-hold.
    let mut ready = String::new();
    BufReader::new(stdout).read_line(&mut ready)?;
    if ready.trim() != format!("ready {count}") {
        let status = held.child.wait()?;
        bail!("{line} did not open its connections ({status}); it printed {ready:?}");
    }
    Ok(held)
}

impl Drop for Held {
    fn drop(&mut self) {
        drop(self.stdin.take());
        // ambit-hold exits once stdin closes; `timeout` bounds the wait regardless.
        let _ = self.child.wait();
    }
}

/// The first line each tool prints about its version.
pub fn versions() -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (program, flag) in [
        ("iperf3", "--version"),
        ("sockperf", "--version"),
        ("wrk", "--version"),
    ] {
        let mut cmd = Command::new(program);
        cmd.arg(flag);
        // wrk prints its version with its usage and exits 1: only the text matters.
        let output = cmd
            .output()
            .with_context(|| format!("cannot run {}", command_line(&cmd)))?;
        let text = [output.stdout, output.stderr].concat();
        let first = String::from_utf8_lossy(&text)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_owned)
            .with_context(|| format!("{} printed nothing", command_line(&cmd)))?;
        lines.push(first);
    }
    Ok(lines)
}

/// `program` in `pod`, killed if it runs `GRACE` seconds past its own `seconds`.
fn in_pod(node: &Node, pod: &Pod, program: &str, seconds: u32) -> Command {
    let limit = Duration::from_secs(u64::from(seconds) + GRACE);
    let mut cmd = node.command(pod, "timeout");
    cmd.args(["--kill-after=5", &limit.as_secs().to_string(), program]);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iperf3_report_gives_received_rate_and_bytes() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bytes":2000,"bits_per_second":9.0},
            "sum_received":{"bytes":1000,"bits_per_second":8.5e9}}}"#;
        assert_eq!(
            parse_iperf3(json).unwrap(),
            Throughput {
                bits_per_second: 8.5e9,
                bytes: 1000.0
            }
        );
    }

    #[test]
    fn iperf3_error_is_reported() {
        let json =
            r#"{"start":{},"end":{},"error":"unable to connect to server: Connection refused"}"#;
        let error = parse_iperf3(json).unwrap_err().to_string();
        assert!(error.contains("Connection refused"), "{error}");
    }

    #[test]
    fn sockperf_percentiles_and_round_trips_are_read_through_colour_codes() {
        let text = "sockperf: [Total Run] RunTime=1.000 sec; Warm up time=400 msec; \
            SentMessages=23157; ReceivedMessages=23156\n\
            sockperf: [Valid Duration] RunTime=0.551 sec; SentMessages=14245; ReceivedMessages=14245\n\
            sockperf: \x1b[2;35m====> avg-rtt=76.953 (std-dev=114.194)\x1b[0m\n\
            sockperf: ---> percentile 99.000 =  150.864\n\
            sockperf: ---> percentile 90.000 =  104.425\n\
            sockperf: ---> percentile 50.000 =   80.069\n";
        assert_eq!(
            parse_sockperf(text).unwrap(),
            RoundTrip {
                median_us: 80.069,
                p99_us: 150.864,
                round_trips: 23156.0,
            }
        );
    }

    #[test]
    fn sockperf_without_percentiles_fails() {
        assert!(parse_sockperf("sockperf: '-m' Invalid message size: 1 (min: 14)\n").is_err());
    }

    #[test]
    fn wrk_rate_and_count() {
        let text = "Running 2s test @ http://10.44.0.3:8000/\n  31481 requests in 2.10s, 4.14MB read\n\
            Requests/sec:  14989.31\nTransfer/sec:      1.97MB\n";
        assert_eq!(
            parse_wrk(text).unwrap(),
            WrkRate {
                per_second: 14989.31,
                requests: 31481.0
            }
        );
    }

    #[test]
    fn crr_report_and_failures() {
        let json = r#"{"connections":2000,"failed":0,"max_us":3000.0,"p50_us":420.5,"p99_us":600.0,"per_second":1999.5}"#;
        assert_eq!(
            parse_crr(json).unwrap(),
            Crr {
                per_second: 1999.5,
                connections: 2000.0,
                median_us: 420.5,
                p99_us: 600.0
            }
        );
        let failed = json.replace(r#""failed":0"#, r#""failed":3"#);
        assert!(parse_crr(&failed).is_err());
    }

    #[test]
    fn wrk_socket_errors_fail() {
        let text = "  10 requests in 1.00s, 1KB read\n  Socket errors: connect 5, read 0, write 0, timeout 0\n\
            Requests/sec:  10.00\n";
        let error = parse_wrk(text).unwrap_err().to_string();
        assert!(error.contains("connect 5"), "{error}");
    }
}
