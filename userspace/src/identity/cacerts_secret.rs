//! `ambit ca --kubernetes`: the CA's key material in a Secret of Istio's plug-in layout
//! (`cacerts`), read through the API. An operator's Secret is used as it is; without one
//! the first CA to start generates a root into it, so restarts and replacements of the CA
//! keep signing with the root every peer already trusts, and the key is kept where the
//! cluster keeps secrets (not in the CA pod's disk).

use std::{collections::BTreeMap, path::PathBuf};

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use super::ca::{CaError, Cacerts};

#[derive(Debug, thiserror::Error)]
pub enum CacertsSecretError {
    #[error("cannot read Secret {secret}")]
    Get {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot create Secret {secret} with a new root")]
    Create {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "Secret {secret} has no {key} (Istio's cacerts layout: ca-cert.pem, ca-key.pem, root-cert.pem, optional cert-chain.pem)"
    )]
    Missing { secret: String, key: &'static str },
    #[error("Secret {secret}: {key} is not PEM text")]
    NotText { secret: String, key: &'static str },
    #[error("Secret {secret} was created by another CA and deleted again before it could be read")]
    Vanished { secret: String },
    #[error(transparent)]
    Generate(#[from] CaError),
}

/// The `cacerts` Secret of the CA's namespace.
pub struct CacertsSecret {
    api: Api<Secret>,
    namespace: String,
    name: String,
}

impl CacertsSecret {
    pub fn new(client: Client, namespace: &str, name: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// `Secret <namespace>/<name>`: where the CA's errors say its files came from.
    pub fn origin(&self) -> PathBuf {
        PathBuf::from(self.describe())
    }

    fn describe(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The Secret's files; when there is no Secret, a root generated for `trust_domain`
    /// and stored as one. A CA that loses the race to create it uses the winner's.
    pub async fn load_or_generate(
        &self,
        trust_domain: &str,
    ) -> Result<Cacerts, CacertsSecretError> {
        if let Some(secret) = self.get().await? {
            return self.decode(&secret);
        }
        let generated = Cacerts::generate(trust_domain)?;
        match self
            .api
            .create(&PostParams::default(), &self.encode(&generated))
            .await
        {
            Ok(_) => {
                tracing::info!(secret = %self.describe(), "generated a new mesh root into the Secret");
                Ok(generated)
            }
            Err(kube::Error::Api(status)) if status.is_already_exists() => {
                let secret = self
                    .get()
                    .await?
                    .ok_or_else(|| CacertsSecretError::Vanished {
                        secret: self.describe(),
                    })?;
                self.decode(&secret)
            }
            Err(source) => Err(CacertsSecretError::Create {
                secret: self.describe(),
                source,
            }),
        }
    }

    async fn get(&self) -> Result<Option<Secret>, CacertsSecretError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|source| CacertsSecretError::Get {
                secret: self.describe(),
                source,
            })
    }

    fn decode(&self, secret: &Secret) -> Result<Cacerts, CacertsSecretError> {
        let empty = BTreeMap::new();
        let data = secret.data.as_ref().unwrap_or(&empty);
        let text = |key: &'static str| -> Result<Option<String>, CacertsSecretError> {
            data.get(key)
                .map(|bytes| {
                    String::from_utf8(bytes.0.clone()).map_err(|_| CacertsSecretError::NotText {
                        secret: self.describe(),
                        key,
                    })
                })
                .transpose()
                .map(|text| text.filter(|t| !t.trim().is_empty()))
        };
        let required = |key: &'static str| {
            text(key)?.ok_or_else(|| CacertsSecretError::Missing {
                secret: self.describe(),
                key,
            })
        };
        Ok(Cacerts {
            ca_cert: required(Cacerts::CA_CERT)?,
            ca_key: required(Cacerts::CA_KEY)?,
            root_cert: required(Cacerts::ROOT_CERT)?,
            cert_chain: text(Cacerts::CERT_CHAIN)?,
        })
    }

    fn encode(&self, files: &Cacerts) -> Secret {
        let mut data = BTreeMap::from([
            (Cacerts::CA_CERT, &files.ca_cert),
            (Cacerts::CA_KEY, &files.ca_key),
            (Cacerts::ROOT_CERT, &files.root_cert),
        ]);
        if let Some(chain) = &files.cert_chain {
            data.insert(Cacerts::CERT_CHAIN, chain);
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                namespace: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "ambit-ca".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            data: Some(
                data.into_iter()
                    .map(|(key, pem)| (key.to_owned(), ByteString(pem.as_bytes().to_vec())))
                    .collect(),
            ),
            type_: Some("Opaque".to_owned()),
            ..Secret::default()
        }
    }
}
