//! Payloads for configMap, secret, downwardAPI and projected volumes (upstream `pkg/volume/{configmap,secret,
//! downwardapi,projected}`): which keys become which files with which modes.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    ConfigMapProjection, DownwardAPIVolumeFile, KeyToPath, Pod, SecretProjection,
    ServiceAccountTokenProjection,
};

use super::atomic_writer::{FileProjection, Payload};
use super::VolumeError;
use crate::env::{field_value, resource_value, ConfigSource, PodContext};

/// Upstream default modes (`ConfigMapVolumeSourceDefaultMode`, `SecretVolumeSourceDefaultMode`,
/// `DownwardAPIVolumeSourceDefaultMode`, `ProjectedVolumeSourceDefaultMode`): all 0644.
pub const DEFAULT_MODE: u32 = 0o644;

/// Where projected service-account tokens come from (the API's TokenRequest); the kubelet's API client
/// implements it.
pub trait TokenSource {
    fn service_account_token(
        &self,
        namespace: &str,
        service_account: &str,
        audience: Option<&str>,
        expiration_seconds: i64,
    ) -> Result<Vec<u8>, String>;
}

/// A [`TokenSource`] for kubelets without an API connection: every token request fails.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoTokens;

impl TokenSource for NoTokens {
    fn service_account_token(
        &self,
        ns: &str,
        sa: &str,
        _: Option<&str>,
        _: i64,
    ) -> Result<Vec<u8>, String> {
        Err(format!(
            "no API connection to request a token for {ns}/{sa}"
        ))
    }
}

fn mode(item: Option<i32>, default: u32) -> u32 {
    item.map(|m| (m as u32) & 0o7777).unwrap_or(default)
}

/// Keys → files: all keys with `default_mode`, or only `items` (each key must exist unless `optional`).
fn keyed_payload(
    kind: &'static str,
    namespace: &str,
    name: &str,
    data: Option<BTreeMap<String, Vec<u8>>>,
    items: Option<&Vec<KeyToPath>>,
    optional: bool,
    default_mode: u32,
) -> Result<Payload, VolumeError> {
    let Some(data) = data else {
        if optional {
            return Ok(Payload::new());
        }
        return Err(VolumeError::SourceNotFound {
            kind,
            namespace: namespace.into(),
            name: name.into(),
        });
    };
    let mut out = Payload::new();
    match items.filter(|i| !i.is_empty()) {
        None => {
            for (k, v) in data {
                out.insert(
                    k,
                    FileProjection {
                        data: v,
                        mode: default_mode,
                    },
                );
            }
        }
        Some(items) => {
            for item in items {
                match data.get(&item.key) {
                    Some(v) => {
                        out.insert(
                            item.path.clone(),
                            FileProjection {
                                data: v.clone(),
                                mode: mode(item.mode, default_mode),
                            },
                        );
                    }
                    None if optional => {}
                    None => {
                        return Err(VolumeError::KeyNotFound {
                            kind,
                            namespace: namespace.into(),
                            name: name.into(),
                            key: item.key.clone(),
                        })
                    }
                }
            }
        }
    }
    Ok(out)
}

fn lookup_err(
    kind: &'static str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(String) -> VolumeError {
    let (namespace, name) = (namespace.to_string(), name.to_string());
    move |message| VolumeError::Source {
        kind,
        namespace,
        name,
        message,
    }
}

pub(crate) fn config_map_payload(
    ns: &str,
    p: &ConfigMapProjection,
    default_mode: u32,
    source: &dyn ConfigSource,
) -> Result<Payload, VolumeError> {
    let name = p.name.as_str();
    let data = source
        .config_map(ns, name)
        .map_err(lookup_err("configmap", ns, name))?;
    keyed_payload(
        "configmap",
        ns,
        name,
        data,
        p.items.as_ref(),
        p.optional == Some(true),
        default_mode,
    )
}

pub(crate) fn secret_payload(
    ns: &str,
    p: &SecretProjection,
    default_mode: u32,
    source: &dyn ConfigSource,
) -> Result<Payload, VolumeError> {
    let name = p.name.as_str();
    let data = source
        .secret(ns, name)
        .map_err(lookup_err("secret", ns, name))?;
    keyed_payload(
        "secret",
        ns,
        name,
        data,
        p.items.as_ref(),
        p.optional == Some(true),
        default_mode,
    )
}

pub(crate) fn downward_payload(
    pod: &Pod,
    ctx: &PodContext,
    items: &[DownwardAPIVolumeFile],
    default_mode: u32,
) -> Result<Payload, VolumeError> {
    let mut out = Payload::new();
    for item in items {
        let value = if let Some(f) = &item.field_ref {
            field_value(pod, ctx, f)?
        } else if let Some(r) = &item.resource_field_ref {
            // In volumes the container must be named; there is no "current" container.
            let name = r.container_name.as_deref().unwrap_or("");
            let container = pod
                .spec
                .iter()
                .flat_map(|s| {
                    s.containers
                        .iter()
                        .chain(s.init_containers.iter().flatten())
                })
                .find(|c| c.name == name)
                .ok_or_else(|| crate::env::EnvError::UnknownContainer {
                    container: name.into(),
                })?;
            resource_value(pod, container, ctx, r)?
        } else {
            continue;
        };
        out.insert(
            item.path.clone(),
            FileProjection {
                data: value.into_bytes(),
                mode: mode(item.mode, default_mode),
            },
        );
    }
    Ok(out)
}

/// The lifetime a serviceAccountToken projection asks for: upstream's default of one hour, and at least the API's
/// minimum of 10 minutes.
pub fn token_expiration_seconds(p: &ServiceAccountTokenProjection) -> i64 {
    p.expiration_seconds.unwrap_or(3600).max(600)
}

pub(crate) fn token_payload(
    pod: &Pod,
    p: &ServiceAccountTokenProjection,
    default_mode: u32,
    tokens: &dyn TokenSource,
) -> Result<Payload, VolumeError> {
    let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
    let sa = pod
        .spec
        .as_ref()
        .and_then(|s| s.service_account_name.as_deref())
        .unwrap_or("default");
    let expiration = token_expiration_seconds(p);
    let token = tokens
        .service_account_token(ns, sa, p.audience.as_deref(), expiration)
        .map_err(|message| VolumeError::Token {
            namespace: ns.into(),
            service_account: sa.into(),
            message,
        })?;
    let mut out = Payload::new();
    out.insert(
        p.path.clone(),
        FileProjection {
            data: token,
            mode: default_mode,
        },
    );
    Ok(out)
}
