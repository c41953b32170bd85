//! `explain`: given a source, a destination and optional HTTP attributes, the decision
//! and the policy and rule that made it. One function, [`explain`], serves both the
//! offline command (`ambit explain --config-dir DIR ...`, via [`run_cli`]) and the
//! agent's admin API (`/explain?from=foo/sleep&to=bar/httpbin&port=8000`), and it asks
//! the data path's own decision ([`crate::admission`]) with the question turned into a
//! connection and, with HTTP options, a request.
//!
//! The query string form takes the flag names as keys (`from`, `from-ip`, `to`, `port`,
//! `plaintext`, `method`, `path`, `host`, `jwt`) and repeats `header=K=V` once per
//! header (URL-encoded), which is why [`ExplainArgs`] deserializes from the list of
//! pairs rather than from a map.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
};

use serde::Serialize;

use crate::{
    admission::{self, Handling, Peer, Refusal, RequestDenied},
    discovery::{Pod, Snapshot, files::DirState},
    identity::SpiffeId,
    policy::{
        Action, Decision, MtlsMode, Reason, Verdict,
        engine::{DEFAULT_ROOT_NAMESPACE, DEFAULT_TRUST_DOMAIN},
    },
    state::{Applied, PolicySettings},
};

/// Exit status of `ambit explain` for a bad config, an unknown pod or a bad value.
pub const EXIT_BAD_INPUT: i32 = 2;

/// The question: who talks to whom, on which port, with what request.
#[derive(Clone, Debug, Default, PartialEq, clap::Args, serde::Deserialize)]
#[serde(try_from = "Vec<(String, String)>")]
pub struct ExplainArgs {
    /// Source pod, as NAMESPACE/POD.
    #[arg(
        long,
        value_name = "NS/POD",
        required_unless_present = "from_ip",
        conflicts_with = "from_ip"
    )]
    pub from: Option<String>,
    /// Source address of a client outside the mesh (or of a pod, found by its IP).
    #[arg(long, value_name = "IP")]
    pub from_ip: Option<IpAddr>,
    /// Destination pod, as NAMESPACE/POD.
    #[arg(long, value_name = "NS/POD")]
    pub to: String,
    /// Destination workload port (the pod's port, not the service's).
    #[arg(long)]
    pub port: u16,
    /// The connection is plaintext even if the source is in the mesh.
    #[arg(long)]
    pub plaintext: bool,
    /// HTTP method; any HTTP option makes the question an HTTP request.
    #[arg(long)]
    pub method: Option<String>,
    /// HTTP path (default `/`).
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP host (default: the destination's `ip:port`).
    #[arg(long)]
    pub host: Option<String>,
    /// A request header, as NAME=VALUE; repeat for more.
    #[arg(long = "header", value_name = "K=V", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// A JWT presented by the request (as `Authorization: Bearer`).
    #[arg(long, value_name = "TOKEN")]
    pub jwt: Option<String>,
}

fn parse_header(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((name, value)) if !name.is_empty() => Ok((name.to_owned(), value.to_owned())),
        _ => Err(format!("{text:?} is not NAME=VALUE")),
    }
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExplainError {
    #[error("{key}: {value:?} is not {expected}")]
    BadValue {
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("unknown parameter {0:?}")]
    UnknownParameter(String),
    #[error("{0} is required")]
    Missing(&'static str),
    #[error("give exactly one of from and from-ip")]
    AmbiguousSource,
    #[error("{0:?} is not NAMESPACE/POD")]
    BadPodName(String),
    #[error("no pod {0} in the config")]
    UnknownPod(String),
    #[error("{0}")]
    BadRequest(String),
}

impl TryFrom<Vec<(String, String)>> for ExplainArgs {
    type Error = ExplainError;

    fn try_from(pairs: Vec<(String, String)>) -> Result<Self, ExplainError> {
        let mut args = ExplainArgs::default();
        let mut to = None;
        let mut port = None;
        for (key, value) in pairs {
            let bad = |key, expected| ExplainError::BadValue {
                key,
                value: value.clone(),
                expected,
            };
            match key.as_str() {
                "from" => args.from = Some(value),
                "from-ip" | "from_ip" => {
                    args.from_ip = Some(value.parse().map_err(|_| bad("from-ip", "an IP address"))?)
                }
                "to" => to = Some(value),
                "port" => port = Some(value.parse().map_err(|_| bad("port", "a port number"))?),
                "plaintext" => {
                    args.plaintext = match value.as_str() {
                        "" | "true" => true,
                        "false" => false,
                        _ => return Err(bad("plaintext", "true or false")),
                    }
                }
                "method" => args.method = Some(value),
                "path" => args.path = Some(value),
                "host" => args.host = Some(value),
                "header" => args
                    .headers
                    .push(parse_header(&value).map_err(|_| bad("header", "NAME=VALUE"))?),
                "jwt" => args.jwt = Some(value),
                _ => return Err(ExplainError::UnknownParameter(key)),
            }
        }
        args.to = to.ok_or(ExplainError::Missing("to"))?;
        args.port = port.ok_or(ExplainError::Missing("port"))?;
        if args.from.is_some() == args.from_ip.is_some() {
            return Err(ExplainError::AmbiguousSource);
        }
        Ok(args)
    }
}

/// The answer. Serializes to exactly
/// `{"decision","mtls","policy","action","rule","reason"}` (null where not applicable);
/// AUDIT and dry-run notes are appended to `reason` there and listed in the text form.
#[derive(Clone, Debug, PartialEq)]
pub struct Explanation {
    pub allowed: bool,
    /// The destination port's PeerAuthentication mode; `None` when the destination is
    /// not in the mesh.
    pub mtls: Option<MtlsMode>,
    /// `namespace/name` of the deciding policy.
    pub policy: Option<String>,
    pub action: Option<Action>,
    pub rule: Option<usize>,
    pub reason: String,
    pub notes: Vec<String>,
}

impl Explanation {
    fn from_decision(mtls: MtlsMode, decision: &Decision) -> Self {
        let (allowed, verdict): (bool, &Verdict) = match decision {
            Ok(permit) => (true, permit.verdict()),
            Err(denied) => (false, denied.verdict()),
        };
        Self {
            allowed,
            mtls: Some(mtls),
            policy: verdict.policy.as_ref().map(ToString::to_string),
            action: verdict.action,
            rule: verdict.rule,
            reason: verdict.reason.to_string(),
            notes: verdict.notes.iter().map(ToString::to_string).collect(),
        }
    }

    fn decision(&self) -> &'static str {
        if self.allowed { "ALLOW" } else { "DENY" }
    }
}

impl Serialize for Explanation {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Json<'a> {
            decision: &'static str,
            mtls: Option<MtlsMode>,
            policy: Option<&'a str>,
            action: Option<Action>,
            rule: Option<usize>,
            reason: String,
        }
        let mut reason = self.reason.clone();
        for note in &self.notes {
            reason.push_str("; ");
            reason.push_str(note);
        }
        Json {
            decision: self.decision(),
            mtls: self.mtls,
            policy: self.policy.as_deref(),
            action: self.action,
            rule: self.rule,
            reason,
        }
        .serialize(serializer)
    }
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let or_none = |v: Option<String>| v.unwrap_or_else(|| "-".to_owned());
        writeln!(f, "decision: {}", self.decision())?;
        writeln!(f, "mtls:     {}", or_none(self.mtls.map(|m| m.to_string())))?;
        writeln!(f, "policy:   {}", or_none(self.policy.clone()))?;
        writeln!(
            f,
            "action:   {}",
            or_none(self.action.map(|a| a.to_string()))
        )?;
        writeln!(f, "rule:     {}", or_none(self.rule.map(|r| r.to_string())))?;
        write!(f, "reason:   {}", self.reason)?;
        for note in &self.notes {
            write!(f, "\nnote:     {note}")?;
        }
        Ok(())
    }
}

impl Explanation {
    fn refused(refusal: &Refusal) -> Self {
        let denied = |mtls, policy: Option<&crate::policy::PolicyRef>, reason: String| Self {
            allowed: false,
            mtls,
            policy: policy.map(ToString::to_string),
            action: None,
            rule: None,
            reason,
            notes: Vec::new(),
        };
        match refusal {
            Refusal::Denied { mtls, denied } => Self::from_decision(*mtls, &Err(denied.clone())),
            Refusal::StrictMtls { port, policy } => denied(
                Some(MtlsMode::Strict),
                policy.as_ref(),
                Reason::PlaintextToStrict { port: *port }.to_string(),
            ),
            other => denied(None, None, other.to_string()),
        }
    }

    fn not_enrolled(pod: &Pod) -> Self {
        Self {
            allowed: true,
            mtls: None,
            policy: None,
            action: None,
            rule: None,
            reason: format!(
                "{} is not enrolled in the mesh: ambit enforces no policy for it",
                pod.key()
            ),
            notes: Vec::new(),
        }
    }
}

/// Answers `args` against the configuration `applied`, with the data path's decision.
pub fn explain(applied: &Applied, args: &ExplainArgs) -> Result<Explanation, ExplainError> {
    let snapshot = &applied.snapshot;
    let destination = find_pod(snapshot, &args.to)?;
    let source = match (&args.from, args.from_ip) {
        (Some(name), None) => Some(find_pod(snapshot, name)?),
        (None, Some(ip)) => snapshot.pods.values().find(|p| p.has_ip(ip)),
        _ => return Err(ExplainError::AmbiguousSource),
    };
    let unspecified = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
    // Only an enrolled source gets an identity; anything else arrives as plaintext.
    let identity = source
        .filter(|p| !args.plaintext && snapshot.is_enrolled(p))
        .and_then(|p| {
            SpiffeId::new(
                applied.policies.trust_domain(),
                &p.namespace,
                &p.service_account,
            )
            .ok()
        });
    let peer = Peer {
        identity,
        ip: source
            .and_then(Pod::ip)
            .or(args.from_ip)
            .unwrap_or(unspecified),
    };
    let Some(ip) = destination
        .ip()
        .filter(|_| snapshot.is_enrolled(destination))
    else {
        return Ok(Explanation::not_enrolled(destination));
    };
    let to = SocketAddr::new(ip, args.port);
    let admission = match admission::admit(applied, &args.to, &destination.ips, &peer, to) {
        Ok(admission) => admission,
        Err(Refusal::NotServed(_)) => return Ok(Explanation::not_enrolled(destination)),
        Err(refusal) => return Ok(Explanation::refused(&refusal)),
    };
    let mtls = admission.mtls.0;
    let request = args.request(ip)?;
    Ok(match (&admission.handling, request) {
        (Handling::Connection(permit), _) => Explanation::from_decision(mtls, &Ok(permit.clone())),
        (Handling::Requests | Handling::Detect, Some(request)) => {
            let (mut parts, ()) = request.into_parts();
            match admission.authorize_request(&mut parts) {
                Ok(permit) => Explanation::from_decision(mtls, &Ok(permit.0)),
                Err(RequestDenied::Denied(denied)) => {
                    Explanation::from_decision(mtls, &Err(denied))
                }
                Err(bad @ RequestDenied::BadPath(_)) => {
                    return Err(ExplainError::BadRequest(bad.to_string()));
                }
            }
        }
        // No HTTP options: the question is about the connection as opaque TCP.
        (Handling::Requests | Handling::Detect, None) => match admission.authorize_connection() {
            Ok(permit) => Explanation::from_decision(mtls, &Ok(permit)),
            Err(refusal) => Explanation::refused(&refusal),
        },
    })
}

impl ExplainArgs {
    /// The HTTP request the options describe, if any was given: the JWT as
    /// `Authorization: Bearer`, the host defaulting to the destination's `ip:port`.
    fn request(&self, destination: IpAddr) -> Result<Option<http::Request<()>>, ExplainError> {
        let is_http = self.method.is_some()
            || self.path.is_some()
            || self.host.is_some()
            || !self.headers.is_empty()
            || self.jwt.is_some();
        if !is_http {
            return Ok(None);
        }
        let bad = |e: &dyn fmt::Display| ExplainError::BadRequest(e.to_string());
        let host = match &self.host {
            Some(host) => host.clone(),
            None => SocketAddr::new(destination, self.port).to_string(),
        };
        let mut request = http::Request::builder()
            .method(self.method.as_deref().unwrap_or("GET"))
            .uri(self.path.as_deref().unwrap_or("/"))
            .header(http::header::HOST, host);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        if let Some(jwt) = &self.jwt {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {jwt}"));
        }
        request.body(()).map(Some).map_err(|e| bad(&e))
    }
}

fn find_pod<'a>(snapshot: &'a Snapshot, name: &str) -> Result<&'a Pod, ExplainError> {
    match name.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => snapshot
            .pods
            .get(name)
            .ok_or_else(|| ExplainError::UnknownPod(name.to_owned())),
        _ => Err(ExplainError::BadPodName(name.to_owned())),
    }
}

/// `ambit explain`'s command line.
#[derive(Debug, clap::Args)]
pub struct ExplainCli {
    /// Directory of Kubernetes-style YAML (pods, namespaces, services, policies).
    #[arg(long, value_name = "DIR")]
    pub config_dir: std::path::PathBuf,
    /// Namespace whose selector-less policies apply mesh-wide.
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
    /// Trust domain of workload identities, as the agent is run with.
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// An alias of the trust domain, as `ambit run --trust-domain-alias` (repeatable).
    #[arg(long = "trust-domain-alias", value_name = "TRUST_DOMAIN")]
    pub trust_domain_aliases: Vec<String>,
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
    #[command(flatten)]
    pub args: ExplainArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

/// `ambit explain`: loads `config_dir`, answers, prints (text or JSON) and returns the
/// exit status: 0 ALLOW, 1 DENY, 2 bad input (message on stderr).
pub fn run_cli(cli: &ExplainCli) -> i32 {
    let snapshot = match DirState::load_strict(&cli.config_dir, &cli.root_namespace) {
        Ok(snapshot) => snapshot,
        Err(error) => {
            eprintln!("ambit explain: bad config: {error}");
            return EXIT_BAD_INPUT;
        }
    };
    // Offline, keys behind a `jwksUri` are not fetched: tokens needing them are rejected.
    let settings = PolicySettings {
        trust_domain_aliases: cli.trust_domain_aliases.clone(),
        ..PolicySettings::new(&cli.root_namespace, &cli.trust_domain)
    };
    let applied = Applied::new(snapshot, &settings);
    let args = &cli.args;
    let json = cli.output == Output::Json;
    let explanation = match explain(&applied, args) {
        Ok(explanation) => explanation,
        Err(error) => {
            eprintln!("ambit explain: {error}");
            return EXIT_BAD_INPUT;
        }
    };
    if json {
        match serde_json::to_string(&explanation) {
            Ok(text) => println!("{text}"),
            Err(error) => {
                eprintln!("ambit explain: cannot encode the answer: {error}");
                return EXIT_BAD_INPUT;
            }
        }
    } else {
        println!("{explanation}");
    }
    if explanation.allowed { 0 } else { 1 }
}

/// `ambit convert`'s command line.
#[derive(Debug, clap::Args)]
pub struct ConvertCli {
    /// Directory of Kubernetes-style YAML.
    #[arg(long, value_name = "DIR")]
    pub config_dir: std::path::PathBuf,
    /// Namespace a `MeshPolicy` converts into.
    #[arg(long, default_value = DEFAULT_ROOT_NAMESPACE)]
    pub root_namespace: String,
}

/// `ambit convert`: prints, as `security.istio.io/v1beta1` YAML, the objects that the
/// `authentication.istio.io/v1alpha1` policies of `config_dir` are enforced as. Exit status
/// 0, or 2 for a bad config.
pub fn run_convert(cli: &ConvertCli) -> i32 {
    match DirState::load_strict(&cli.config_dir, &cli.root_namespace) {
        Ok(snapshot) => {
            print!("{}", crate::policy::legacy::converted_yaml(&snapshot));
            0
        }
        Err(error) => {
            eprintln!("ambit convert: bad config: {error}");
            EXIT_BAD_INPUT
        }
    }
}
