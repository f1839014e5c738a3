//! `portForward` over WebSocket (Ref: apiserver `wsstream` port-forward and kubelet `portforward/websocket.go`):
//! for the `i`-th port of `?ports=`, channel `2i` carries data and `2i+1` errors; each channel's first message is
//! the channel byte and the port (u16 little-endian). One TCP connection per port to `localhost:<port>` inside the
//! pod's network namespace is opened when the session starts. With `v5.channel.k8s.io`, `[255, 2i]` half-closes
//! the connection towards the pod. This is the protocol the `kube` crate's `Api::portforward` speaks.
//!
//! kubectl speaks `portforward.k8s.io` over SPDY instead ([`spdy_session`]), on a plain SPDY upgrade or tunnelled in
//! WebSocket (subprotocol `SPDY/3.1+portforward.k8s.io`, kubectl ≥ 1.31).

use std::collections::HashMap;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::remotecommand::{frame, CLOSE, V5};
use super::spdy;

/// The port-forward protocol over plain SPDY (`X-Stream-Protocol-Version`).
pub(crate) const SPDY_PROTOCOL: &str = "portforward.k8s.io";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The ports of `?ports=80,8080` (also repeated `ports=`).
pub(crate) fn parse_ports(query: &[(String, String)]) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for (k, v) in query {
        if k != "ports" {
            continue;
        }
        for p in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match p.parse::<u16>() {
                Ok(n) if n > 0 => ports.push(n),
                _ => return Err(format!("invalid port {p:?}")),
            }
        }
    }
    if ports.is_empty() {
        return Err("at least one port must be given with ?ports=".into());
    }
    // Channel numbers are one byte: 2i+1 must stay below the close signal (255).
    if ports.len() > 127 {
        return Err("at most 127 ports per session".into());
    }
    Ok(ports)
}

/// Connects to `127.0.0.1:port` inside the network namespace at `netns`. The socket is made on a short-lived
/// thread that joined the namespace (namespaces are per thread), and stays in it afterwards.
pub(crate) fn connect(netns: &Path, port: u16) -> io::Result<std::net::TcpStream> {
    let ns = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(io::Error::from)?;
        let s = std::net::TcpStream::connect_timeout(
            &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            CONNECT_TIMEOUT,
        )?;
        s.set_nonblocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| io::Error::other("connect thread panicked"))?
}

/// Runs one port-forward session on an accepted WebSocket.
pub(crate) async fn session<S>(
    ws: WebSocketStream<S>,
    protocol: &'static str,
    netns: PathBuf,
    pod: String,
    ports: Vec<u16>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let v5 = protocol == V5;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            let close = matches!(m, Message::Close(_));
            if sink.send(m).await.is_err() || close {
                break;
            }
        }
        let _ = sink.flush().await;
    });
    let mut writers: Vec<Option<OwnedWriteHalf>> = Vec::new();
    let mut readers = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        let (data, err) = (2 * i as u8, 2 * i as u8 + 1);
        for ch in [data, err] {
            let _ = tx.send(frame(ch, &port.to_le_bytes())).await;
        }
        let path = netns.clone();
        let port = *port;
        let conn = tokio::task::spawn_blocking(move || connect(&path, port))
            .await
            .map_err(io::Error::other)
            .and_then(|r| r)
            .and_then(tokio::net::TcpStream::from_std);
        match conn {
            Ok(c) => {
                let (mut r, w) = c.into_split();
                writers.push(Some(w));
                let out = tx.clone();
                readers.push(tokio::spawn(async move {
                    let mut buf = vec![0u8; 32 * 1024];
                    while let Ok(n) = r.read(&mut buf).await {
                        if n == 0 || out.send(frame(data, &buf[..n])).await.is_err() {
                            break;
                        }
                    }
                }));
            }
            Err(e) => {
                // Ref: upstream's message for a refused port.
                let msg = format!(
                    "an error occurred forwarding {port} -> {port}: error forwarding port {port} to pod {pod}: {e}"
                );
                let _ = tx.send(frame(err, msg.as_bytes())).await;
                writers.push(None);
            }
        }
    }
    let mut all_read = futures_util::future::join_all(readers);
    loop {
        tokio::select! {
            _ = &mut all_read => break,
            msg = source.next() => match msg {
                Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                    let ch = b[0];
                    if ch == CLOSE && v5 {
                        if let Some(target) = b.get(1).map(|c| usize::from(*c / 2)) {
                            if let Some(mut w) = writers.get_mut(target).and_then(Option::take) {
                                let _ = w.shutdown().await;
                            }
                        }
                    } else if ch % 2 == 0 {
                        if let Some(Some(w)) = writers.get_mut(usize::from(ch / 2)) {
                            if w.write_all(&b[1..]).await.is_err() {
                                writers[usize::from(ch / 2)] = None;
                            }
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                    writer.abort();
                    return;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    // Every pod connection ended: close the session.
    let _ = tx
        .send(Message::Close(Some(
            tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
                reason: "".into(),
            },
        )))
        .await;
    drop(tx);
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
}

/// The two streams of one forwarded connection (one `requestID`).
#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
    /// The client's bytes for the pod (`None`: its FIN), buffered until the connection to the pod is up.
    to_pod: Option<mpsc::UnboundedSender<Option<Vec<u8>>>>,
}

/// Port-forward over SPDY (Ref: kubelet `cri/streaming/portforward/httpstream.go`): per local connection the client
/// opens an `error` and a `data` stream with the same `requestID` and `port` headers. The data stream is spliced to
/// `localhost:<port>` in the pod's network namespace; a failure is written to the error stream; both end with FIN
/// when the pod's side ends. Without `requestID` (old clients) streams pair up by ID as upstream does: the error
/// stream's own ID, the data stream's ID minus 2.
pub(crate) async fn spdy_session(conn: spdy::Connection, netns: PathBuf, pod: String) {
    let spdy::Connection { mut events, sender } = conn;
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    // stream ID → requestID
    let mut streams: HashMap<u32, String> = HashMap::new();
    // One task per forwarded connection; each returns its requestID, and its streams are forgotten then.
    let mut forwards = tokio::task::JoinSet::new();
    loop {
        let event = tokio::select! {
            e = events.recv() => match e {
                Some(e) => e,
                None => break,
            },
            Some(done) = forwards.join_next(), if !forwards.is_empty() => {
                if let Some(pair) = done.ok().and_then(|request| pairs.remove(&request)) {
                    for id in [pair.error, pair.data].into_iter().flatten() {
                        streams.remove(&id);
                    }
                }
                continue;
            }
        };
        match event {
            spdy::Event::Stream { id, headers, .. } => {
                let kind = spdy::header(&headers, "streamtype").unwrap_or_default();
                let request = match spdy::header(&headers, "requestid") {
                    Some(r) => r.to_string(),
                    None if kind == "data" => id.saturating_sub(2).to_string(),
                    None => id.to_string(),
                };
                let pair = pairs.entry(request.clone()).or_default();
                if let Some(port) = spdy::header(&headers, "port").and_then(|p| p.parse().ok()) {
                    pair.port = port;
                }
                match kind {
                    "error" => pair.error = Some(id),
                    "data" if pair.data.is_none() => {
                        pair.data = Some(id);
                        let (to_pod, from_client) = mpsc::unbounded_channel();
                        pair.to_pod = Some(to_pod);
                        let target = Streams {
                            request: request.clone(),
                            data: id,
                            error: pair.error,
                            port: pair.port,
                        };
                        forwards.spawn(forward(
                            target,
                            from_client,
                            sender.clone(),
                            netns.clone(),
                            pod.clone(),
                        ));
                    }
                    other => {
                        tracing::debug!(stream_type = other, "port-forward: unexpected stream");
                        sender.reset(id).await;
                        continue;
                    }
                }
                streams.insert(id, request);
            }
            spdy::Event::Data { id, data, fin } => {
                let Some(pair) = streams.get(&id).and_then(|r| pairs.get_mut(r)) else {
                    continue;
                };
                if pair.data != Some(id) {
                    continue;
                }
                if let Some(to_pod) = &pair.to_pod {
                    if !data.is_empty() {
                        let _ = to_pod.send(Some(data));
                    }
                    if fin {
                        let _ = to_pod.send(None);
                        pair.to_pod = None;
                    }
                }
            }
            spdy::Event::Reset { id } => {
                if let Some(pair) = streams.get(&id).and_then(|r| pairs.get_mut(r)) {
                    if pair.data == Some(id) {
                        pair.to_pod = None;
                    }
                }
            }
        }
    }
    // The client is gone: so are its connections (dropping the set aborts them).
    drop(forwards);
}

/// The streams of one forwarded connection, once its data stream exists.
struct Streams {
    request: String,
    data: u32,
    /// kubectl opens it before the data stream.
    error: Option<u32>,
    port: u16,
}

/// Splices the data stream to `localhost:<port>` in the pod (the error stream gets any failure); returns the
/// requestID when done.
async fn forward(
    streams: Streams,
    mut from_client: mpsc::UnboundedReceiver<Option<Vec<u8>>>,
    sender: spdy::Sender,
    netns: PathBuf,
    pod: String,
) -> String {
    let Streams {
        request,
        data: data_id,
        error: error_id,
        port,
    } = streams;
    let conn = tokio::task::spawn_blocking(move || connect(&netns, port))
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .and_then(tokio::net::TcpStream::from_std);
    let conn = match conn {
        Ok(c) => c,
        Err(e) => {
            // Ref: upstream's message (`error forwarding port %d to pod %s, uid %v: %v`).
            let msg = format!(
                "error forwarding port {port} to pod {pod}: failed to connect to localhost:{port} inside the \
                 pod's network namespace: {e}"
            );
            tracing::debug!(%pod, port, error = %e, "port-forward failed");
            if let Some(eid) = error_id {
                sender.data(eid, msg.as_bytes()).await;
                sender.fin(eid).await;
            }
            sender.fin(data_id).await;
            return request;
        }
    };
    let (mut r, mut w) = conn.into_split();
    let upstream = tokio::spawn(async move {
        while let Some(chunk) = from_client.recv().await {
            match chunk {
                Some(d) => {
                    if w.write_all(&d).await.is_err() {
                        return;
                    }
                }
                None => break,
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    while let Ok(n) = r.read(&mut buf).await {
        if n == 0 || !sender.data(data_id, &buf[..n]).await {
            break;
        }
    }
    sender.fin(data_id).await;
    if let Some(eid) = error_id {
        sender.fin(eid).await;
    }
    upstream.abort();
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(v: &str) -> Vec<(String, String)> {
        vec![("ports".into(), v.into())]
    }

    #[test]
    fn ports_parse_from_comma_lists_and_bad_ones_are_refused() {
        assert_eq!(parse_ports(&q("80,8080")).unwrap(), [80, 8080]);
        let mut two = q("80");
        two.extend(q("81"));
        assert_eq!(parse_ports(&two).unwrap(), [80, 81]);
        assert!(parse_ports(&q("0")).is_err());
        assert!(parse_ports(&q("http")).is_err());
        assert!(parse_ports(&[]).is_err());
    }
}
