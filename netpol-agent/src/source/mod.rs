//! Sources turn the outside world (manifest files now, the Kubernetes API later) into a
//! `Snapshot`. They never touch the kernel.

pub mod convert;
pub mod file;
pub mod kube;

use std::path::PathBuf;

/// Problems reading or validating input. Object-level errors leave the rest of the input
/// usable; `Read` and `Yaml` make a whole file unusable.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: document {document}: invalid YAML")]
    Yaml {
        path: PathBuf,
        document: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{path}: document {document} ({kind} {object}): does not match the {kind} schema")]
    Schema {
        path: PathBuf,
        document: usize,
        kind: String,
        object: String,
        #[source]
        source: serde_yaml::Error,
    },
    #[error("{kind} {object}: {field}: {reason}")]
    Invalid {
        kind: &'static str,
        object: String,
        field: String,
        reason: String,
    },
}

impl SourceError {
    /// Whether the error makes whole files unreadable (nothing can be programmed safely),
    /// rather than one object invalid (it fails closed, the rest goes on).
    pub fn is_fatal(&self) -> bool {
        matches!(self, SourceError::Read { .. } | SourceError::Yaml { .. })
    }
}
