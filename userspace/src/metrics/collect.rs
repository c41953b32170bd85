//! Metrics read at each scrape rather than recorded as they happen: certificate expiry and
//! rotation failures per identity, the HBONE pool's connections, the pods by redirection
//! state, and the process's CPU time and resident memory (prometheus-client has no process
//! collector of its own).

use std::{fmt, time::UNIX_EPOCH};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use crate::{identity::SecretManager, proxy::hbone::client::Pool, workloads::WorkloadTable};

/// `ambit_certificate_expiry_timestamp_seconds` and
/// `ambit_certificate_rotation_failures_total`, per identity with a pod on this node.
pub struct Certificates(pub SecretManager);

/// `ambit_hbone_pool_connections`: open mutual-TLS connections the pool holds.
pub struct HbonePool(pub Pool);

/// `ambit_pods`: the pods the agent knows, by namespace and redirection state (counted, so
/// that pod names never become labels).
#[derive(Debug)]
pub struct Pods(pub WorkloadTable);

/// `ambit_process_cpu_seconds_total` and `ambit_process_resident_memory_bytes`.
#[derive(Debug)]
pub struct Process;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IdentityLabel {
    identity: String,
}

impl Collector for Certificates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let states = self.0.cert_states();
        let mut expiry = encoder.encode_descriptor(
            "ambit_certificate_expiry_timestamp_seconds",
            "When the identity's current certificate expires (seconds since the Unix epoch)",
            None,
            MetricType::Gauge,
        )?;
        for state in &states {
            let Some(not_after) = state.not_after else {
                continue;
            };
            let seconds = not_after
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let label = IdentityLabel {
                identity: state.identity.to_string(),
            };
            ConstGauge::new(seconds).encode(expiry.encode_family(&label)?)?;
        }
        let mut failures = encoder.encode_descriptor(
            "ambit_certificate_rotation_failures",
            "Failed requests for the identity's certificate (the current one is kept until it expires)",
            None,
            MetricType::Counter,
        )?;
        for state in &states {
            let label = IdentityLabel {
                identity: state.identity.to_string(),
            };
            ConstCounter::new(state.rotation_failures).encode(failures.encode_family(&label)?)?;
        }
        Ok(())
    }
}

impl Collector for HbonePool {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let gauge = ConstGauge::new(self.0.connections() as u64);
        gauge.encode(encoder.encode_descriptor(
            "ambit_hbone_pool_connections",
            "Mutual-TLS connections the HBONE client pool holds open",
            None,
            gauge.metric_type(),
        )?)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodStateLabels {
    namespace: String,
    state: &'static str,
}

impl Collector for Pods {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let mut counts = std::collections::BTreeMap::<(String, &'static str), u64>::new();
        for status in self.0.read().unwrap_or_else(|e| e.into_inner()).values() {
            *counts
                .entry((status.namespace.clone(), status.redirection.state()))
                .or_default() += 1;
        }
        let mut pods = encoder.encode_descriptor(
            "ambit_pods",
            "Pods the agent knows, by namespace and redirection state (redirected: its sockets go through this agent; failed: enrolled here but not set up, held closed)",
            None,
            MetricType::Gauge,
        )?;
        for ((namespace, state), count) in counts {
            let labels = PodStateLabels { namespace, state };
            ConstGauge::new(count).encode(pods.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

impl Collector for Process {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        if let Some(seconds) = cpu_seconds() {
            let counter = ConstCounter::new(seconds);
            counter.encode(encoder.encode_descriptor(
                "ambit_process_cpu_seconds",
                "User and system CPU time of the agent",
                None,
                counter.metric_type(),
            )?)?;
        }
        if let Some(bytes) = resident_bytes() {
            let gauge = ConstGauge::new(bytes);
            gauge.encode(encoder.encode_descriptor(
                "ambit_process_resident_memory_bytes",
                "Resident memory of the agent",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// User plus system time of every thread of the process.
fn cpu_seconds() -> Option<f64> {
    use nix::sys::resource::{UsageWho, getrusage};
    let usage = getrusage(UsageWho::RUSAGE_SELF).ok()?;
    let seconds = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
    Some(seconds(usage.user_time()) + seconds(usage.system_time()))
}

/// `VmRSS` of `/proc/self/status`, which the kernel writes in kB.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    let kb: u64 = line.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Certificates")
    }
}

impl fmt::Debug for HbonePool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("HbonePool")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reports_its_cpu_time_and_memory() {
        let mut registry = prometheus_client::registry::Registry::default();
        registry.register_collector(Box::new(Process));
        let mut text = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry).unwrap();
        let value = |name: &str| -> f64 {
            let line = text.lines().find(|l| l.starts_with(name)).unwrap();
            line.rsplit(' ').next().unwrap().parse().unwrap()
        };
        assert!(value("ambit_process_cpu_seconds_total ") > 0.0, "{text}");
        assert!(
            value("ambit_process_resident_memory_bytes ") > 1e6,
            "{text}"
        );
    }
}
