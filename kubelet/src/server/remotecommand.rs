//! The streams of exec and attach, whatever carries them (Ref: apimachinery `util/remotecommand`, kubelet
//! `cri/streaming/remotecommand/{websocket,httpstream}.go`). The session logic in `exec` sees only [`Channels`]:
//! numbered output (1 stdout, 2 stderr), a final `Status` (sent on the error channel, 3), and decoded [`Input`].
//!
//! - WebSocket, `v5.channel.k8s.io`/`v4.channel.k8s.io`: every binary message starts with its channel byte — 0 stdin,
//!   1 stdout, 2 stderr, 3 error (a `Status` JSON ends the session: `Success`, or `NonZeroExitCode` with the exit
//!   code as a cause), 4 resize (`{"Width":W,"Height":H}`); v5 adds 255, "close": `[255, 0]` ends stdin.
//! - SPDY/3.1, `v4.channel.k8s.io`: one stream per channel, named by its `streamType` header (`error`, `stdin`,
//!   `stdout`, `stderr`, `resize`). The client opens them all before anything flows; the session starts once the
//!   ones the request asked for exist (within 30 s, upstream's stream creation timeout). Stdin ends with the
//!   client's FIN, the resize stream carries one JSON size after another, and at the end stdout and stderr end,
//!   then the error stream carries the `Status` and ends (client-go reads stdout and stderr to their end, then the
//!   error stream).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::exec::ExecParams;
use super::spdy;

pub(crate) const STDIN: u8 = 0;
pub(crate) const STDOUT: u8 = 1;
pub(crate) const STDERR: u8 = 2;
pub(crate) const ERROR: u8 = 3;
pub(crate) const RESIZE: u8 = 4;
pub(crate) const CLOSE: u8 = 255;

pub(crate) const V5: &str = "v5.channel.k8s.io";
pub(crate) const V4: &str = "v4.channel.k8s.io";

/// The protocols spoken over SPDY: v4 (upstream's kubelet offers v4 down to v1 there; v5 only adds the WebSocket
/// close signal, which SPDY does with FIN).
pub(crate) const SPDY_PROTOCOLS: &[&str] = &[V4];

/// How long the client has to open the streams it asked for (upstream's `StreamCreationTimeout`).
const STREAM_CREATION_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a finished SPDY session waits for the client to close the connection.
const LINGER: Duration = Duration::from_secs(5);

/// A WebSocket message on `channel`.
pub(crate) fn frame(channel: u8, data: &[u8]) -> Message {
    let mut v = Vec::with_capacity(data.len() + 1);
    v.push(channel);
    v.extend_from_slice(data);
    Message::Binary(v.into())
}

/// A decoded resize message.
#[derive(Debug, serde::Deserialize, PartialEq, Eq)]
pub(crate) struct TermSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// What the client sent, decoded.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Input {
    Stdin(Vec<u8>),
    Resize(TermSize),
    CloseStdin,
    Ignore,
    Gone,
}

/// What the session sends.
#[derive(Debug, PartialEq)]
pub(crate) enum Output {
    /// Bytes on [`STDOUT`] or [`STDERR`].
    Data(u8, Vec<u8>),
    /// The final status; nothing follows it.
    Status(Value),
}

/// A session's two directions, independent of the wire protocol.
pub(crate) struct Channels {
    pub out: mpsc::Sender<Output>,
    /// Ends with [`Input::Gone`] (or closes) when the client left.
    pub input: mpsc::Receiver<Input>,
    /// Ends once everything sent was written, after `out` and its clones were dropped or a status was sent.
    pub done: JoinHandle<()>,
}

pub(crate) fn decode_input(
    msg: Option<Result<Message, impl std::fmt::Display>>,
    v5: bool,
) -> Input {
    match msg {
        Some(Ok(Message::Binary(b))) => match b.first() {
            Some(&STDIN) => Input::Stdin(b[1..].to_vec()),
            Some(&RESIZE) => serde_json::from_slice(&b[1..])
                .map(Input::Resize)
                .unwrap_or(Input::Ignore),
            Some(&CLOSE) if v5 && b.get(1) == Some(&STDIN) => Input::CloseStdin,
            _ => Input::Ignore,
        },
        Some(Ok(Message::Close(_))) | None | Some(Err(_)) => Input::Gone,
        Some(Ok(_)) => Input::Ignore,
    }
}

/// The channels of an accepted WebSocket speaking `protocol` (v4 or v5).
pub(crate) fn websocket<S>(ws: WebSocketStream<S>, protocol: &'static str) -> Channels
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let v5 = protocol == V5;
    let (mut sink, mut source) = ws.split();
    let (input_tx, input) = mpsc::channel(64);
    let reader = tokio::spawn(async move {
        loop {
            let msg = decode_input(source.next().await, v5);
            let gone = msg == Input::Gone;
            if msg != Input::Ignore && input_tx.send(msg).await.is_err() || gone {
                return;
            }
        }
    });
    let (out, mut out_rx) = mpsc::channel::<Output>(64);
    let done = tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            let (msg, last) = match o {
                Output::Data(ch, data) => (frame(ch, &data), false),
                Output::Status(s) => (frame(ERROR, s.to_string().as_bytes()), true),
            };
            if sink.send(msg).await.is_err() {
                break;
            }
            if last {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                };
                let _ = sink.send(Message::Close(Some(close))).await;
                break;
            }
        }
        let _ = sink.flush().await;
        reader.abort();
    });
    Channels { out, input, done }
}

/// The SPDY streams of one session, by channel.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct StreamIds {
    error: Option<u32>,
    stdin: Option<u32>,
    stdout: Option<u32>,
    stderr: Option<u32>,
    resize: Option<u32>,
}

impl StreamIds {
    /// Records a new stream; false for a type we do not know.
    fn add(&mut self, id: u32, headers: &[(String, String)]) -> bool {
        let slot = match spdy::header(headers, "streamtype") {
            Some("error") => &mut self.error,
            Some("stdin") => &mut self.stdin,
            Some("stdout") => &mut self.stdout,
            Some("stderr") => &mut self.stderr,
            Some("resize") => &mut self.resize,
            other => {
                tracing::debug!(stream_type = ?other, "unexpected stream type");
                return false;
            }
        };
        *slot = Some(id);
        true
    }
}

/// Turns the client's SPDY events into [`Input`]: stdin data and FIN (or reset), and the resize stream's JSON
/// objects, which may be split across frames (upstream decodes them with a streaming `json.Decoder`).
#[derive(Default)]
struct Inbound {
    ids: StreamIds,
    resize: Vec<u8>,
}

impl Inbound {
    fn translate(&mut self, event: spdy::Event, out: &mut Vec<Input>) {
        match event {
            spdy::Event::Data { id, data, fin } if Some(id) == self.ids.stdin => {
                if !data.is_empty() {
                    out.push(Input::Stdin(data));
                }
                if fin {
                    out.push(Input::CloseStdin);
                }
            }
            spdy::Event::Reset { id } if Some(id) == self.ids.stdin => out.push(Input::CloseStdin),
            spdy::Event::Data { id, data, .. } if Some(id) == self.ids.resize => {
                self.resize.extend_from_slice(&data);
                let mut sizes =
                    serde_json::Deserializer::from_slice(&self.resize).into_iter::<TermSize>();
                let mut used = 0;
                loop {
                    match sizes.next() {
                        Some(Ok(s)) => {
                            used = sizes.byte_offset();
                            out.push(Input::Resize(s));
                        }
                        // Half an object: wait for the rest.
                        Some(Err(e)) if e.is_eof() => break,
                        // Upstream stops reading resizes at the first bad one.
                        Some(Err(_)) => {
                            used = self.resize.len();
                            self.ids.resize = None;
                            break;
                        }
                        None => {
                            used = self.resize.len();
                            break;
                        }
                    }
                }
                self.resize.drain(..used);
            }
            _ => {}
        }
    }
}

/// Waits for the streams a session needs and returns its channels. Per upstream `createHTTPStreamStreams`: the
/// error stream, one per requested stdio stream (never stderr with a tty: `ExecParams` drops it), and resize with
/// a tty.
pub(crate) async fn spdy(
    mut conn: spdy::Connection,
    params: &ExecParams,
) -> Result<Channels, String> {
    let expected = 1
        + usize::from(params.stdin)
        + usize::from(params.stdout)
        + usize::from(params.stderr)
        + usize::from(params.tty);
    let mut inbound = Inbound::default();
    let mut early = Vec::new();
    let deadline = tokio::time::sleep(STREAM_CREATION_TIMEOUT);
    tokio::pin!(deadline);
    let mut received = 0;
    while received < expected {
        let event = tokio::select! {
            e = conn.events.recv() => e,
            _ = &mut deadline => return Err("timed out waiting for client to create streams".into()),
        };
        match event {
            None => return Err("the client left before it created its streams".into()),
            Some(spdy::Event::Stream { id, headers, .. }) => {
                if inbound.ids.add(id, &headers) {
                    received += 1;
                }
            }
            Some(e) => inbound.translate(e, &mut early),
        }
    }
    let ids = inbound.ids;
    let spdy::Connection { mut events, sender } = conn;
    let (input_tx, input) = mpsc::channel(64);
    let mut reader = tokio::spawn(async move {
        for i in early {
            if input_tx.send(i).await.is_err() {
                return;
            }
        }
        let mut batch = Vec::new();
        while let Some(e) = events.recv().await {
            inbound.translate(e, &mut batch);
            for i in batch.drain(..) {
                if input_tx.send(i).await.is_err() {
                    return;
                }
            }
        }
        let _ = input_tx.send(Input::Gone).await;
    });
    let (out, mut out_rx) = mpsc::channel::<Output>(64);
    let done = tokio::spawn(async move {
        while let Some(o) = out_rx.recv().await {
            match o {
                Output::Data(ch, data) => {
                    let id = if ch == STDERR { ids.stderr } else { ids.stdout };
                    if let Some(id) = id {
                        if !sender.data(id, &data).await {
                            break;
                        }
                    }
                }
                Output::Status(status) => {
                    for id in [ids.stdout, ids.stderr].into_iter().flatten() {
                        sender.fin(id).await;
                    }
                    if let Some(id) = ids.error {
                        sender.data(id, status.to_string().as_bytes()).await;
                        sender.fin(id).await;
                    }
                    for id in [ids.stdin, ids.resize].into_iter().flatten() {
                        sender.fin(id).await;
                    }
                    // The client closes once it has read the status; spdystream drops frames still queued when
                    // the connection ends first.
                    let _ = tokio::time::timeout(LINGER, &mut reader).await;
                    break;
                }
            }
        }
        reader.abort();
    });
    Ok(Channels { out, input, done })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_carry_their_channel_and_client_input_decodes() {
        assert_eq!(frame(STDERR, b"x"), Message::Binary(vec![2, b'x'].into()));
        let m = |b: &[u8]| Some(Ok::<_, String>(Message::Binary(b.to_vec().into())));
        assert_eq!(
            decode_input(m(b"\x00ls\n"), true),
            Input::Stdin(b"ls\n".to_vec())
        );
        assert_eq!(
            decode_input(m(b"\x04{\"Width\":80,\"Height\":24}"), false),
            Input::Resize(TermSize {
                width: 80,
                height: 24
            })
        );
        assert_eq!(decode_input(m(&[255, 0]), true), Input::CloseStdin);
        // v4 has no close signal.
        assert_eq!(decode_input(m(&[255, 0]), false), Input::Ignore);
        assert_eq!(
            decode_input(None::<Result<Message, String>>, true),
            Input::Gone
        );
    }

    #[test]
    fn spdy_stdin_ends_with_fin_and_resizes_decode_across_frames() {
        let mut inbound = Inbound::default();
        let h = |t: &str| vec![("streamtype".to_string(), t.to_string())];
        assert!(inbound.ids.add(3, &h("stdin")));
        assert!(inbound.ids.add(9, &h("resize")));
        assert!(!inbound.ids.add(11, &h("bogus")));
        let mut out = Vec::new();
        let data = |id, d: &[u8], fin| spdy::Event::Data {
            id,
            data: d.to_vec(),
            fin,
        };
        inbound.translate(data(3, b"ls\n", false), &mut out);
        inbound.translate(
            data(9, b"{\"Width\":80,\"Height\":24}{\"Wid", false),
            &mut out,
        );
        inbound.translate(data(9, b"th\":100,\"Height\":30}", false), &mut out);
        inbound.translate(data(3, b"", true), &mut out);
        assert_eq!(
            out,
            vec![
                Input::Stdin(b"ls\n".to_vec()),
                Input::Resize(TermSize {
                    width: 80,
                    height: 24
                }),
                Input::Resize(TermSize {
                    width: 100,
                    height: 30
                }),
                Input::CloseStdin,
            ]
        );
        // Data on streams that are not input is ignored.
        out.clear();
        inbound.translate(data(5, b"x", true), &mut out);
        assert!(out.is_empty());
    }
}
