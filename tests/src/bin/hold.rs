//! Holds many idle TCP connections open, to measure what an idle connection costs the
//! proxy (`cargo xtask bench`).
//!
//! - `ambit-hold serve PORT`: accepts connections and echoes what comes on each (the
//!   first byte tells a client the whole path is up, proxies included; later ones that it
//!   still works) until the peer closes.
//! - `ambit-hold connect IP:PORT N TIMEOUT_SECS`: opens N connections one after the other,
//!   sends one byte on each and waits for its echo, prints `ready N`, then holds them
//!   until stdin closes or TIMEOUT_SECS pass, whichever comes first.
//!
//! Each side needs an fd per connection: run it with a raised limit (`prlimit --nofile`).

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// How long one connect or echo may take before the client gives up.
const STEP_TIMEOUT: Duration = Duration::from_secs(3);

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", port] => serve(port.parse().context("PORT")?),
        ["connect", addr, count, timeout] => connect(
            addr.parse().context("IP:PORT")?,
            count.parse().context("N")?,
            Duration::from_secs(timeout.parse().context("TIMEOUT_SECS")?),
        ),
        _ => bail!("usage: ambit-hold serve PORT | ambit-hold connect IP:PORT N TIMEOUT_SECS"),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn serve(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await?;
    loop {
        let (mut stream, _) = listener.accept().await?;
        tokio::spawn(async move {
            let mut buf = [0u8; 64];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                if stream.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        });
    }
}

fn connect(addr: SocketAddr, count: usize, timeout: Duration) -> anyhow::Result<()> {
    let mut held = Vec::with_capacity(count);
    for i in 0..count {
        held.push(
            open(addr).with_context(|| format!("connection {} of {count} to {addr}", i + 1))?,
        );
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "ready {}", held.len())?;
    stdout.flush()?;
    // A thread reads stdin so that the wait is bounded by `timeout` even if stdin stays
    // open; it is left blocked when the timeout wins, and exiting ends it.
    let (closed, wait) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
        let _ = closed.send(());
    });
    let _ = wait.recv_timeout(timeout);
    drop(held);
    Ok(())
}

/// One connection with its echo done: every hop of the path is established.
fn open(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let mut stream = TcpStream::connect_timeout(&addr, STEP_TIMEOUT)?;
    stream.set_read_timeout(Some(STEP_TIMEOUT))?;
    stream.write_all(b"h")?;
    let mut echo = [0u8; 1];
    stream.read_exact(&mut echo).context("no echo")?;
    Ok(stream)
}
