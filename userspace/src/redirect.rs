//! Loading, pinning and driving the kernel programs (`ebpf/`).
//!
//! An upgrade loads the new agent's programs beside the old agent's and switches every
//! pinned link to them in one step each (`BPF_LINK_UPDATE`, see [`attach_once`]): the
//! hooks never run without a program, and both agents share the pinned maps, so the old
//! one keeps finding the original destinations of what it still relays and its own
//! connects stay unredirected ([`agents`]).
//!
//! Programs attach once per node (`connect4`, `connect6` and `sock_ops` at a cgroup, by
//! default the cgroup2 root) plus one `sk_lookup` per enrolled pod netns. The agent's own
//! cgroup is written to the kernel maps at load: connects from it are the proxy's and are
//! never redirected. Maps and links are pinned
//! under the pin directory (`/sys/fs/bpf/ambit` by default): a restarted agent finds the
//! links still attached and re-adopts them, so enrolled pods stay redirected (and fail
//! closed) while it is down. A pod is registered with every address it has (IPv4 and
//! IPv6), all steered to the same listener slots. This module owns map layout knowledge on
//! the user side; the rest of the agent calls [`Redirector::register`], [`Redirector::serve`],
//! [`Redirector::release_netns`] / [`Redirector::release_ip`] and reads [`OrigDstTable`].

use std::{
    collections::BTreeMap,
    fs::File,
    io,
    net::{IpAddr, SocketAddr},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use ambit_common::{
    addr::SockAddr,
    inbound::{INBOUND_LISTENERS_MAP, INBOUND_PODS_MAP, PodSlots, pod_key},
    outbound::{
        ConnKey, ENROLLED_NETNS_MAP, LEGACY_PROXY_CGROUP_MAP, MAX_ENROLLED, ORIG_DST_MAP,
        PROXY_CGROUPS_MAP, Redirect,
    },
    ports,
};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError, SockMap},
    programs::{
        CgroupAttachMode, CgroupSockAddr, ProgramError, ProgramFd, SkLookup, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use tracing::{info, warn};

mod agents;
pub use agents::{AgentsError, Registration};

/// The kernel object built by `build.rs`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ambit"));

const CONNECT4_PROGRAM: &str = "ambit_connect4";
const CONNECT6_PROGRAM: &str = "ambit_connect6";
const SOCKOPS_PROGRAM: &str = "ambit_sockops_established";
const SK_LOOKUP_PROGRAM: &str = "ambit_sk_lookup";

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("cannot mount bpffs at {}: {source}", path.display())]
    MountBpffs { path: PathBuf, source: nix::Error },
    #[error("cannot create pin directory {}: {source}", path.display())]
    PinDir { path: PathBuf, source: io::Error },
    #[error("cannot load the kernel programs: {0} (the agent needs CAP_BPF and CAP_NET_ADMIN)")]
    Load(#[from] aya::EbpfError),
    #[error("kernel object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {program}: {source}")]
    Program {
        program: &'static str,
        source: ProgramError,
    },
    #[error("program {program}: {source}")]
    Link {
        program: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("cannot open cgroup {}: {source}", path.display())]
    Cgroup { path: PathBuf, source: io::Error },
    #[error("pinning link {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("no free listener slot: at most {MAX_ENROLLED} pods per node")]
    SlotsExhausted,
    #[error("cannot find the agent's own cgroup: {0}")]
    OwnCgroup(io::Error),
    #[error(transparent)]
    Agents(#[from] AgentsError),
    #[error("cannot switch pinned link {} to this agent's program: {source}", path.display())]
    Update { path: PathBuf, source: io::Error },
}

/// Loaded programs and the handles of their maps. One per agent.
pub struct Redirector {
    ebpf: Ebpf,
    links_dir: PathBuf,
    enrolled: HashMap<MapData, u64, Redirect>,
    inbound_pods: HashMap<MapData, SockAddr, PodSlots>,
    listeners: SockMap<MapData>,
    orig_dst: OrigDstTable,
    /// Pod IP → slot pair; every address of a pod has the same pair. Slots are handed out
    /// lowest first and reused once no address holds them. Those of pods already in the
    /// pinned map are taken over at load, so that an agent started beside another never
    /// moves a pod the other serves onto a different slot.
    slots: BTreeMap<IpAddr, PodSlots>,
    /// This agent's cgroup in the set of agents whose connects are not redirected.
    registration: Option<Registration>,
    /// Kept alive for the lifetime of the agent: dropping it closes the log ring buffer.
    _logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

impl Redirector {
    /// Loads the programs, re-adopting pinned maps and links from `pin_dir`, and attaches the
    /// outbound programs to `cgroup` unless a previous agent left them attached.
    pub fn load(cgroup: &Path, pin_dir: &Path) -> Result<Self, RedirectError> {
        ensure_bpffs(pin_dir)?;
        let links_dir = pin_dir.join("links");
        std::fs::create_dir_all(&links_dir).map_err(|source| RedirectError::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(KERNEL_OBJECT)?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(error) => {
                warn!(%error, "kernel program logs unavailable");
                None
            }
        };
        let cgroup_file = File::open(cgroup).map_err(|source| RedirectError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;

        // Before any program runs: from its first connect on, the agent's own sockets must
        // be told apart.
        let own_cgroup = own_cgroup_id().map_err(RedirectError::OwnCgroup)?;
        let registration =
            Registration::register(take_map(&mut ebpf, PROXY_CGROUPS_MAP)?, pin_dir, own_cgroup)?;
        remove_legacy_pins(pin_dir);
        for name in [CONNECT4_PROGRAM, CONNECT6_PROGRAM] {
            let connect: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            connect.load().map_err(program_error(name))?;
            let fd = program_fd(connect.fd(), name)?;
            attach_once(&links_dir, name, fd, || {
                let id = connect
                    .attach(&cgroup_file, CgroupAttachMode::Single)
                    .map_err(program_error(name))?;
                fd_link(connect.take_link(id), name)
            })?;
        }
        let sockops: &mut SockOps = program(&mut ebpf, SOCKOPS_PROGRAM)?;
        sockops.load().map_err(program_error(SOCKOPS_PROGRAM))?;
        let fd = program_fd(sockops.fd(), SOCKOPS_PROGRAM)?;
        attach_once(&links_dir, SOCKOPS_PROGRAM, fd, || {
            let id = sockops
                .attach(&cgroup_file, CgroupAttachMode::Single)
                .map_err(program_error(SOCKOPS_PROGRAM))?;
            fd_link(sockops.take_link(id), SOCKOPS_PROGRAM)
        })?;
        let sk_lookup: &mut SkLookup = program(&mut ebpf, SK_LOOKUP_PROGRAM)?;
        sk_lookup.load().map_err(program_error(SK_LOOKUP_PROGRAM))?;

        let enrolled = take_map(&mut ebpf, ENROLLED_NETNS_MAP)?;
        let inbound_pods: HashMap<MapData, SockAddr, PodSlots> =
            take_map(&mut ebpf, INBOUND_PODS_MAP)?;
        let listeners = take_map(&mut ebpf, INBOUND_LISTENERS_MAP)?;
        let orig_dst = OrigDstTable(Arc::new(Mutex::new(take_map(&mut ebpf, ORIG_DST_MAP)?)));
        let slots = inbound_pods
            .iter()
            .filter_map(Result::ok)
            .map(|(key, slots)| (SocketAddr::from(key).ip(), slots))
            .collect();
        info!(cgroup = %cgroup.display(), pins = %pin_dir.display(), own_cgroup,
            "kernel programs ready; connects from the agent's cgroup are not redirected");
        Ok(Self {
            ebpf,
            links_dir,
            enrolled,
            inbound_pods,
            listeners,
            orig_dst,
            slots,
            registration: Some(registration),
            _logger: logger,
        })
    }

    /// Takes this agent's cgroup out of the kernel's set of agents, on a clean exit: from
    /// then on its connects would be redirected like a pod's.
    pub fn leave(&mut self) {
        if let Some(registration) = self.registration.take() {
            registration.leave();
        }
    }

    /// The aya-log ring buffer, polled by the agent to print kernel log lines.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        self._logger.take()
    }

    /// Puts a pod under the kernel programs, closed: its connects are redirected to its
    /// outbound port and TCP arriving in its namespace is steered to its listener slots,
    /// which stay empty, so everything is refused, until [`Redirector::serve`] fills them.
    /// `ips` are all the pod's addresses. Idempotent.
    pub fn register(
        &mut self,
        netns_cookie: u64,
        ips: &[IpAddr],
        netns: &File,
    ) -> Result<(), RedirectError> {
        // `sk_lookup` first: from then on TCP arriving in the namespace is steered or
        // dropped, whatever the maps say.
        let link_name = sk_lookup_link_name(netns_cookie);
        let program: &mut SkLookup = program(&mut self.ebpf, SK_LOOKUP_PROGRAM)?;
        let fd = program_fd(program.fd(), SK_LOOKUP_PROGRAM)?;
        attach_once(&self.links_dir, &link_name, fd, || {
            let id = program
                .attach(netns.as_fd())
                .map_err(program_error(SK_LOOKUP_PROGRAM))?;
            fd_link(program.take_link(id), SK_LOOKUP_PROGRAM)
        })?;
        let redirect = Redirect {
            port: ports::OUTBOUND,
            _pad: [0; 6],
        };
        self.enrolled
            .insert(netns_cookie, redirect, 0)
            .map_err(map_error(ENROLLED_NETNS_MAP))?;
        let slots = self.slot_for(ips)?;
        for &ip in ips {
            self.inbound_pods
                .insert(ip_key(ip), slots, 0)
                .map_err(map_error(INBOUND_PODS_MAP))?;
        }
        Ok(())
    }

    /// Hands a registered pod's inbound listeners to `sk_lookup`; replaces earlier ones.
    /// A pod with an IPv6 address needs dual-stack listeners: `sk_lookup` hands them both
    /// families.
    pub fn serve(
        &mut self,
        ips: &[IpAddr],
        hbone_listener: BorrowedFd<'_>,
        plaintext_listener: BorrowedFd<'_>,
    ) -> Result<(), RedirectError> {
        let slots = self.slot_for(ips)?;
        self.listeners
            .set(slots.hbone, &hbone_listener, 0)
            .map_err(map_error(INBOUND_LISTENERS_MAP))?;
        self.listeners
            .set(slots.plaintext, &plaintext_listener, 0)
            .map_err(map_error(INBOUND_LISTENERS_MAP))
    }

    /// Stops redirecting connects from the namespace and detaches its `sk_lookup`.
    pub fn release_netns(&mut self, netns_cookie: u64) -> Result<(), RedirectError> {
        ignore_missing(self.enrolled.remove(&netns_cookie))
            .map_err(map_error(ENROLLED_NETNS_MAP))?;
        let path = self.links_dir.join(sk_lookup_link_name(netns_cookie));
        if let Ok(link) = PinnedLink::from_pin(&path) {
            // Unpinning and dropping the last reference detaches the program.
            drop(link.unpin().map_err(|source| RedirectError::Pin {
                path: path.clone(),
                source: source.into(),
            })?);
        }
        Ok(())
    }

    /// Stops steering TCP for `ip` to the proxy; the listener slots are emptied once no
    /// other address of the pod uses them.
    pub fn release_ip(&mut self, ip: IpAddr) -> Result<(), RedirectError> {
        ignore_missing(self.inbound_pods.remove(&ip_key(ip)))
            .map_err(map_error(INBOUND_PODS_MAP))?;
        if let Some(slots) = self.slots.remove(&ip)
            && !self.slots.values().any(|other| *other == slots)
        {
            for slot in [slots.hbone, slots.plaintext] {
                ignore_missing(self.listeners.clear_index(&slot))
                    .map_err(map_error(INBOUND_LISTENERS_MAP))?;
            }
        }
        Ok(())
    }

    /// Netns cookies of every pod currently enrolled in the kernel maps, including those a
    /// previous agent enrolled.
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.enrolled.keys().filter_map(Result::ok).collect()
    }

    /// Pod IPs currently steered inbound, including those a previous agent enrolled.
    pub fn inbound_ips(&self) -> Vec<IpAddr> {
        self.inbound_pods
            .keys()
            .filter_map(Result::ok)
            .map(|k| SocketAddr::from(k).ip())
            .collect()
    }

    /// Removes pinned `sk_lookup` links of namespaces that are not in `keep`.
    pub fn prune_links(&self, keep: &[u64]) {
        let Ok(entries) = std::fs::read_dir(&self.links_dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(cookie) = name
                .to_str()
                .and_then(|n| n.strip_prefix(SK_LOOKUP_PREFIX))
                .and_then(|c| c.parse::<u64>().ok())
            else {
                continue;
            };
            if !keep.contains(&cookie)
                && let Ok(link) = PinnedLink::from_pin(entry.path())
                && let Err(error) = link.unpin()
            {
                warn!(link = %entry.path().display(), %error, "cannot remove a leftover link");
            }
        }
    }

    /// The table the outbound listeners read original destinations from.
    pub fn orig_dst(&self) -> OrigDstTable {
        self.orig_dst.clone()
    }

    /// The slot pair of the pod at `ips`: the one an address of it already has, else a
    /// free one; every address gets it.
    fn slot_for(&mut self, ips: &[IpAddr]) -> Result<PodSlots, RedirectError> {
        let slots = match ips.iter().find_map(|ip| self.slots.get(ip)) {
            Some(slots) => *slots,
            None => {
                let used: Vec<u32> = self.slots.values().map(|s| s.hbone / 2).collect();
                let index = (0..MAX_ENROLLED)
                    .find(|i| !used.contains(i))
                    .ok_or(RedirectError::SlotsExhausted)?;
                PodSlots {
                    hbone: 2 * index,
                    plaintext: 2 * index + 1,
                }
            }
        };
        for &ip in ips {
            self.slots.insert(ip, slots);
        }
        Ok(slots)
    }
}

/// Original destinations of redirected outbound connections, as filed by `sock_ops`.
#[derive(Clone)]
pub struct OrigDstTable(Arc<Mutex<HashMap<MapData, ConnKey, SockAddr>>>);

impl OrigDstTable {
    /// The original destination of an outbound connection accepted in the netns with
    /// `netns_cookie` from `peer` (the client's local address), consuming the record. The
    /// lock is held for one lookup and one delete.
    pub fn take(&self, netns_cookie: u64, peer: SocketAddr) -> Option<SocketAddr> {
        let key = ConnKey {
            netns_cookie,
            local: SockAddr::from(peer),
            _pad: 0,
        };
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let orig = map.get(&key, 0).ok()?;
        let _ = map.remove(&key);
        Some(orig.into())
    }
}

const SK_LOOKUP_PREFIX: &str = "sk_lookup-";

fn sk_lookup_link_name(netns_cookie: u64) -> String {
    format!("{SK_LOOKUP_PREFIX}{netns_cookie}")
}

/// The key of `ip` in [`INBOUND_PODS_MAP`].
fn ip_key(ip: IpAddr) -> SockAddr {
    pod_key(SockAddr::from(SocketAddr::new(ip, 0)))
}

/// Attaches `program` with `attach` and pins the link as `name`; a link pinned under that
/// name already (left by a previous agent, maybe of an older version) is kept and switched
/// to `program` in one step, so the hook never runs without a program, nor keeps an old
/// one.
fn attach_once(
    links_dir: &Path,
    name: &str,
    program: OwnedFd,
    attach: impl FnOnce() -> Result<FdLink, RedirectError>,
) -> Result<(), RedirectError> {
    let path = links_dir.join(name);
    match crate::sys::bpf_obj_get(&path) {
        Ok(link) => {
            crate::sys::bpf_link_update(&link, &program)
                .map_err(|source| RedirectError::Update { path, source })?;
            info!(
                link = name,
                "re-adopted pinned link, now running this agent's program"
            );
            Ok(())
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            attach()?.pin(&path).map_err(|source| RedirectError::Pin {
                path,
                source: source.into(),
            })?;
            Ok(())
        }
        Err(source) => Err(RedirectError::Update { path, source }),
    }
}

/// A descriptor of a loaded program of its own, so the program can be attached meanwhile.
fn program_fd(
    fd: Result<&ProgramFd, ProgramError>,
    name: &'static str,
) -> Result<OwnedFd, RedirectError> {
    let fd = fd.map_err(program_error(name))?;
    fd.as_fd()
        .try_clone_to_owned()
        .map_err(|source| RedirectError::Update {
            path: PathBuf::from(name),
            source,
        })
}

/// The first cgroup2 mount in /proc/mounts.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// The cgroup (v2) id of this process, as `bpf_get_current_cgroup_id` reports it: the
/// inode number of its cgroup directory (64-bit kernels).
fn own_cgroup_id() -> io::Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    let not_found = |what: &str| io::Error::new(io::ErrorKind::NotFound, what.to_owned());
    let membership = std::fs::read_to_string("/proc/self/cgroup")?;
    // cgroup2's line is `0::/path`, relative to the cgroup namespace's root, which is what
    // the mount shows too.
    let path = membership
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .ok_or_else(|| not_found("no cgroup2 entry in /proc/self/cgroup"))?;
    let root = cgroup2_root().ok_or_else(|| not_found("no cgroup2 mount"))?;
    Ok(std::fs::metadata(root.join(path.trim_start_matches('/')))?.ino())
}

/// Removes pins of maps that earlier versions used and this one does not: the old agent,
/// if it still runs, keeps its own descriptors of them.
fn remove_legacy_pins(pin_dir: &Path) {
    let path = pin_dir.join(LEGACY_PROXY_CGROUP_MAP);
    match std::fs::remove_file(&path) {
        Ok(()) => info!(pin = %path.display(), "removed the pin of an older version's map"),
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => warn!(pin = %path.display(), %error, "cannot remove an older version's map"),
    }
}

fn ensure_bpffs(pin_dir: &Path) -> Result<(), RedirectError> {
    let bpffs = Path::new("/sys/fs/bpf");
    if !is_bpffs(bpffs) {
        std::fs::create_dir_all(bpffs).map_err(|source| RedirectError::PinDir {
            path: bpffs.to_owned(),
            source,
        })?;
        nix::mount::mount(
            Some("bpf"),
            bpffs,
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .map_err(|source| RedirectError::MountBpffs {
            path: bpffs.to_owned(),
            source,
        })?;
        info!("mounted bpffs at /sys/fs/bpf");
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| RedirectError::PinDir {
        path: pin_dir.to_owned(),
        source,
    })
}

fn is_bpffs(path: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe4a11;
    nix::sys::statfs::statfs(path).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, RedirectError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program>,
{
    ebpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(RedirectError::Missing {
            kind: "program",
            name,
        })
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, RedirectError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(RedirectError::Missing { kind: "map", name })?;
    T::try_from(map).map_err(map_error(name))
}

/// Turns a program's link into an [`FdLink`], the kind that can be pinned.
fn fd_link<L>(link: Result<L, ProgramError>, program: &'static str) -> Result<FdLink, RedirectError>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::error::Error + Send + Sync + 'static,
{
    let link = link.map_err(program_error(program))?;
    FdLink::try_from(link).map_err(|source| RedirectError::Link {
        program,
        source: source.into(),
    })
}

fn program_error(program: &'static str) -> impl Fn(ProgramError) -> RedirectError {
    move |source| RedirectError::Program { program, source }
}

fn map_error(map: &'static str) -> impl Fn(MapError) -> RedirectError {
    move |source| RedirectError::Map { map, source }
}

fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        other => other,
    }
}
