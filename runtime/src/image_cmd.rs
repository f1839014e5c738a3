//! `windlass-runtime image ...`: the CLI over `windlass_runtime::image`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use windlass_runtime::image::{
    BundleOptions, ContainerProcessSpec, Credentials, PullOptions, Store, DEFAULT_STORE_ROOT,
};

#[derive(Args, Debug)]
pub struct ImageArgs {
    /// Root of the image store.
    #[arg(long, global = true, default_value = DEFAULT_STORE_ROOT, env = "WINDLASS_IMAGE_STORE")]
    store: PathBuf,
    #[command(subcommand)]
    command: ImageCommand,
}

#[derive(Subcommand, Debug)]
enum ImageCommand {
    /// Pull an image from its registry (e.g. `nginx`, `registry.lab:5000/team/app@sha256:...`).
    Pull {
        /// Registry `host:port` spoken to over plain HTTP (labs only); repeatable.
        #[arg(long = "insecure-registry")]
        insecure_registries: Vec<String>,
        /// Credentials in dockerconfigjson form (as in an imagePullSecret).
        #[arg(long)]
        auth_file: Option<PathBuf>,
        /// Extra PEM CA certificate to trust for registry TLS; repeatable.
        #[arg(long = "ca-cert")]
        ca_certs: Vec<PathBuf>,
        /// Layers downloaded and unpacked at once.
        #[arg(long, default_value_t = 3)]
        max_concurrent_layers: usize,
        reference: String,
    },
    /// List images in the store.
    #[command(alias = "ls")]
    List {
        /// Print JSON records instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an image's record and config as JSON.
    Inspect { image: String },
    /// Remove an image (refused while a container uses it) and collect unreferenced content.
    #[command(alias = "rmi")]
    Rm { image: String },
    /// Remove blobs and layers no image or container refers to.
    Gc,
    /// Import an OCI image layout (directory or tar) or a `docker save` tar.
    Import {
        path: PathBuf,
        /// Name for the image (required when the archive carries only a tag).
        #[arg(long)]
        name: Option<String>,
    },
    /// Export an image as an OCI image layout directory, or a tar when OUT ends in `.tar`.
    Export { image: String, out: PathBuf },
    /// Make an OCI bundle from an image: mount its root filesystem at BUNDLE/rootfs (copy-on-write, leased to ID)
    /// and write BUNDLE/config.json with the image's process, ready for `windlass-runtime run --bundle BUNDLE`.
    Bundle {
        image: String,
        /// The container ID the root filesystem is made (and the image leased) for.
        id: String,
        bundle: PathBuf,
        /// Join this network namespace (e.g. `/run/netns/NAME`) instead of creating one.
        #[arg(long)]
        netns: Option<PathBuf>,
        #[arg(long)]
        hostname: Option<String>,
        /// Extra environment, `KEY=VALUE`; repeatable.
        #[arg(long = "env")]
        env: Vec<String>,
        /// Replaces the image's Cmd (after `--`), as a Kubernetes container's `args`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Undo `image bundle`: unmount the root filesystem, drop the container's layer and lease.
    Unbundle { id: String, bundle: PathBuf },
}

pub fn run(args: ImageArgs) -> anyhow::Result<()> {
    let store = Store::open(&args.store)
        .with_context(|| format!("opening image store {}", args.store.display()))?;
    match args.command {
        ImageCommand::Pull {
            insecure_registries,
            auth_file,
            ca_certs,
            max_concurrent_layers,
            reference,
        } => {
            let mut opts = PullOptions {
                insecure_registries,
                max_concurrent_layers,
                ..Default::default()
            };
            if let Some(path) = auth_file {
                opts.credentials = Credentials::from_file(&path)?;
            }
            for path in ca_certs {
                opts.ca_certs_pem.push(
                    std::fs::read(&path)
                        .with_context(|| format!("reading CA certificate {}", path.display()))?,
                );
            }
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            let outcome = runtime
                .block_on(store.pull(&reference, &opts))
                .with_context(|| format!("pulling {reference}"))?;
            println!(
                "{} {}",
                outcome.record.reference, outcome.record.manifest_digest
            );
        }
        ImageCommand::List { json } => {
            let records = store.list()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&records)?);
            } else {
                println!("{:<60} {:<20} {:>12}", "REFERENCE", "DIGEST", "SIZE");
                for r in records {
                    println!(
                        "{:<60} {:<20} {:>12}",
                        r.reference,
                        &r.manifest_digest[..19.min(r.manifest_digest.len())],
                        r.size()
                    );
                }
            }
        }
        ImageCommand::Inspect { image } => {
            let record = store.get(&image)?;
            let config = store.config(&record)?;
            let leases = store.leases_of(&record.reference)?;
            let out = serde_json::json!({
                "record": record,
                "repoDigest": record.repo_digest(),
                "config": config,
                "usedBy": leases,
            });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        ImageCommand::Rm { image } => {
            let record = store.remove(&image)?;
            let report = store.gc()?;
            println!(
                "removed {} ({} blobs, {} layers, {} bytes freed)",
                record.reference, report.blobs_removed, report.layers_removed, report.bytes_freed
            );
        }
        ImageCommand::Gc => {
            let report = store.gc()?;
            println!(
                "{} blobs, {} layers, {} bytes freed",
                report.blobs_removed, report.layers_removed, report.bytes_freed
            );
        }
        ImageCommand::Import { path, name } => {
            for r in store.import(&path, name.as_deref())? {
                println!("{} {}", r.reference, r.manifest_digest);
            }
        }
        ImageCommand::Export { image, out } => {
            let r = store.export(&image, &out)?;
            println!("{} -> {}", r.reference, out.display());
        }
        ImageCommand::Bundle {
            image,
            id,
            bundle,
            netns,
            hostname,
            env,
            args,
        } => {
            let env = env
                .iter()
                .map(|kv| match kv.split_once('=') {
                    Some((k, v)) => Ok((k.to_string(), v.to_string())),
                    None => anyhow::bail!("--env {kv}: expected KEY=VALUE"),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let options = BundleOptions {
                container: ContainerProcessSpec {
                    args,
                    env,
                    ..Default::default()
                },
                network_namespace: netns,
                hostname,
            };
            store.create_bundle(&image, &id, &bundle, &options)?;
            println!("{}", bundle.display());
        }
        ImageCommand::Unbundle { id, bundle } => store.remove_bundle(&id, &bundle)?,
    }
    Ok(())
}
