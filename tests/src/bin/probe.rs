//! The clients (and one server) the security tests need where real tools cannot play them.
//! Every client prints JSON lines on stdout and ends by itself.
//!
//! - `ambit-probe connect ADDR [--mark M] [--send TEXT] [--timeout-ms N]`: one TCP
//!   connection, from a socket with `SO_MARK` = M when asked (needs `CAP_NET_RAW`); sends
//!   TEXT (`\r` and `\n` escapes understood) and reads until the peer closes or the timeout.
//!   Prints `{"connected", "answered", "bytes", "error"}`: `answered` is true when any
//!   byte came back, `error` the kind of the first failure (`refused`, `reset`,
//!   `timed out`, ...) or null.
//! - `ambit-probe hammer ADDR --seconds S [--timeout-ms N]`: connect, send
//!   `GET /ip HTTP/1.0`, read, close, as fast as it can for S seconds (at most 1,000,000
//!   times). Prints `{"attempts", "connected", "answered"}`.
//! - `ambit-probe crr ADDR --seconds S [--timeout-ms N]`: netperf's `TCP_CRR` against an
//!   echo server (`ambit-hold serve`): connect, send one byte, read it back, close (the
//!   client closes, with a reset so that no TIME_WAIT runs the client out of ports), again
//!   and again for S seconds (at most 1,000,000 times). Prints `{"connections", "failed",
//!   "errors" (the first five failures: when, in ms from the start, and the error),
//!   "per_second", "p50_us", "p99_us", "max_us"}`, times from connect to the reply.
//! - `ambit-probe open ADDR N --hold-seconds S [--echo] [--ping-ms P] [--timeout-ms N]`:
//!   opens N connections at once and holds them idle, sending nothing unless `--echo`
//!   (then one byte each, and waits for it to come back). Prints
//!   `{"event": "opened", "connected", "echoed", "failed"}` once every attempt has ended,
//!   then `{"event": "done", "closed", "reset", "first_closed_ms", "last_closed_ms",
//!   "pings", "min_last_echo_ms"}` when every connection was closed by the peer or S
//!   seconds passed, times counted from the first line; `reset` counts the connections
//!   that ended with a reset rather than an end of stream. With `--ping-ms`, each
//!   connection sends one byte every P ms and waits (the timeout) for it to come back, as
//!   long as it lives: `pings` counts the echoes, `min_last_echo_ms` is the earliest, over
//!   the connections, of the time of their last echo (how long every one kept working).
//!   Run it with a raised `prlimit --nofile` for large N.
//! - `ambit-probe sink PORT`: listens on `[::]:PORT` (IPv4 and IPv6), accepts, reads and
//!   never answers: a peer that stalls every handshake.

use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{Ipv6Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const USAGE: &str = "usage: ambit-probe connect ADDR [--mark M] [--send TEXT] [--timeout-ms N]
       ambit-probe hammer ADDR --seconds S [--timeout-ms N]
       ambit-probe crr ADDR --seconds S [--timeout-ms N]
       ambit-probe open ADDR N --hold-seconds S [--echo] [--ping-ms P] [--timeout-ms N]
       ambit-probe sink PORT";
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);
const MAX_HAMMER_ATTEMPTS: u64 = 1_000_000;
const HTTP_REQUEST: &[u8] = b"GET /ip HTTP/1.0\r\n\r\n";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (command, rest) = args.split_first().context(USAGE)?;
    let mut options = Options::parse(rest)?;
    match command.as_str() {
        "connect" => {
            let addr = options.addr()?;
            let report = connect(
                addr,
                options.mark,
                options.send.as_deref().map(unescape).as_deref(),
                options.timeout,
            );
            println!("{report}");
        }
        "hammer" => {
            let addr = options.addr()?;
            let seconds = options.seconds.context("hammer needs --seconds")?;
            println!("{}", hammer(addr, seconds, options.timeout));
        }
        "crr" => {
            let addr = options.addr()?;
            let seconds = options.seconds.context("crr needs --seconds")?;
            println!("{}", crr(addr, seconds, options.timeout));
        }
        "open" => {
            let addr = options.addr()?;
            let count: usize = options.positional(1, "N")?.parse().context("N")?;
            let hold = options.seconds.context("open needs --hold-seconds")?;
            let held = Holding {
                hold,
                echo: options.echo,
                ping: options.ping,
                timeout: options.timeout,
            };
            open(addr, count, &held)?;
        }
        "sink" => sink(options.positional(0, "PORT")?.parse().context("PORT")?)?,
        _ => bail!("{USAGE}"),
    }
    Ok(())
}

/// The command line after the subcommand.
#[derive(Default)]
struct Options {
    positional: Vec<String>,
    mark: Option<u32>,
    send: Option<String>,
    timeout: Duration,
    seconds: Option<Duration>,
    echo: bool,
    ping: Option<Duration>,
}

impl Options {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut options = Self {
            timeout: DEFAULT_TIMEOUT,
            ..Self::default()
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            let mut value =
                |name: &str| args.next().with_context(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--mark" => options.mark = Some(parse_u32(value("--mark")?)?),
                "--send" => options.send = Some(value("--send")?.clone()),
                "--timeout-ms" => {
                    options.timeout = Duration::from_millis(value("--timeout-ms")?.parse()?);
                }
                "--seconds" | "--hold-seconds" => {
                    options.seconds = Some(Duration::from_secs_f64(value(arg)?.parse()?));
                }
                "--echo" => options.echo = true,
                "--ping-ms" => {
                    options.ping = Some(Duration::from_millis(value("--ping-ms")?.parse()?));
                }
                flag if flag.starts_with("--") => bail!("unknown option {flag}\n{USAGE}"),
                _ => options.positional.push(arg.clone()),
            }
        }
        Ok(options)
    }

    fn positional(&self, index: usize, name: &str) -> anyhow::Result<&str> {
        self.positional
            .get(index)
            .map(String::as_str)
            .with_context(|| format!("missing {name}\n{USAGE}"))
    }

    fn addr(&mut self) -> anyhow::Result<SocketAddr> {
        self.positional(0, "ADDR")?
            .parse()
            .context("ADDR is IP:PORT or [IPv6]:PORT")
    }
}

/// A number in decimal or `0x` hexadecimal.
fn parse_u32(text: &str) -> anyhow::Result<u32> {
    match text.strip_prefix("0x") {
        Some(hex) => u32::from_str_radix(hex, 16).context("hexadecimal mark"),
        None => text.parse().context("mark"),
    }
}

fn unescape(text: &str) -> Vec<u8> {
    text.replace("\\r", "\r").replace("\\n", "\n").into_bytes()
}

/// A short name for what went wrong, stable enough for a test to read.
fn kind(error: &std::io::Error) -> String {
    match error.kind() {
        ErrorKind::ConnectionRefused => "refused".into(),
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted => "reset".into(),
        ErrorKind::TimedOut | ErrorKind::WouldBlock => "timed out".into(),
        _ => error.to_string(),
    }
}

fn connect(
    addr: SocketAddr,
    mark: Option<u32>,
    send: Option<&[u8]>,
    timeout: Duration,
) -> serde_json::Value {
    let (mut connected, mut bytes) = (false, 0);
    let result = (|| -> std::io::Result<()> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        if let Some(mark) = mark {
            socket.set_mark(mark)?;
        }
        socket.connect_timeout(&addr.into(), timeout)?;
        connected = true;
        let mut stream = TcpStream::from(socket);
        bytes = exchange(&mut stream, send.unwrap_or_default(), timeout)?;
        Ok(())
    })();
    json!({
        "connected": connected,
        "answered": bytes > 0,
        "bytes": bytes,
        "error": result.err().map(|e| kind(&e)),
    })
}

/// Sends `request` and reads until the peer closes, `timeout` passes without data, or an
/// error; returns the bytes read, or the error when nothing was read.
fn exchange(stream: &mut TcpStream, request: &[u8], timeout: Duration) -> std::io::Result<usize> {
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    if !request.is_empty() {
        stream.write_all(request)?;
    }
    let mut total = 0;
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(_) if total > 0 => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

fn hammer(addr: SocketAddr, seconds: Duration, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    let (mut attempts, mut connected, mut answered) = (0u64, 0u64, 0u64);
    while start.elapsed() < seconds && attempts < MAX_HAMMER_ATTEMPTS {
        attempts += 1;
        let Ok(mut stream) = TcpStream::connect_timeout(&addr, timeout) else {
            continue;
        };
        connected += 1;
        if exchange(&mut stream, HTTP_REQUEST, timeout).is_ok_and(|n| n > 0) {
            answered += 1;
        }
        // Close with a reset: no TIME_WAIT, so a long run never runs out of ports.
        let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    json!({ "attempts": attempts, "connected": connected, "answered": answered })
}

fn crr(addr: SocketAddr, seconds: Duration, timeout: Duration) -> serde_json::Value {
    let start = Instant::now();
    let (mut times, mut failed) = (Vec::new(), 0u64);
    // The first few failures, when and how, so a failed run says what went wrong.
    let mut errors = Vec::new();
    while start.elapsed() < seconds && times.len() as u64 + failed < MAX_HAMMER_ATTEMPTS {
        let begun = Instant::now();
        match one_round_trip(addr, timeout) {
            Ok(()) => times.push(begun.elapsed()),
            Err(error) => {
                failed += 1;
                if errors.len() < 5 {
                    let at_ms = begun.duration_since(start).as_millis() as u64;
                    errors.push(json!({ "at_ms": at_ms, "error": format!("{error:?}") }));
                }
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    times.sort_unstable();
    let at = |q: f64| {
        let index = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(index).map(|d| d.as_secs_f64() * 1e6)
    };
    json!({
        "connections": times.len(),
        "failed": failed,
        "errors": errors,
        "per_second": times.len() as f64 / elapsed,
        "p50_us": at(0.5),
        "p99_us": at(0.99),
        "max_us": at(1.0),
    })
}

/// One `TCP_CRR` transaction: connect, one byte out, one byte back, close. A failure
/// after the connect names the client's port, to find the connection in the agent's logs.
fn one_round_trip(addr: SocketAddr, timeout: Duration) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    let local = stream.local_addr()?;
    let exchange = |stream: &mut TcpStream| -> std::io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.write_all(b"x")?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)
    };
    exchange(&mut stream)
        .map_err(|error| std::io::Error::new(error.kind(), format!("from {local}: {error}")))?;
    SockRef::from(&stream).set_linger(Some(Duration::ZERO))
}

/// How `open` holds its connections.
struct Holding {
    hold: Duration,
    echo: bool,
    ping: Option<Duration>,
    timeout: Duration,
}

/// How one held connection ended: when, whether with a reset, and its echoes.
struct Ended {
    after: Duration,
    reset: bool,
    pings: u64,
}

#[tokio::main(flavor = "current_thread")]
async fn open(addr: SocketAddr, count: usize, holding: &Holding) -> anyhow::Result<()> {
    let (echo, timeout) = (holding.echo, holding.timeout);
    let attempts: Vec<_> = (0..count)
        .map(|_| tokio::spawn(open_one(addr, echo, timeout)))
        .collect();
    let (mut held, mut echoed, mut failed) = (Vec::new(), 0, 0);
    for attempt in attempts {
        match attempt.await? {
            Some((stream, was_echoed)) => {
                echoed += usize::from(was_echoed);
                held.push(stream);
            }
            None => failed += 1,
        }
    }
    let opened = Instant::now();
    let connected = held.len();
    println!(
        "{}",
        json!({ "event": "opened", "connected": connected, "echoed": echoed, "failed": failed })
    );
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel();
    let (ping, last_echoes) = (
        holding.ping,
        std::sync::Arc::new(std::sync::Mutex::new(Vec::new())),
    );
    for stream in held {
        let closed_tx = closed_tx.clone();
        let last_echoes = std::sync::Arc::clone(&last_echoes);
        tokio::spawn(async move {
            let index = {
                let mut last = last_echoes.lock().unwrap();
                last.push(Duration::ZERO);
                last.len() - 1
            };
            let on_echo = || last_echoes.lock().unwrap()[index] = opened.elapsed();
            let (reset, pings) = hold_one(stream, ping, timeout, on_echo).await;
            let ended = Ended {
                after: opened.elapsed(),
                reset,
                pings,
            };
            let _ = closed_tx.send(ended);
        });
    }
    drop(closed_tx);
    let (mut closes, mut resets, mut pings) = (Vec::new(), 0, 0);
    let deadline = tokio::time::sleep(holding.hold);
    tokio::pin!(deadline);
    while closes.len() < connected {
        tokio::select! {
            Some(ended) = closed_rx.recv() => {
                closes.push(ended.after.as_millis());
                resets += usize::from(ended.reset);
                pings += ended.pings;
            }
            () = &mut deadline => break,
        }
    }
    let min_last_echo = last_echoes
        .lock()
        .unwrap()
        .iter()
        .min()
        .map(Duration::as_millis);
    println!(
        "{}",
        json!({
            "event": "done",
            "closed": closes.len(),
            "reset": resets,
            "first_closed_ms": closes.iter().min(),
            "last_closed_ms": closes.iter().max(),
            "pings": pings,
            "min_last_echo_ms": min_last_echo,
        })
    );
    // Exiting closes whatever is still open.
    std::process::exit(0)
}

/// Holds `stream` until the peer closes or resets it: idle, or with `ping` one byte sent
/// every so often and awaited for `timeout` (`on_echo` told of each echo). Returns whether
/// it ended with a reset (a ping unanswered counts as one), and the echoes.
async fn hold_one(
    mut stream: tokio::net::TcpStream,
    ping: Option<Duration>,
    timeout: Duration,
    on_echo: impl Fn(),
) -> (bool, u64) {
    let mut sink = [0u8; 256];
    let Some(every) = ping else {
        // Reads until the peer closes or resets; anything it sends is dropped.
        loop {
            match stream.read(&mut sink).await {
                Ok(0) => return (false, 0),
                Ok(_) => {}
                Err(_) => return (true, 0),
            }
        }
    };
    let mut pings = 0;
    loop {
        tokio::time::sleep(every).await;
        let echoed = tokio::time::timeout(timeout, async {
            stream.write_all(b"p").await?;
            stream.read(&mut sink[..1]).await
        })
        .await;
        match echoed {
            Ok(Ok(1)) => {
                pings += 1;
                on_echo();
            }
            Ok(Ok(_)) => return (false, pings),
            Ok(Err(_)) | Err(_) => return (true, pings),
        }
    }
}

/// One connection, and with `echo` one byte sent and awaited; None when the connect failed.
async fn open_one(
    addr: SocketAddr,
    echo: bool,
    timeout: Duration,
) -> Option<(tokio::net::TcpStream, bool)> {
    let mut stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .ok()?
        .ok()?;
    if !echo {
        return Some((stream, false));
    }
    let echoed = tokio::time::timeout(timeout, async {
        stream.write_all(b"h").await?;
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await
    })
    .await
    .is_ok_and(|r| r.is_ok());
    Some((stream, echoed))
}

#[tokio::main(flavor = "current_thread")]
async fn sink(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        });
    }
}
