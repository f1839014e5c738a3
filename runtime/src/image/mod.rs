//! Images: registry pulls, the content store, safe layer unpacking, overlay root filesystems, image config →
//! process, and offline import/export.

mod archive;
mod auth;
mod bundle;
mod config;
mod digest;
mod process;
mod pull;
mod rootfs;
mod store;
mod unpack;

pub use archive::ArchiveError;
pub use auth::{AuthError, Credentials};
pub use bundle::{BundleError, BundleOptions};
pub use config::{host_architecture, ExecConfig, ImageConfig, RootFs};
pub use digest::DigestError;
pub use process::{expand, process_spec, ContainerProcessSpec, ProcessSpec, ProcessSpecError};
pub use pull::{Platform, PullError, PullOptions, PullOutcome};
pub use rootfs::{mount_overlay, Rootfs, RootfsError};
pub use store::{
    normalize_reference, GcReport, ImageRecord, LayerRecord, Store, StoreError, DEFAULT_STORE_ROOT,
};
pub use unpack::{unpack_layer, UnpackError, UnpackStats};
