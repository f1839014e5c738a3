//! The etcd backend: the [`Store`] trait mapped onto etcd's v3 KV and Watch APIs with the `etcd-client` crate.
//!
//! Keys are used exactly as given, so with the API layer's `/registry/<resource>/<namespace>/<name>` keys
//! `etcdctl get --prefix /registry` shows what kube-apiserver would store. etcd already has the revision semantics
//! the trait describes (the trait was modelled on it), so every operation is one etcd request, as kube-apiserver
//! does (Ref: kubernetes `staging/src/k8s.io/apiserver/pkg/storage/etcd3/store.go`):
//!
//! - create: `txn(create_revision(key) == 0 → put)`;
//! - update: `txn(mod_revision(key) == expected ∧ version(key) > 0 → put(prev_kv), else get)`; the `else` branch
//!   reads the current value for the conflict error in the same round trip;
//! - delete: the same with `delete(prev_kv)` (the mod revision compare only when a revision is expected);
//! - list: one range `[max(prefix, start_after + "\0"), prefix_end)` with etcd's `limit`; its `count` (unaffected by
//!   the limit) gives the remaining item count;
//! - watch: an etcd watch with `prev_kv`, re-established from the last delivered revision + 1 when the connection or
//!   the member goes away (`require_leader` makes a member that lost its leader end the stream rather than go
//!   silent, as clientv3's `WithRequireLeader`, which kube-apiserver sets).
//!
//! Retries: requests are retried for [`EtcdConfig::retry_timeout`] only when retrying cannot apply a write twice:
//! reads on any `Unavailable` error; writes only when the request provably never reached a member (connection
//! refused, no leader to propose to). This follows clientv3's `isSafeRetryMutableRPC`. Other errors (a member that
//! died while holding the request) are returned: the write may or may not have been applied.

use std::collections::VecDeque;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, KvClient, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse,
    WatchOptions,
};

use super::{
    ChunkedList, Event, KeyValue, ListOptions, ListResult, Revision, Store, StoreError, WatchStream,
};

/// What is wrong with an etcd backend configuration.
#[derive(Debug, thiserror::Error)]
pub enum EtcdConfigError {
    #[error("no etcd server given (--etcd-servers is empty)")]
    NoEndpoints,
    #[error("etcd server {url:?} must be an http:// or https:// URL")]
    BadEndpoint { url: String },
    #[error("etcd server {url:?} uses https but no CA file is given (--etcd-cafile)")]
    HttpsWithoutCa { url: String },
    #[error("etcd server {url:?} uses plain http, but TLS files are given")]
    TlsWithHttp { url: String },
    #[error("--etcd-certfile and --etcd-keyfile go together")]
    CertWithoutKey,
}

/// Client TLS to etcd, as kube-apiserver's `--etcd-cafile`, `--etcd-certfile` and `--etcd-keyfile`.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// PEM CA bundle that signed the members' serving certificates.
    pub ca_file: PathBuf,
    /// PEM client certificate and key, for members started with `--client-cert-auth`.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// How to reach etcd.
#[derive(Clone, Debug)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://127.0.0.1:2379`); requests are balanced over all of them.
    pub endpoints: Vec<String>,
    /// TLS settings; required for (and only allowed with) `https://` endpoints.
    pub tls: Option<EtcdTls>,
    /// Timeout of one TCP connect to a member.
    pub dial_timeout: Duration,
    /// Timeout of one request (a watch only for its setup).
    pub request_timeout: Duration,
    /// How long safe retries and watch re-establishment go on before an error is returned (a watch then ends
    /// with [`StoreError::Backend`], so its consumer relists).
    pub retry_timeout: Duration,
}

impl EtcdConfig {
    /// A configuration from `--etcd-servers`, a comma-separated list of plain-HTTP member client URLs, with
    /// default timeouts.
    pub fn from_servers(servers: &str) -> Result<Self, EtcdConfigError> {
        Self::from_flags(servers, None, None, None)
    }

    /// A configuration from kube-apiserver's flags: `--etcd-servers` (comma-separated client URLs, all `http://`
    /// or all `https://`), `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`.
    pub fn from_flags(
        servers: &str,
        ca_file: Option<&Path>,
        cert_file: Option<&Path>,
        key_file: Option<&Path>,
    ) -> Result<Self, EtcdConfigError> {
        let client = match (cert_file, key_file) {
            (Some(c), Some(k)) => Some((c.to_path_buf(), k.to_path_buf())),
            (None, None) => None,
            _ => return Err(EtcdConfigError::CertWithoutKey),
        };
        let tls = match (ca_file, client) {
            (Some(ca), client) => Some(EtcdTls {
                ca_file: ca.to_path_buf(),
                client,
            }),
            (None, None) => None,
            // A client certificate without a CA: etcd's serving certificate could not be verified.
            (None, Some(_)) => {
                return Err(EtcdConfigError::HttpsWithoutCa {
                    url: servers.to_string(),
                })
            }
        };
        let mut endpoints = Vec::new();
        for url in servers.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let host = url
                .strip_prefix("http://")
                .map(|h| (h, false))
                .or_else(|| url.strip_prefix("https://").map(|h| (h, true)));
            match host {
                Some(("", _)) => {
                    return Err(EtcdConfigError::BadEndpoint {
                        url: url.to_string(),
                    })
                }
                Some((_, true)) if tls.is_none() => {
                    return Err(EtcdConfigError::HttpsWithoutCa {
                        url: url.to_string(),
                    })
                }
                Some((_, false)) if tls.is_some() => {
                    return Err(EtcdConfigError::TlsWithHttp {
                        url: url.to_string(),
                    })
                }
                Some(_) => endpoints.push(url.to_string()),
                None => {
                    return Err(EtcdConfigError::BadEndpoint {
                        url: url.to_string(),
                    })
                }
            }
        }
        if endpoints.is_empty() {
            return Err(EtcdConfigError::NoEndpoints);
        }
        Ok(Self {
            endpoints,
            tls,
            ..Self::default()
        })
    }
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".to_string()],
            tls: None,
            dial_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
            retry_timeout: Duration::from_secs(15),
        }
    }
}

/// The etcd-backed [`Store`]. Cheap to share: the client multiplexes every request over HTTP/2.
pub struct EtcdStore {
    client: Client,
    config: EtcdConfig,
    /// The lease TTL'd keys were last attached to, reused while it fits (see [`EtcdStore::lease_for`]).
    lease: tokio::sync::Mutex<Option<ReusableLease>>,
}

/// One page of a range read.
struct Page {
    items: Vec<KeyValue>,
    /// The revision it was read at.
    revision: Revision,
    /// More keys follow in the range.
    more: bool,
    /// Keys in the whole range (regardless of the limit).
    count: u64,
}

/// A granted etcd lease and when it expires.
#[derive(Clone, Copy, Debug)]
struct ReusableLease {
    id: i64,
    expires: Instant,
}

/// A lease is reused for keys whose TTL it covers with at most this much to spare (upstream kube-apiserver's
/// `leaseReuseDurationSeconds`, 60 s, capped at 5% of the TTL), so each Event does not cost a lease grant.
const LEASE_REUSE_MAX: Duration = Duration::from_secs(60);

/// First wait between retries; doubled up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Keys per range request of a list: ~2 MB of typical 2 KB objects per response.
const LIST_PAGE: usize = 1000;
/// Largest gRPC message accepted from etcd. tonic's default of 4 MiB is less than a page of large objects or a
/// watch response of many events; etcd itself sends up to 2 GiB.
const MAX_MESSAGE: usize = 1 << 30;

impl EtcdStore {
    /// Connects to the members in `config` (and checks one answers).
    pub async fn connect(config: EtcdConfig) -> Result<Self, StoreError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(config.dial_timeout)
            .with_timeout(config.request_timeout)
            // Detect a member that vanished without closing the connection (power loss, partition).
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(3))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        let options = match &config.tls {
            Some(tls) => options.with_tls(tls_options(tls)?),
            None => options,
        };
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| {
                StoreError::Backend(format!(
                    "cannot connect to etcd at {}: {e}",
                    config.endpoints.join(",")
                ))
            })?;
        let store = Self {
            client,
            config,
            lease: tokio::sync::Mutex::new(None),
        };
        let revision = store.revision().await.map_err(|e| match e {
            // Name the endpoints, and the usual causes, rather than a gRPC status alone.
            StoreError::Backend(msg) => StoreError::Backend(format!(
                "cannot reach etcd at {} (is it running; do its TLS settings match --etcd-cafile, \
                 --etcd-certfile, --etcd-keyfile?): {msg}",
                store.config.endpoints.join(",")
            )),
            other => other,
        })?;
        tracing::info!(endpoints = %store.config.endpoints.join(","), revision, "connected to etcd");
        Ok(store)
    }

    /// Runs `f` on a KV client, retrying the errors after which a retry is safe (see the module documentation).
    async fn call<T, F, Fut>(&self, what: Op<'_>, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.config.retry_timeout;
        let mut backoff = FIRST_BACKOFF;
        loop {
            match f(self
                .client
                .kv_client()
                .max_decoding_message_size(MAX_MESSAGE))
            .await
            {
                Ok(v) => return Ok(v),
                Err(e) if retry_is_safe(&e, what.is_write()) && Instant::now() < deadline => {
                    tracing::debug!(op = what.name(), key = what.key(), error = %e, "retrying etcd request");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    let key = what.key();
                    let sep = if key.is_empty() { "" } else { " " };
                    return Err(StoreError::Backend(format!(
                        "etcd {}{sep}{key}: {e}",
                        what.name()
                    )));
                }
            }
        }
    }

    /// Reads `[start, end)` in pages of at most [`LIST_PAGE`] keys, all at the first page's revision, until
    /// `wanted` keys (all when `None`) are read. Paging keeps each response small, whatever the list's size.
    /// Puts `key` only if it does not exist (a transaction comparing its create revision with 0).
    async fn create_put(
        &self,
        key: &str,
        value: Vec<u8>,
        options: Option<PutOptions>,
    ) -> Result<KeyValue, StoreError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value.clone(), options)]);
        let resp = self.txn(Op::Write("create", key), txn).await?;
        if !resp.succeeded() {
            return Err(StoreError::AlreadyExists {
                key: key.to_string(),
            });
        }
        let revision = header_revision(resp.header())?;
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: revision,
            mod_revision: revision,
            version: 1,
        })
    }

    /// One page of `[start, end)`: at most `limit` keys read at revision `at` (0: the latest), the revision it was
    /// read at, whether more keys follow, and how many keys the whole range has.
    async fn read_page(
        &self,
        prefix: &str,
        start: Vec<u8>,
        end: &[u8],
        limit: usize,
        at: Revision,
    ) -> Result<Page, StoreError> {
        let resp = self
            .call(Op::Read("list", prefix), |mut kv| {
                let (start, end) = (start.clone(), end.to_vec());
                async move {
                    let opts = GetOptions::new()
                        .with_range(end)
                        .with_limit(i64::try_from(limit).unwrap_or(i64::MAX))
                        .with_revision(at);
                    kv.get(start, Some(opts)).await
                }
            })
            .await?;
        // For a read at a past revision the header has the current one.
        let revision = if at == 0 {
            header_revision(resp.header())?
        } else {
            at
        };
        Ok(Page {
            items: resp
                .kvs()
                .iter()
                .map(to_kv)
                .collect::<Result<Vec<_>, _>>()?,
            revision,
            more: resp.more(),
            count: u64::try_from(resp.count()).unwrap_or(0),
        })
    }

    async fn list_pages(
        &self,
        prefix: &str,
        mut start: Vec<u8>,
        end: &[u8],
        wanted: Option<usize>,
    ) -> Result<ListResult, StoreError> {
        let mut items: Vec<KeyValue> = Vec::new();
        // 0: the latest revision; then the revision the first page was read at.
        let mut at = 0;
        loop {
            let limit = wanted.map_or(LIST_PAGE, |w| (w - items.len()).min(LIST_PAGE));
            let page = self
                .read_page(prefix, start.clone(), end, limit, at)
                .await?;
            at = page.revision;
            let got = page.items.len() as u64;
            if let Some(last) = page.items.last() {
                start = last.key.clone().into_bytes();
                start.push(0);
            }
            items.extend(page.items);
            let done = wanted.is_some_and(|w| items.len() >= w);
            if !page.more || done || got == 0 {
                // `count` is the number of keys in this page's whole range, regardless of the limit.
                return Ok(ListResult {
                    items,
                    revision: at,
                    more: page.more,
                    remaining: Some(page.count.saturating_sub(got)),
                });
            }
        }
    }

    /// A lease expiring no earlier than `ttl` from now and no later than `ttl` plus the reuse window: the last one
    /// granted if it fits, otherwise a new one (granted for `ttl` plus the window, so later keys can share it).
    async fn lease_for(&self, ttl: Duration) -> Result<i64, StoreError> {
        let window = LEASE_REUSE_MAX.min(ttl / 20);
        let mut current = self.lease.lock().await;
        let now = Instant::now();
        if let Some(l) = *current {
            if l.expires >= now + ttl && l.expires <= now + ttl + window {
                return Ok(l.id);
            }
        }
        let seconds = i64::try_from((ttl + window).as_secs().max(1)).unwrap_or(i64::MAX);
        // Retried like a read: a grant whose answer was lost leaves an unused lease that simply expires.
        let deadline = Instant::now() + self.config.retry_timeout;
        let mut backoff = FIRST_BACKOFF;
        let granted = loop {
            match self.client.lease_client().grant(seconds, None).await {
                Ok(g) => break g,
                Err(e) if retry_is_safe(&e, false) && Instant::now() < deadline => {
                    tracing::debug!(error = %e, "retrying etcd lease grant");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    return Err(StoreError::Backend(format!(
                        "etcd lease grant ({seconds} s): {e}"
                    )))
                }
            }
        };
        let ttl_granted = u64::try_from(granted.ttl()).unwrap_or(0);
        *current = Some(ReusableLease {
            id: granted.id(),
            expires: now + Duration::from_secs(ttl_granted),
        });
        Ok(granted.id())
    }

    async fn txn(&self, what: Op<'_>, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call(what, |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, StoreError> {
    let read = |what: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            StoreError::Backend(format!("cannot read etcd {what} {}: {e}", path.display()))
        })
    };
    let mut options =
        TlsOptions::new().ca_certificate(Certificate::from_pem(read("CA file", &tls.ca_file)?));
    if let Some((cert, key)) = &tls.client {
        options = options.identity(Identity::from_pem(
            read("client certificate", cert)?,
            read("client key", key)?,
        ));
    }
    Ok(options)
}

/// An operation, for retry decisions and error messages.
#[derive(Clone, Copy)]
enum Op<'a> {
    Read(&'static str, &'a str),
    Write(&'static str, &'a str),
}

impl Op<'_> {
    fn is_write(self) -> bool {
        matches!(self, Op::Write(..))
    }
    fn name(self) -> &'static str {
        match self {
            Op::Read(n, _) | Op::Write(n, _) => n,
        }
    }
    fn key(&self) -> &str {
        match self {
            Op::Read(_, k) | Op::Write(_, k) => k,
        }
    }
}

/// Whether a failed request may be sent again without risking a second application.
fn retry_is_safe(e: &etcd_client::Error, write: bool) -> bool {
    match e {
        // The channel could not even be used: nothing was sent.
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            if !write {
                // A read changes nothing: retry whatever the transport did to it (a connection to a member that
                // just died fails as Unknown "transport error" or Cancelled), and etcd's "try again" answers.
                return matches!(
                    status.code(),
                    tonic::Code::Unavailable
                        | tonic::Code::Unknown
                        | tonic::Code::Cancelled
                        | tonic::Code::DeadlineExceeded
                );
            }
            if status.code() != tonic::Code::Unavailable {
                // E.g. a broken connection to a member that may have received the request (as clientv3, which
                // retries mutations only when they cannot have been sent).
                return false;
            }
            let msg = status.message();
            // "etcdserver: no leader": refused before proposing (etcd `rpctypes.ErrGRPCNoLeader`);
            // connect errors: the request never left this process.
            msg.contains("no leader")
                || msg.contains("error trying to connect")
                || msg.contains("tcp connect error")
                || msg.contains("Connection refused")
        }
        _ => false,
    }
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> Result<Revision, StoreError> {
    header
        .map(|h| h.revision())
        .ok_or_else(|| StoreError::Backend("etcd response without a header".into()))
}

fn to_kv(kv: &etcd_client::KeyValue) -> Result<KeyValue, StoreError> {
    let key = std::str::from_utf8(kv.key())
        .map_err(|_| {
            StoreError::Backend(format!(
                "etcd key {:?} is not UTF-8",
                String::from_utf8_lossy(kv.key())
            ))
        })?
        .to_string();
    Ok(KeyValue {
        key,
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    })
}

/// The end of the key range holding every key that starts with `prefix` (etcd's `GetPrefixRangeEnd`).
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Empty prefix (or all 0xff): "\0" means "to the end of the key space".
    vec![0]
}

/// The current value of `key` from the `else` branch of a failed compare transaction.
fn else_get(resp: &TxnResponse) -> Result<Option<KeyValue>, StoreError> {
    match resp.op_responses().first() {
        Some(TxnOpResponse::Get(get)) => get.kvs().first().map(to_kv).transpose(),
        _ => Err(StoreError::Backend(
            "etcd transaction without its get response".into(),
        )),
    }
}

#[async_trait]
impl Store for EtcdStore {
    fn backend(&self) -> &'static str {
        "etcd"
    }

    async fn revision(&self) -> Result<Revision, StoreError> {
        // A count-only read of one key: linearizable, so it reports the cluster's current revision.
        let resp = self
            .call(Op::Read("revision", ""), |mut kv| async move {
                kv.get("\0", Some(GetOptions::new().with_count_only()))
                    .await
            })
            .await?;
        header_revision(resp.header())
    }

    async fn get(&self, key: &str) -> Result<(Option<KeyValue>, Revision), StoreError> {
        let resp = self
            .call(Op::Read("get", key), |mut kv| async move {
                kv.get(key, None).await
            })
            .await?;
        let found = resp.kvs().first().map(to_kv).transpose()?;
        Ok((found, header_revision(resp.header())?))
    }

    async fn list_chunked(&self, prefix: &str, chunk: usize) -> Result<ChunkedList, StoreError> {
        // Pages of `chunk` keys, every page after the first read at the first one's revision (etcd's MVCC keeps
        // it until compaction; a compaction mid-list ends the stream with the error).
        let chunk = chunk.clamp(1, LIST_PAGE);
        let end = prefix_end(prefix);
        let Page {
            items: first,
            revision,
            more,
            ..
        } = self
            .read_page(prefix, prefix.as_bytes().to_vec(), &end, chunk, 0)
            .await?;
        struct Pager {
            store: EtcdStore,
            prefix: String,
            end: Vec<u8>,
            chunk: usize,
            revision: Revision,
            /// The first page, not yet handed out.
            first: Option<Vec<KeyValue>>,
            /// The last key handed out, while more may follow.
            after: Option<String>,
        }
        let more_after =
            |items: &[KeyValue], more: bool| items.last().filter(|_| more).map(|kv| kv.key.clone());
        let pager = Pager {
            store: EtcdStore {
                client: self.client.clone(),
                config: self.config.clone(),
                lease: tokio::sync::Mutex::new(None),
            },
            prefix: prefix.to_string(),
            end,
            chunk,
            revision,
            after: more_after(&first, more),
            first: Some(first),
        };
        let chunks = futures_util::stream::unfold(pager, move |mut p| async move {
            if let Some(items) = p.first.take() {
                return (!items.is_empty()).then_some((Ok(items), p));
            }
            let mut start = p.after.take()?.into_bytes();
            // The smallest key after the last one.
            start.push(0);
            match p
                .store
                .read_page(&p.prefix, start, &p.end, p.chunk, p.revision)
                .await
            {
                Ok(page) => {
                    p.after = more_after(&page.items, page.more);
                    (!page.items.is_empty()).then_some((Ok(page.items), p))
                }
                Err(e) => Some((Err(e), p)),
            }
        });
        Ok(ChunkedList {
            revision,
            chunks: Box::pin(chunks),
        })
    }

    async fn list(&self, prefix: &str, options: &ListOptions) -> Result<ListResult, StoreError> {
        let start = match options.start_after.as_deref() {
            // The smallest key greater than `after`.
            Some(after) if after >= prefix => {
                let mut k = after.as_bytes().to_vec();
                k.push(0);
                k
            }
            _ => prefix.as_bytes().to_vec(),
        };
        let end = prefix_end(prefix);
        let wanted = options.limit.filter(|l| *l > 0);
        // The pages after the first are read at the first page's revision; if that is compacted in between,
        // start over at the latest revision (as kube-apiserver's storage layer does on ErrCompacted).
        let mut attempts = 0;
        loop {
            match self.list_pages(prefix, start.clone(), &end, wanted).await {
                Err(StoreError::Backend(msg))
                    if attempts < 3 && msg.contains("required revision has been compacted") =>
                {
                    attempts += 1;
                }
                other => return other,
            }
        }
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<KeyValue, StoreError> {
        self.create_put(key, value, None).await
    }

    async fn create_with_ttl(
        &self,
        key: &str,
        value: Vec<u8>,
        ttl: Duration,
    ) -> Result<KeyValue, StoreError> {
        let lease = self.lease_for(ttl).await?;
        self.create_put(key, value, Some(PutOptions::new().with_lease(lease)))
            .await
    }

    async fn update(
        &self,
        key: &str,
        expected: Revision,
        value: Vec<u8>,
    ) -> Result<KeyValue, StoreError> {
        // `version > 0`: a missing key has mod revision 0, so `expected == 0` alone would create it.
        let txn = Txn::new()
            .when([
                Compare::mod_revision(key, CompareOp::Equal, expected),
                Compare::version(key, CompareOp::Greater, 0),
            ])
            .and_then([TxnOp::put(
                key,
                value.clone(),
                // Keep the key's lease (a TTL'd key stays TTL'd), as kube-apiserver's GuaranteedUpdate does.
                Some(PutOptions::new().with_prev_key().with_ignore_lease()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(Op::Write("update", key), txn).await?;
        if !resp.succeeded() {
            return Err(match else_get(&resp)? {
                None => StoreError::NotFound {
                    key: key.to_string(),
                },
                Some(current) => StoreError::Conflict {
                    key: key.to_string(),
                    expected,
                    current: Box::new(current),
                },
            });
        }
        let prev = match resp.op_responses().first() {
            Some(TxnOpResponse::Put(put)) => put.prev_key().map(to_kv).transpose()?,
            _ => None,
        }
        .ok_or_else(|| StoreError::Backend(format!("etcd update of {key} without its prev_kv")))?;
        Ok(KeyValue {
            key: key.to_string(),
            value,
            create_revision: prev.create_revision,
            mod_revision: header_revision(resp.header())?,
            version: prev.version + 1,
        })
    }

    async fn delete(
        &self,
        key: &str,
        expected: Option<Revision>,
    ) -> Result<(KeyValue, Revision), StoreError> {
        let mut when = vec![Compare::version(key, CompareOp::Greater, 0)];
        if let Some(expected) = expected {
            when.push(Compare::mod_revision(key, CompareOp::Equal, expected));
        }
        let txn = Txn::new()
            .when(when)
            .and_then([TxnOp::delete(
                key,
                Some(DeleteOptions::new().with_prev_key()),
            )])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(Op::Write("delete", key), txn).await?;
        if !resp.succeeded() {
            return Err(match (else_get(&resp)?, expected) {
                (Some(current), Some(expected)) => StoreError::Conflict {
                    key: key.to_string(),
                    expected,
                    current: Box::new(current),
                },
                _ => StoreError::NotFound {
                    key: key.to_string(),
                },
            });
        }
        let prev = match resp.op_responses().first() {
            Some(TxnOpResponse::Delete(del)) => del.prev_kvs().first().map(to_kv).transpose()?,
            _ => None,
        }
        .ok_or_else(|| StoreError::Backend(format!("etcd delete of {key} without its prev_kv")))?;
        Ok((prev, header_revision(resp.header())?))
    }

    async fn watch(&self, prefix: &str, start: Revision) -> Result<WatchStream, StoreError> {
        // Resolve "from now" to a revision, so a re-established watch resumes exactly where this one began.
        let start = if start <= 0 {
            self.revision().await? + 1
        } else {
            start
        };
        let mut state = WatchState {
            client: self
                .client
                .watch_client()
                .max_decoding_message_size(MAX_MESSAGE),
            prefix: prefix.to_string(),
            next: start,
            stream: None,
            buffer: VecDeque::new(),
            done: false,
            retry_timeout: self.config.retry_timeout,
        };
        // Set up the first watch now, so a store that cannot be reached fails the call rather than the stream.
        state.stream = Some(state.establish().await?);
        Ok(Box::pin(futures_util::stream::unfold(state, next_event)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        let result = self
            .call(Op::Write("compact", ""), |mut kv| async move {
                kv.compact(revision, None).await
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            // Compacting again at or before the compacted revision changes nothing (as the embedded store).
            Err(StoreError::Backend(msg))
                if msg.contains("required revision has been compacted") =>
            {
                Ok(())
            }
            Err(StoreError::Backend(msg))
                if msg.contains("required revision is a future revision") =>
            {
                Err(StoreError::FutureRevision {
                    requested: revision,
                    current: self.revision().await?,
                })
            }
            Err(e) => Err(e),
        }
    }
}

struct WatchState {
    client: etcd_client::WatchClient,
    prefix: String,
    /// The smallest revision not delivered yet: where a re-established watch starts.
    next: Revision,
    stream: Option<etcd_client::WatchStream>,
    buffer: VecDeque<Event>,
    done: bool,
    retry_timeout: Duration,
}

impl WatchState {
    /// Opens an etcd watch from `self.next`, retrying for the retry timeout while no member takes it.
    async fn establish(&mut self) -> Result<etcd_client::WatchStream, StoreError> {
        let deadline = Instant::now() + self.retry_timeout;
        let mut backoff = FIRST_BACKOFF;
        loop {
            // An empty key is not allowed: "\0" up to "\0" is the whole key space.
            let key = if self.prefix.is_empty() {
                "\0"
            } else {
                self.prefix.as_str()
            };
            let options = WatchOptions::new()
                .with_range(prefix_end(&self.prefix))
                .with_prev_key()
                .with_progress_notify()
                .with_start_revision(self.next);
            match self.client.watch(key, Some(options)).await {
                Ok(stream) => return Ok(stream),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(prefix = %self.prefix, next = self.next, error = %e, "re-establishing etcd watch");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    return Err(StoreError::Backend(format!(
                        "etcd watch on {} from revision {}: {e}",
                        self.prefix, self.next
                    )))
                }
            }
        }
    }

    /// Takes one watch response: buffers its events, or ends the watch.
    fn accept(&mut self, resp: &etcd_client::WatchResponse) -> Result<(), StoreError> {
        if resp.compact_revision() > 0 {
            // The history from `next` on is gone (Ref: etcd `WatchResponse.compact_revision`).
            return Err(StoreError::Compacted {
                requested: self.next,
                compacted: resp.compact_revision(),
            });
        }
        for ev in resp.events() {
            let event = to_event(ev)?;
            if event.revision() < self.next {
                continue; // Already delivered before a re-establishment.
            }
            self.buffer.push_back(event);
        }
        if let Some(last) = self.buffer.back() {
            self.next = last.revision() + 1;
        } else if !resp.created() && !resp.canceled() {
            // A progress notification: every event up to the header's revision has been sent, so a
            // re-established watch may start after it (and is less likely to hit a compacted revision).
            if let Some(header) = resp.header() {
                self.next = self.next.max(header.revision() + 1);
            }
        }
        Ok(())
    }
}

fn to_event(ev: &etcd_client::Event) -> Result<Event, StoreError> {
    let kv = ev
        .kv()
        .ok_or_else(|| StoreError::Backend("etcd watch event without a key".into()))?;
    let current = to_kv(kv)?;
    // etcd leaves prev_kv out when the previous value is compacted away; kube-apiserver fails such an event
    // too (etcd3 watcher's "etcd event received with PrevKv=nil"), so the consumer relists.
    let prev = || {
        ev.prev_kv().map(to_kv).transpose()?.ok_or_else(|| {
            StoreError::Backend(format!(
                "etcd event for {} at revision {} has no previous value",
                current.key, current.mod_revision
            ))
        })
    };
    Ok(match ev.event_type() {
        EventType::Put if kv.version() == 1 => Event::Created(current),
        EventType::Put => Event::Updated {
            prev: prev()?,
            kv: current,
        },
        EventType::Delete => Event::Deleted {
            prev: prev()?,
            revision: kv.mod_revision(),
        },
    })
}

async fn next_event(
    mut st: WatchState,
) -> Option<(Result<std::sync::Arc<Event>, StoreError>, WatchState)> {
    loop {
        if let Some(event) = st.buffer.pop_front() {
            return Some((Ok(std::sync::Arc::new(event)), st));
        }
        if st.done {
            return None;
        }
        let mut stream = match st.stream.take() {
            Some(stream) => stream,
            None => match st.establish().await {
                Ok(stream) => stream,
                Err(e) => {
                    st.done = true;
                    return Some((Err(e), st));
                }
            },
        };
        match stream.message().await {
            Ok(Some(resp)) => {
                if let Err(e) = st.accept(&resp) {
                    st.done = true;
                    return Some((Err(e), st));
                }
                if resp.canceled() {
                    // Cancelled for another reason than compaction (e.g. the member lost its leader): resume
                    // elsewhere from the next revision.
                    tracing::info!(prefix = %st.prefix, next = st.next, reason = resp.cancel_reason(), "etcd watch cancelled; re-establishing");
                } else {
                    st.stream = Some(stream);
                }
            }
            Ok(None) => {
                tracing::info!(prefix = %st.prefix, next = st.next, "etcd watch stream ended; re-establishing");
            }
            Err(e) => {
                tracing::info!(prefix = %st.prefix, next = st.next, error = %e, "etcd watch stream failed; re-establishing");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/registry/pods/"), b"/registry/pods0");
        assert_eq!(prefix_end(""), b"\0");
    }

    #[test]
    fn etcd_servers_flag_is_a_comma_list_of_urls_and_https_needs_a_ca() {
        let c = EtcdConfig::from_servers("http://127.0.0.1:2379, http://127.0.0.1:22379,")
            .expect("valid");
        assert_eq!(
            c.endpoints,
            ["http://127.0.0.1:2379", "http://127.0.0.1:22379"]
        );
        assert!(matches!(
            EtcdConfig::from_servers(" , "),
            Err(EtcdConfigError::NoEndpoints)
        ));
        assert!(matches!(
            EtcdConfig::from_servers("127.0.0.1:2379"),
            Err(EtcdConfigError::BadEndpoint { .. })
        ));
        assert!(matches!(
            EtcdConfig::from_servers("https://etcd:2379"),
            Err(EtcdConfigError::HttpsWithoutCa { .. })
        ));
        let ca = Path::new("/etc/windlass/etcd/ca.crt");
        let tls = EtcdConfig::from_flags("https://etcd:2379", Some(ca), None, None).expect("valid");
        assert_eq!(tls.tls.map(|t| t.ca_file), Some(ca.to_path_buf()));
        assert!(matches!(
            EtcdConfig::from_flags("http://etcd:2379", Some(ca), None, None),
            Err(EtcdConfigError::TlsWithHttp { .. })
        ));
        assert!(matches!(
            EtcdConfig::from_flags("https://etcd:2379", Some(ca), Some(ca), None),
            Err(EtcdConfigError::CertWithoutKey)
        ));
    }
}
