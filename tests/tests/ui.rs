//! End to end: the admin page (`/ui`) in a real browser. Headless Chromium loads it
//! during meshed (`foo/sleep` → `bar/httpbin`, HBONE), plaintext (`legacy/sleep` →
//! `foo/httpbin`) and then denied (`bar/deny-foo`) traffic, driven over the DevTools
//! protocol by `tests/ui/devtools.py`; the edges must carry the right mTLS marks and
//! counts, a click on the meshed edge must list the deciding policy, and the page must
//! request nothing but the agent's own admin API. The screenshot is kept next to the
//! agent's log (`/tmp/ambit-test-<node>.ui.png`); the test prints its path.

use std::{
    io::{BufRead, BufReader, Read, Write},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ambit_tests::{
    check,
    mesh::{BAR, FOO, LEGACY, Mesh, policies::DENY_FOO_IN_BAR, within},
};
use anyhow::{Context as _, bail};
use serde_json::Value;

/// The DevTools driver, in this crate's sources.
const DEVTOOLS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/ui/devtools.py");

/// A headless Chromium with its DevTools endpoint, killed by its PID and its profile
/// removed when dropped.
struct Chromium {
    child: Child,
    /// `ws://127.0.0.1:<port>/devtools/browser/<id>`.
    ws: String,
    /// Dropped after the browser is gone (fields drop after `Drop::drop`).
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn start() -> anyhow::Result<Self> {
        let profile = tempfile::tempdir()?;
        let mut child = Command::new("chromium")
            // Root (the test bed's tests run as root) cannot use Chromium's sandbox.
            .args(["--headless=new", "--no-sandbox", "--disable-gpu"])
            .args(["--disable-dev-shm-usage", "--no-first-run"])
            .arg("--remote-debugging-port=0")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start chromium (`cargo xtask setup` installs it)")?;
        let stderr = child.stderr.take().context("chromium's stderr")?;
        let (found, ws) = mpsc::channel();
        // Reads stderr to its end, so that Chromium never blocks on a full pipe.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    let _ = found.send(url.trim().to_owned());
                }
            }
        });
        let mut chromium = Self {
            child,
            ws: String::new(),
            _profile: profile,
        };
        chromium.ws = ws
            .recv_timeout(Duration::from_secs(20))
            .context("chromium did not print its DevTools address within 20 s")?;
        Ok(chromium)
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `devtools.py` at work on one page.
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Driver {
    fn start(chromium: &Chromium, args: &[&str]) -> anyhow::Result<Self> {
        let mut child = Command::new("python3")
            .arg(DEVTOOLS)
            .arg(&chromium.ws)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start python3")?;
        let stdin = child.stdin.take().context("the driver's stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("the driver's stdout")?);
        Ok(Self {
            child,
            stdin,
            stdout,
        })
    }

    fn send(&mut self, line: &str) -> anyhow::Result<()> {
        writeln!(self.stdin, "{line}")?;
        Ok(self.stdin.flush()?)
    }

    /// The driver's next line; its stderr when it ended instead.
    fn line(&mut self) -> anyhow::Result<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            let mut stderr = String::new();
            if let Some(mut pipe) = self.child.stderr.take() {
                pipe.read_to_string(&mut stderr)?;
            }
            bail!("{DEVTOOLS} ended ({}): {stderr}", self.child.wait()?);
        }
        Ok(line)
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Outcomes of `foo/sleep` → `bar/httpbin`, as curl saw them.
#[derive(Default)]
struct Tally {
    allowed: u64,
    /// Refused connections (curl's code 0: the proxy resets a denied connection).
    denied: u64,
}

impl Tally {
    /// One request from `foo/sleep` to `bar/httpbin`; returns its HTTP code.
    fn curl(&mut self, mesh: &Mesh) -> u16 {
        let code = mesh
            .node
            .curl(Some(&mesh.sleep[FOO]), &mesh.url(BAR, "/ip"))
            .expect("curl runs")
            .code;
        match code {
            200 => self.allowed += 1,
            0 => self.denied += 1,
            other => panic!("foo/sleep → bar/httpbin answered {other}"),
        }
        code
    }
}

#[test]
fn ui_page_in_chromium_shows_mtls_edges_counts_and_the_deciding_policy() {
    let mesh = Mesh::new(ambit_tests::test_binaries!()).expect("mesh");
    let agent = mesh.node.agent().unwrap();
    let page = format!("http://{}/ui", agent.admin);
    let headers = check(Command::new("curl").args(["-sS", "-o", "/dev/null", "-D", "-", &page]))
        .expect("GET /ui");
    let headers = String::from_utf8_lossy(&headers.stdout).to_ascii_lowercase();
    assert!(
        headers.contains("content-security-policy: default-src 'none'"),
        "{headers}"
    );

    let mut tally = Tally::default();
    for _ in 0..3 {
        assert_eq!(tally.curl(&mesh), 200);
    }
    let plaintext = mesh
        .node
        .curl(Some(&mesh.sleep[LEGACY]), &mesh.url(FOO, "/ip"))
        .unwrap();
    assert_eq!(plaintext.code, 200, "legacy/sleep → foo/httpbin");

    let chromium = Chromium::start().expect("chromium");
    let screenshot = mesh.node.config_dir.with_extension("ui.png");
    let meshed =
        r#"g.edge[data-source="foo/sleep"][data-destination="bar/httpbin"][data-mtls="true"]"#;
    let loaded = format!(r#"{meshed}[data-allowed="3"][data-denied="0"]"#);
    let mut driver =
        Driver::start(&chromium, &[&page, &loaded, &screenshot.to_string_lossy()]).expect("driver");
    assert_eq!(driver.line().expect("the page loads").trim(), "loaded");

    // Denied traffic while the page is open: it must pick the refusals up by itself.
    mesh.node.write_file("deny.yaml", DENY_FOO_IN_BAR).unwrap();
    let in_force = within(Duration::from_secs(3), || tally.curl(&mesh) == 0);
    assert!(in_force.is_some(), "bar/deny-foo was not put in force");
    for _ in 0..2 {
        assert_eq!(tally.curl(&mesh), 0, "bar/deny-foo is in force");
    }
    let counted = format!(
        r#"{meshed}[data-allowed="{}"][data-denied="{}"]"#,
        tally.allowed, tally.denied
    );
    driver.send(&counted).expect("the edge's selector");
    let result: Value = serde_json::from_str(&driver.line().expect("the driver's result"))
        .expect("the driver prints JSON");
    println!("screenshot: {}", screenshot.display());

    let edges = result["edges"].as_array().expect("edges");
    let find = |source: &str, destination: &str| {
        edges
            .iter()
            .find(|e| e["source"] == source && e["destination"] == destination)
            .unwrap_or_else(|| panic!("no edge {source} → {destination} in {edges:?}"))
    };
    let meshed = find("foo/sleep", "bar/httpbin");
    assert_eq!(meshed["mtls"], "true", "{meshed}");
    let received: u64 = meshed["bytesReceived"].as_str().unwrap().parse().unwrap();
    assert!(received > 0, "the meshed edge shows its bytes: {meshed}");
    let plaintext = find("legacy/sleep", "foo/httpbin");
    assert_eq!(
        (
            &plaintext["mtls"],
            &plaintext["allowed"],
            &plaintext["denied"]
        ),
        (&"false".into(), &"1".into(), &"0".into()),
        "{plaintext}"
    );
    let detail = result["detail"].as_str().expect("the detail panel's text");
    assert!(
        detail.contains("bar/deny-foo") && detail.contains("deny"),
        "the edge's decisions name the deciding policy: {detail}"
    );
    let origin = format!("http://{}/", agent.admin);
    for url in result["requests"].as_array().expect("requests") {
        let url = url.as_str().unwrap_or_default();
        assert!(url.starts_with(&origin), "the page requested {url}");
    }
    let png = std::fs::read(&screenshot).expect("the screenshot is saved");
    assert!(
        png.starts_with(b"\x89PNG"),
        "{} is a PNG",
        screenshot.display()
    );
}
