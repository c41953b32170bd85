//! The test bed's applications on their own, on 127.0.0.1 (no root, no mesh):
//! `ambit-httpbin` over HTTP/1.1, h2c and an upgraded `/echo` connection, and the gRPC
//! echo server and client (`tests/grpc/echo.py`). The end-to-end tests rely on what they
//! answer and log.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use ambit_tests::{GRPC_ECHO, check};

/// A server on 127.0.0.1 whose stdout goes to a file; killed on drop.
struct App {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl App {
    fn start(program: &str, args: &[&str], name: &str) -> Self {
        // The kernel picks a free port; the server binds it right after (a short race
        // that a busy machine could lose, not worth a retry here).
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let log = std::env::temp_dir().join(format!(
            "ambit-apps-{}-{name}-{port}.log",
            std::process::id()
        ));
        let child = Command::new(program)
            .args(args)
            .arg(port.to_string())
            .stdout(std::fs::File::create(&log).expect("log file"))
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        // Built before waiting, so that a server that never listens is killed on the panic.
        let app = Self { child, port, log };
        for _ in 0..100 {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return app;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{program} does not listen on port {port} after 5 s");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).expect("log file")
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn httpbin() -> App {
    App::start(env!("CARGO_BIN_EXE_ambit-httpbin"), &[], "httpbin")
}

/// `curl` with `args`, returning what it printed (body, then `-w`'s line).
fn curl(args: &[&str]) -> String {
    let output = check(
        Command::new("curl")
            .args(["-sS", "--max-time", "3"])
            .args(args),
    )
    .expect("curl runs");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn httpbin_serves_http1_and_h2c_and_logs_every_request() {
    let app = httpbin();
    let base = format!("http://127.0.0.1:{}", app.port);
    let version = ["-w", "\n%{http_code} %{http_version}"];
    assert_eq!(
        curl(&[&["--http1.1", &format!("{base}/ip")][..], &version].concat()),
        "{\"origin\":\"127.0.0.1\"}\n200 1.1"
    );
    assert_eq!(
        curl(
            &[
                &["--http2-prior-knowledge", &format!("{base}/status/403?x=1")][..],
                &version
            ]
            .concat()
        ),
        "\n403 2"
    );
    let headers = curl(&[
        "--http2-prior-knowledge",
        "-H",
        "x-test: yes",
        &format!("{base}/headers"),
    ]);
    assert!(headers.contains("\"x-test\":\"yes\""), "{headers}");
    assert_eq!(
        curl(&["--http1.1", "-X", "POST", &format!("{base}/any/where")]),
        "ok\n"
    );
    assert_eq!(
        app.log(),
        "REQ GET /ip HTTP/1.1\n\
         REQ GET /status/403?x=1 HTTP/2.0\n\
         REQ GET /headers HTTP/2.0\n\
         REQ POST /any/where HTTP/1.1\n"
    );
}

#[test]
fn httpbin_echoes_an_upgraded_connection_until_the_client_closes() {
    let app = httpbin();
    let mut stream = TcpStream::connect((Ipv4Addr::LOCALHOST, app.port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    stream
        .write_all(b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).expect("the response head");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(
        head.starts_with("HTTP/1.1 101 Switching Protocols\r\n"),
        "{head}"
    );
    let message: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    stream.write_all(&message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).expect("the echo");
    assert!(echoed == message, "the echo differs from what was sent");
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest).expect("the server closes");
    assert!(rest.is_empty());
    assert_eq!(app.log(), "REQ GET /echo HTTP/1.1\n");
}

/// `echo.py call` against `port`, returning its line.
fn grpc_call(port: u16, method: &str, extra: &[&str]) -> String {
    let output = check(
        Command::new("python3")
            .args([GRPC_ECHO, "call", &format!("127.0.0.1:{port}"), method])
            .args(extra),
    )
    .expect("echo.py call exits 0");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

#[test]
fn grpc_echo_answers_known_methods_and_logs_every_call() {
    let app = App::start("python3", &[GRPC_ECHO, "serve"], "grpc");
    assert_eq!(
        grpc_call(app.port, "Say", &["--message", "hi", "--metadata", "k=v"]),
        "OK hi"
    );
    assert_eq!(grpc_call(app.port, "Admin", &[]), "OK hello");
    assert!(
        grpc_call(app.port, "Other", &[]).starts_with("STATUS UNIMPLEMENTED"),
        "an unknown method"
    );
    assert_eq!(
        app.log(),
        "GRPC /ambit.test.Echo/Say\nGRPC /ambit.test.Echo/Admin\nGRPC /ambit.test.Echo/Other\n"
    );
    let usage = Command::new("python3")
        .args([GRPC_ECHO, "call"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(usage.code(), Some(2));
}
