//! `discovery.k8s.io/v1` EndpointSlices: where a Service's traffic may go, as the cluster's
//! EndpointSlice controller (or whoever manages a selector-less Service) says. They give
//! what a Service's selector alone cannot: the endpoints of a Service without a selector
//! (`kubernetes.default`, an external database), which endpoints are ready, and the port
//! a named `targetPort` resolves to on each pod.

use std::net::IpAddr;

use serde::Deserialize;

use super::objects::{ObjectError, ObjectMeta, parse_ip, shape};

/// Label naming the Service a slice belongs to.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// From [`SERVICE_NAME_LABEL`]; a slice without it belongs to no Service.
    pub service: Option<String>,
    pub endpoints: Vec<SliceEndpoint>,
    pub ports: Vec<SlicePort>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`; unset counts as ready, as the API documents.
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePort {
    /// The Service port's name; empty for the one unnamed port.
    pub name: String,
    pub port: u16,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceDoc {
    metadata: ObjectMeta,
    address_type: String,
    #[serde(default)]
    endpoints: Option<Vec<EndpointDoc>>,
    #[serde(default)]
    ports: Option<Vec<PortDoc>>,
}

#[derive(Deserialize)]
struct EndpointDoc {
    addresses: Vec<String>,
    #[serde(default)]
    conditions: Option<ConditionsDoc>,
}

#[derive(Deserialize)]
struct ConditionsDoc {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct PortDoc {
    #[serde(default)]
    name: Option<String>,
    /// Unset means every port, which only a Service without ports (headless) can have:
    /// nothing a cluster IP and port resolve through.
    #[serde(default)]
    port: Option<u16>,
}

impl EndpointSlice {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The slice, or `None` for an `FQDN` one: ambit routes to addresses, not names.
    pub fn from_yaml(doc: serde_yaml::Value) -> Result<Option<Self>, ObjectError> {
        let SliceDoc {
            metadata,
            address_type,
            endpoints,
            ports,
        } = shape("EndpointSlice", doc)?;
        if address_type == "FQDN" {
            return Ok(None);
        }
        let namespace = metadata.namespace().to_owned();
        let endpoints = endpoints
            .unwrap_or_default()
            .into_iter()
            .map(|endpoint| {
                let addresses = endpoint
                    .addresses
                    .into_iter()
                    .map(|address| {
                        parse_ip(
                            "EndpointSlice",
                            &namespace,
                            &metadata.name,
                            "endpoints[].addresses",
                            address,
                        )
                    })
                    .collect::<Result<_, _>>()?;
                Ok(SliceEndpoint {
                    addresses,
                    ready: endpoint.conditions.and_then(|c| c.ready).unwrap_or(true),
                })
            })
            .collect::<Result<_, ObjectError>>()?;
        let ports = ports
            .unwrap_or_default()
            .into_iter()
            .filter_map(|port| {
                Some(SlicePort {
                    name: port.name.unwrap_or_default(),
                    port: port.port?,
                })
            })
            .collect();
        Ok(Some(Self {
            service: metadata.labels.get(SERVICE_NAME_LABEL).cloned(),
            name: metadata.name,
            namespace,
            endpoints,
            ports,
        }))
    }

    /// The port this slice's endpoints serve the Service port named `name` on.
    pub fn port(&self, name: &str) -> Option<u16> {
        self.ports.iter().find(|p| p.name == name).map(|p| p.port)
    }

    /// The addresses of the endpoints that are ready.
    pub fn ready_addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.endpoints
            .iter()
            .filter(|e| e.ready)
            .flat_map(|e| e.addresses.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(doc: &str) -> Result<Option<EndpointSlice>, ObjectError> {
        EndpointSlice::from_yaml(serde_yaml::from_str(doc).unwrap())
    }

    #[test]
    fn reads_service_ports_and_readiness() {
        let slice = slice(
            "metadata: {name: web-x1, namespace: foo, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
endpoints:
- {addresses: [10.0.0.2], conditions: {ready: true}}
- {addresses: [10.0.0.3], conditions: {ready: false}}
- {addresses: [10.0.0.4]}
ports: [{name: http, port: 8080, protocol: TCP}, {port: 9000}]",
        )
        .unwrap()
        .unwrap();
        assert_eq!(slice.service.as_deref(), Some("web"));
        assert_eq!(slice.port("http"), Some(8080));
        assert_eq!(slice.port(""), Some(9000));
        assert_eq!(slice.port("grpc"), None);
        let ready: Vec<String> = slice.ready_addresses().map(|a| a.to_string()).collect();
        assert_eq!(ready, ["10.0.0.2", "10.0.0.4"]);
    }

    #[test]
    fn fqdn_slices_are_not_routes() {
        let doc =
            "metadata: {name: x}\naddressType: FQDN\nendpoints: [{addresses: [db.example.com]}]";
        assert_eq!(slice(doc).unwrap(), None);
    }

    #[test]
    fn a_bad_address_names_the_slice_and_field() {
        let doc = "metadata: {name: x, namespace: foo}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.300]}]";
        assert_eq!(
            slice(doc).unwrap_err().to_string(),
            r#"EndpointSlice foo/x: endpoints[].addresses "10.0.0.300" is not an IP address"#
        );
    }
}
