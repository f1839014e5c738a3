//! Authentication: who is calling. Client certificates signed by the cluster CA name the user (CN) and groups (O),
//! as upstream's x509 authenticator does. Requests without a verified identity get 401.

use x509_parser::prelude::{FromDer, X509Certificate};

/// An authenticated user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub groups: Vec<String>,
}

impl User {
    /// The user named by a verified client certificate (DER): CN is the name, each O a group.
    pub(crate) fn from_certificate(der: &[u8]) -> Option<Self> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let subject = cert.subject();
        let name = subject
            .iter_common_name()
            .next()?
            .as_str()
            .ok()?
            .to_string();
        if name.is_empty() {
            return None;
        }
        let mut groups: Vec<String> = subject
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(String::from))
            .collect();
        groups.push("system:authenticated".into());
        Some(Self { name, groups })
    }
}
