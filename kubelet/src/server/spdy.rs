//! SPDY/3.1 as the Kubernetes streaming protocols use it (Ref: SPDY Protocol draft 3.1; apimachinery
//! `util/httpstream/spdy`, which runs moby/spdystream): the frame layout, header blocks compressed with the spec's
//! zlib dictionary (one zlib stream per direction for the whole connection), and a [`Connection`] that turns the
//! client's frames into stream [`Event`]s and a [`Sender`]'s calls into frames.
//!
//! It runs on two transports: an HTTP connection upgraded with `Upgrade: SPDY/3.1` (exec, attach and port-forward of
//! kubectl ≤ 1.29, of kubectl with `KUBECTL_*_WEBSOCKETS=false`, and of client-go's SPDY executor), or WebSocket
//! binary messages carrying the same bytes (kubectl ≥ 1.31 port-forward, subprotocol `SPDY/3.1+portforward.k8s.io`).
//! Only the client opens streams; each gets an empty SYN_REPLY at once, as upstream's `newSpdyStream` answers every
//! stream it accepts. The client's PINGs (client-go sends one every 5 s) are echoed; SETTINGS and WINDOW_UPDATE are
//! ignored (spdystream does no flow control). When every [`Sender`] is gone the connection says GOAWAY and closes,
//! as spdystream's `Close` does.

use std::time::Duration;

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The `Upgrade` token of plain SPDY (Ref: apimachinery `spdy.HeaderSpdy31`).
pub(crate) const UPGRADE: &str = "SPDY/3.1";
/// The header that offers (request, one value per protocol) and names (response) the stream protocol.
pub(crate) const PROTOCOL_HEADER: &str = "x-stream-protocol-version";
/// The WebSocket subprotocol of kubectl's SPDY-in-WebSocket port-forward tunnel.
pub(crate) const TUNNEL_PROTOCOL: &str = "SPDY/3.1+portforward.k8s.io";

const VERSION: u16 = 3;
const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 0x01;
/// RST_STREAM status CANCEL (spec 2.6.3).
const CANCEL: u32 = 5;
/// Largest frame accepted (SPDY's length field is 24 bits).
const MAX_FRAME: usize = 1 << 24;
/// Largest data frame sent.
const CHUNK: usize = 32 * 1024;

/// The zlib dictionary of SPDY/3 header blocks (spec section 2.6.10.1); both sides must use it byte for byte.
#[rustfmt::skip]
const DICTIONARY: &[u8] = &[
    0x00, 0x00, 0x00, 0x07, 0x6f, 0x70, 0x74, 0x69, 0x6f, 0x6e, 0x73, 0x00, 0x00, 0x00, 0x04, 0x68,
    0x65, 0x61, 0x64, 0x00, 0x00, 0x00, 0x04, 0x70, 0x6f, 0x73, 0x74, 0x00, 0x00, 0x00, 0x03, 0x70,
    0x75, 0x74, 0x00, 0x00, 0x00, 0x06, 0x64, 0x65, 0x6c, 0x65, 0x74, 0x65, 0x00, 0x00, 0x00, 0x05,
    0x74, 0x72, 0x61, 0x63, 0x65, 0x00, 0x00, 0x00, 0x06, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x00,
    0x00, 0x00, 0x0e, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x2d, 0x63, 0x68, 0x61, 0x72, 0x73, 0x65,
    0x74, 0x00, 0x00, 0x00, 0x0f, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x2d, 0x65, 0x6e, 0x63, 0x6f,
    0x64, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x0f, 0x61, 0x63, 0x63, 0x65, 0x70, 0x74, 0x2d, 0x6c,
    0x61, 0x6e, 0x67, 0x75, 0x61, 0x67, 0x65, 0x00, 0x00, 0x00, 0x0d, 0x61, 0x63, 0x63, 0x65, 0x70,
    0x74, 0x2d, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x73, 0x00, 0x00, 0x00, 0x03, 0x61, 0x67, 0x65, 0x00,
    0x00, 0x00, 0x05, 0x61, 0x6c, 0x6c, 0x6f, 0x77, 0x00, 0x00, 0x00, 0x0d, 0x61, 0x75, 0x74, 0x68,
    0x6f, 0x72, 0x69, 0x7a, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x0d, 0x63, 0x61, 0x63,
    0x68, 0x65, 0x2d, 0x63, 0x6f, 0x6e, 0x74, 0x72, 0x6f, 0x6c, 0x00, 0x00, 0x00, 0x0a, 0x63, 0x6f,
    0x6e, 0x6e, 0x65, 0x63, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x0c, 0x63, 0x6f, 0x6e, 0x74,
    0x65, 0x6e, 0x74, 0x2d, 0x62, 0x61, 0x73, 0x65, 0x00, 0x00, 0x00, 0x10, 0x63, 0x6f, 0x6e, 0x74,
    0x65, 0x6e, 0x74, 0x2d, 0x65, 0x6e, 0x63, 0x6f, 0x64, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x10,
    0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x2d, 0x6c, 0x61, 0x6e, 0x67, 0x75, 0x61, 0x67, 0x65,
    0x00, 0x00, 0x00, 0x0e, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x2d, 0x6c, 0x65, 0x6e, 0x67,
    0x74, 0x68, 0x00, 0x00, 0x00, 0x10, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x2d, 0x6c, 0x6f,
    0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x0b, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e,
    0x74, 0x2d, 0x6d, 0x64, 0x35, 0x00, 0x00, 0x00, 0x0d, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74,
    0x2d, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x00, 0x00, 0x00, 0x0c, 0x63, 0x6f, 0x6e, 0x74, 0x65, 0x6e,
    0x74, 0x2d, 0x74, 0x79, 0x70, 0x65, 0x00, 0x00, 0x00, 0x04, 0x64, 0x61, 0x74, 0x65, 0x00, 0x00,
    0x00, 0x04, 0x65, 0x74, 0x61, 0x67, 0x00, 0x00, 0x00, 0x06, 0x65, 0x78, 0x70, 0x65, 0x63, 0x74,
    0x00, 0x00, 0x00, 0x07, 0x65, 0x78, 0x70, 0x69, 0x72, 0x65, 0x73, 0x00, 0x00, 0x00, 0x04, 0x66,
    0x72, 0x6f, 0x6d, 0x00, 0x00, 0x00, 0x04, 0x68, 0x6f, 0x73, 0x74, 0x00, 0x00, 0x00, 0x08, 0x69,
    0x66, 0x2d, 0x6d, 0x61, 0x74, 0x63, 0x68, 0x00, 0x00, 0x00, 0x11, 0x69, 0x66, 0x2d, 0x6d, 0x6f,
    0x64, 0x69, 0x66, 0x69, 0x65, 0x64, 0x2d, 0x73, 0x69, 0x6e, 0x63, 0x65, 0x00, 0x00, 0x00, 0x0d,
    0x69, 0x66, 0x2d, 0x6e, 0x6f, 0x6e, 0x65, 0x2d, 0x6d, 0x61, 0x74, 0x63, 0x68, 0x00, 0x00, 0x00,
    0x08, 0x69, 0x66, 0x2d, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x00, 0x00, 0x00, 0x13, 0x69, 0x66, 0x2d,
    0x75, 0x6e, 0x6d, 0x6f, 0x64, 0x69, 0x66, 0x69, 0x65, 0x64, 0x2d, 0x73, 0x69, 0x6e, 0x63, 0x65,
    0x00, 0x00, 0x00, 0x0d, 0x6c, 0x61, 0x73, 0x74, 0x2d, 0x6d, 0x6f, 0x64, 0x69, 0x66, 0x69, 0x65,
    0x64, 0x00, 0x00, 0x00, 0x08, 0x6c, 0x6f, 0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00,
    0x0c, 0x6d, 0x61, 0x78, 0x2d, 0x66, 0x6f, 0x72, 0x77, 0x61, 0x72, 0x64, 0x73, 0x00, 0x00, 0x00,
    0x06, 0x70, 0x72, 0x61, 0x67, 0x6d, 0x61, 0x00, 0x00, 0x00, 0x12, 0x70, 0x72, 0x6f, 0x78, 0x79,
    0x2d, 0x61, 0x75, 0x74, 0x68, 0x65, 0x6e, 0x74, 0x69, 0x63, 0x61, 0x74, 0x65, 0x00, 0x00, 0x00,
    0x13, 0x70, 0x72, 0x6f, 0x78, 0x79, 0x2d, 0x61, 0x75, 0x74, 0x68, 0x6f, 0x72, 0x69, 0x7a, 0x61,
    0x74, 0x69, 0x6f, 0x6e, 0x00, 0x00, 0x00, 0x05, 0x72, 0x61, 0x6e, 0x67, 0x65, 0x00, 0x00, 0x00,
    0x07, 0x72, 0x65, 0x66, 0x65, 0x72, 0x65, 0x72, 0x00, 0x00, 0x00, 0x0b, 0x72, 0x65, 0x74, 0x72,
    0x79, 0x2d, 0x61, 0x66, 0x74, 0x65, 0x72, 0x00, 0x00, 0x00, 0x06, 0x73, 0x65, 0x72, 0x76, 0x65,
    0x72, 0x00, 0x00, 0x00, 0x02, 0x74, 0x65, 0x00, 0x00, 0x00, 0x07, 0x74, 0x72, 0x61, 0x69, 0x6c,
    0x65, 0x72, 0x00, 0x00, 0x00, 0x11, 0x74, 0x72, 0x61, 0x6e, 0x73, 0x66, 0x65, 0x72, 0x2d, 0x65,
    0x6e, 0x63, 0x6f, 0x64, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x07, 0x75, 0x70, 0x67, 0x72, 0x61,
    0x64, 0x65, 0x00, 0x00, 0x00, 0x0a, 0x75, 0x73, 0x65, 0x72, 0x2d, 0x61, 0x67, 0x65, 0x6e, 0x74,
    0x00, 0x00, 0x00, 0x04, 0x76, 0x61, 0x72, 0x79, 0x00, 0x00, 0x00, 0x03, 0x76, 0x69, 0x61, 0x00,
    0x00, 0x00, 0x07, 0x77, 0x61, 0x72, 0x6e, 0x69, 0x6e, 0x67, 0x00, 0x00, 0x00, 0x10, 0x77, 0x77,
    0x77, 0x2d, 0x61, 0x75, 0x74, 0x68, 0x65, 0x6e, 0x74, 0x69, 0x63, 0x61, 0x74, 0x65, 0x00, 0x00,
    0x00, 0x06, 0x6d, 0x65, 0x74, 0x68, 0x6f, 0x64, 0x00, 0x00, 0x00, 0x03, 0x67, 0x65, 0x74, 0x00,
    0x00, 0x00, 0x06, 0x73, 0x74, 0x61, 0x74, 0x75, 0x73, 0x00, 0x00, 0x00, 0x06, 0x32, 0x30, 0x30,
    0x20, 0x4f, 0x4b, 0x00, 0x00, 0x00, 0x07, 0x76, 0x65, 0x72, 0x73, 0x69, 0x6f, 0x6e, 0x00, 0x00,
    0x00, 0x08, 0x48, 0x54, 0x54, 0x50, 0x2f, 0x31, 0x2e, 0x31, 0x00, 0x00, 0x00, 0x03, 0x75, 0x72,
    0x6c, 0x00, 0x00, 0x00, 0x06, 0x70, 0x75, 0x62, 0x6c, 0x69, 0x63, 0x00, 0x00, 0x00, 0x0a, 0x73,
    0x65, 0x74, 0x2d, 0x63, 0x6f, 0x6f, 0x6b, 0x69, 0x65, 0x00, 0x00, 0x00, 0x0a, 0x6b, 0x65, 0x65,
    0x70, 0x2d, 0x61, 0x6c, 0x69, 0x76, 0x65, 0x00, 0x00, 0x00, 0x06, 0x6f, 0x72, 0x69, 0x67, 0x69,
    0x6e, 0x31, 0x30, 0x30, 0x31, 0x30, 0x31, 0x32, 0x30, 0x31, 0x32, 0x30, 0x32, 0x32, 0x30, 0x35,
    0x32, 0x30, 0x36, 0x33, 0x30, 0x30, 0x33, 0x30, 0x32, 0x33, 0x30, 0x33, 0x33, 0x30, 0x34, 0x33,
    0x30, 0x35, 0x33, 0x30, 0x36, 0x33, 0x30, 0x37, 0x34, 0x30, 0x32, 0x34, 0x30, 0x35, 0x34, 0x30,
    0x36, 0x34, 0x30, 0x37, 0x34, 0x30, 0x38, 0x34, 0x30, 0x39, 0x34, 0x31, 0x30, 0x34, 0x31, 0x31,
    0x34, 0x31, 0x32, 0x34, 0x31, 0x33, 0x34, 0x31, 0x34, 0x34, 0x31, 0x35, 0x34, 0x31, 0x36, 0x34,
    0x31, 0x37, 0x35, 0x30, 0x32, 0x35, 0x30, 0x34, 0x35, 0x30, 0x35, 0x32, 0x30, 0x33, 0x20, 0x4e,
    0x6f, 0x6e, 0x2d, 0x41, 0x75, 0x74, 0x68, 0x6f, 0x72, 0x69, 0x74, 0x61, 0x74, 0x69, 0x76, 0x65,
    0x20, 0x49, 0x6e, 0x66, 0x6f, 0x72, 0x6d, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x32, 0x30, 0x34, 0x20,
    0x4e, 0x6f, 0x20, 0x43, 0x6f, 0x6e, 0x74, 0x65, 0x6e, 0x74, 0x33, 0x30, 0x31, 0x20, 0x4d, 0x6f,
    0x76, 0x65, 0x64, 0x20, 0x50, 0x65, 0x72, 0x6d, 0x61, 0x6e, 0x65, 0x6e, 0x74, 0x6c, 0x79, 0x34,
    0x30, 0x30, 0x20, 0x42, 0x61, 0x64, 0x20, 0x52, 0x65, 0x71, 0x75, 0x65, 0x73, 0x74, 0x34, 0x30,
    0x31, 0x20, 0x55, 0x6e, 0x61, 0x75, 0x74, 0x68, 0x6f, 0x72, 0x69, 0x7a, 0x65, 0x64, 0x34, 0x30,
    0x33, 0x20, 0x46, 0x6f, 0x72, 0x62, 0x69, 0x64, 0x64, 0x65, 0x6e, 0x34, 0x30, 0x34, 0x20, 0x4e,
    0x6f, 0x74, 0x20, 0x46, 0x6f, 0x75, 0x6e, 0x64, 0x35, 0x30, 0x30, 0x20, 0x49, 0x6e, 0x74, 0x65,
    0x72, 0x6e, 0x61, 0x6c, 0x20, 0x53, 0x65, 0x72, 0x76, 0x65, 0x72, 0x20, 0x45, 0x72, 0x72, 0x6f,
    0x72, 0x35, 0x30, 0x31, 0x20, 0x4e, 0x6f, 0x74, 0x20, 0x49, 0x6d, 0x70, 0x6c, 0x65, 0x6d, 0x65,
    0x6e, 0x74, 0x65, 0x64, 0x35, 0x30, 0x33, 0x20, 0x53, 0x65, 0x72, 0x76, 0x69, 0x63, 0x65, 0x20,
    0x55, 0x6e, 0x61, 0x76, 0x61, 0x69, 0x6c, 0x61, 0x62, 0x6c, 0x65, 0x4a, 0x61, 0x6e, 0x20, 0x46,
    0x65, 0x62, 0x20, 0x4d, 0x61, 0x72, 0x20, 0x41, 0x70, 0x72, 0x20, 0x4d, 0x61, 0x79, 0x20, 0x4a,
    0x75, 0x6e, 0x20, 0x4a, 0x75, 0x6c, 0x20, 0x41, 0x75, 0x67, 0x20, 0x53, 0x65, 0x70, 0x74, 0x20,
    0x4f, 0x63, 0x74, 0x20, 0x4e, 0x6f, 0x76, 0x20, 0x44, 0x65, 0x63, 0x20, 0x30, 0x30, 0x3a, 0x30,
    0x30, 0x3a, 0x30, 0x30, 0x20, 0x4d, 0x6f, 0x6e, 0x2c, 0x20, 0x54, 0x75, 0x65, 0x2c, 0x20, 0x57,
    0x65, 0x64, 0x2c, 0x20, 0x54, 0x68, 0x75, 0x2c, 0x20, 0x46, 0x72, 0x69, 0x2c, 0x20, 0x53, 0x61,
    0x74, 0x2c, 0x20, 0x53, 0x75, 0x6e, 0x2c, 0x20, 0x47, 0x4d, 0x54, 0x63, 0x68, 0x75, 0x6e, 0x6b,
    0x65, 0x64, 0x2c, 0x74, 0x65, 0x78, 0x74, 0x2f, 0x68, 0x74, 0x6d, 0x6c, 0x2c, 0x69, 0x6d, 0x61,
    0x67, 0x65, 0x2f, 0x70, 0x6e, 0x67, 0x2c, 0x69, 0x6d, 0x61, 0x67, 0x65, 0x2f, 0x6a, 0x70, 0x67,
    0x2c, 0x69, 0x6d, 0x61, 0x67, 0x65, 0x2f, 0x67, 0x69, 0x66, 0x2c, 0x61, 0x70, 0x70, 0x6c, 0x69,
    0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x2f, 0x78, 0x6d, 0x6c, 0x2c, 0x61, 0x70, 0x70, 0x6c, 0x69,
    0x63, 0x61, 0x74, 0x69, 0x6f, 0x6e, 0x2f, 0x78, 0x68, 0x74, 0x6d, 0x6c, 0x2b, 0x78, 0x6d, 0x6c,
    0x2c, 0x74, 0x65, 0x78, 0x74, 0x2f, 0x70, 0x6c, 0x61, 0x69, 0x6e, 0x2c, 0x74, 0x65, 0x78, 0x74,
    0x2f, 0x6a, 0x61, 0x76, 0x61, 0x73, 0x63, 0x72, 0x69, 0x70, 0x74, 0x2c, 0x70, 0x75, 0x62, 0x6c,
    0x69, 0x63, 0x70, 0x72, 0x69, 0x76, 0x61, 0x74, 0x65, 0x6d, 0x61, 0x78, 0x2d, 0x61, 0x67, 0x65,
    0x3d, 0x67, 0x7a, 0x69, 0x70, 0x2c, 0x64, 0x65, 0x66, 0x6c, 0x61, 0x74, 0x65, 0x2c, 0x73, 0x64,
    0x63, 0x68, 0x63, 0x68, 0x61, 0x72, 0x73, 0x65, 0x74, 0x3d, 0x75, 0x74, 0x66, 0x2d, 0x38, 0x63,
    0x68, 0x61, 0x72, 0x73, 0x65, 0x74, 0x3d, 0x69, 0x73, 0x6f, 0x2d, 0x38, 0x38, 0x35, 0x39, 0x2d,
    0x31, 0x2c, 0x75, 0x74, 0x66, 0x2d, 0x2c, 0x2a, 0x2c, 0x65, 0x6e, 0x71, 0x3d, 0x30, 0x2e,
];

/// A malformed or unsupported SPDY session.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SpdyError {
    #[error("SPDY version {0} is not supported (want 3)")]
    Version(u16),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
    #[error("header block: {0}")]
    Headers(String),
}

/// One decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    SynStream {
        id: u32,
        fin: bool,
        headers: Vec<(String, String)>,
    },
    Data {
        id: u32,
        fin: bool,
        data: Vec<u8>,
    },
    RstStream {
        id: u32,
    },
    Ping {
        id: u32,
    },
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, HEADERS, SYN_REPLY (we open no streams): not needed here.
    Other,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Inflates the client's header blocks: one zlib stream for the whole session.
pub(crate) struct HeaderDecoder(Decompress);

impl HeaderDecoder {
    pub fn new() -> Self {
        Self(Decompress::new(true))
    }

    fn inflate(&mut self, input: &[u8]) -> Result<Vec<u8>, SpdyError> {
        let err = |e: flate2::DecompressError| SpdyError::Headers(e.to_string());
        let mut out = Vec::with_capacity(input.len() * 4 + 512);
        let mut pos = 0usize;
        loop {
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity().max(4096));
            }
            let before = self.0.total_in();
            let res = self
                .0
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync);
            pos += usize::try_from(self.0.total_in() - before).unwrap_or(0);
            match res {
                Ok(_) => {
                    if pos >= input.len() && out.len() < out.capacity() {
                        return Ok(out);
                    }
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.0.set_dictionary(DICTIONARY).map_err(err)?;
                }
                Err(e) => return Err(err(e)),
            }
            if out.len() > MAX_FRAME {
                return Err(SpdyError::Headers("header block too large".into()));
            }
        }
    }

    /// Parses a compressed header block into (lower-case name, value) pairs (values with NULs stay joined).
    pub fn decode(&mut self, block: &[u8]) -> Result<Vec<(String, String)>, SpdyError> {
        let raw = self.inflate(block)?;
        let bad = || SpdyError::Headers("truncated header block".into());
        let n = u32_at(&raw, 0).ok_or_else(bad)? as usize;
        let mut at = 4;
        let mut out = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let mut field = || -> Result<String, SpdyError> {
                let len = u32_at(&raw, at).ok_or_else(bad)? as usize;
                let s = raw.get(at + 4..at + 4 + len).ok_or_else(bad)?;
                at += 4 + len;
                Ok(String::from_utf8_lossy(s).into_owned())
            };
            let name = field()?;
            let value = field()?;
            out.push((name.to_ascii_lowercase(), value));
        }
        Ok(out)
    }
}

/// Deflates our header blocks: one zlib stream for the whole session, so blocks are made in wire order.
pub(crate) struct HeaderEncoder {
    deflate: Compress,
    started: bool,
}

impl HeaderEncoder {
    pub fn new() -> Self {
        Self {
            deflate: Compress::new(Compression::default(), true),
            started: false,
        }
    }

    pub fn encode(&mut self, headers: &[(&str, &str)]) -> Result<Vec<u8>, SpdyError> {
        let err = |e: flate2::CompressError| SpdyError::Headers(e.to_string());
        if !self.started {
            self.deflate.set_dictionary(DICTIONARY).map_err(err)?;
            self.started = true;
        }
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (k, v) in headers {
            for s in [k, v] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut pos = 0usize;
        loop {
            if out.capacity() - out.len() < 256 {
                out.reserve(1024);
            }
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&raw[pos..], &mut out, FlushCompress::Sync)
                .map_err(err)?;
            pos += usize::try_from(self.deflate.total_in() - before).unwrap_or(0);
            if pos >= raw.len() && out.len() < out.capacity() {
                return Ok(out);
            }
        }
    }
}

/// Splits one complete frame off the front of `buf` (the bytes of the session so far), if there is one.
pub(crate) fn next_frame(
    buf: &mut Vec<u8>,
    headers: &mut HeaderDecoder,
) -> Result<Option<Frame>, SpdyError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = (usize::from(buf[5]) << 16) | (usize::from(buf[6]) << 8) | usize::from(buf[7]);
    if buf.len() < 8 + len {
        return Ok(None);
    }
    let frame: Vec<u8> = buf.drain(..8 + len).collect();
    let flags = frame[4];
    let body = &frame[8..];
    if frame[0] & 0x80 == 0 {
        let id = u32_at(&frame, 0).unwrap_or(0) & 0x7fff_ffff;
        return Ok(Some(Frame::Data {
            id,
            fin: flags & FLAG_FIN != 0,
            data: body.to_vec(),
        }));
    }
    let version = u16::from_be_bytes([frame[0] & 0x7f, frame[1]]);
    if version != VERSION {
        return Err(SpdyError::Version(version));
    }
    let typ = u16::from_be_bytes([frame[2], frame[3]]);
    Ok(Some(match typ {
        SYN_STREAM => {
            // Stream-ID, Associated-To-Stream-ID, priority and slot, then the header block.
            if body.len() < 10 {
                return Err(SpdyError::Malformed("SYN_STREAM"));
            }
            let id = u32_at(body, 0).unwrap_or(0) & 0x7fff_ffff;
            Frame::SynStream {
                id,
                fin: flags & FLAG_FIN != 0,
                headers: headers.decode(&body[10..])?,
            }
        }
        RST_STREAM => Frame::RstStream {
            id: u32_at(body, 0).ok_or(SpdyError::Malformed("RST_STREAM"))? & 0x7fff_ffff,
        },
        PING => Frame::Ping {
            id: u32_at(body, 0).ok_or(SpdyError::Malformed("PING"))?,
        },
        GOAWAY => Frame::GoAway,
        _ => Frame::Other,
    }))
}

fn control(typ: u16, flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + body.len());
    f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
    f.extend_from_slice(&typ.to_be_bytes());
    f.push(flags);
    f.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(body);
    f
}

fn data_frame(id: u32, fin: bool, data: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(8 + data.len());
    f.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
    f.push(if fin { FLAG_FIN } else { 0 });
    f.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
    f.extend_from_slice(data);
    f
}

fn syn_reply(headers: &mut HeaderEncoder, id: u32) -> Result<Vec<u8>, SpdyError> {
    let mut body = id.to_be_bytes().to_vec();
    body.extend_from_slice(&headers.encode(&[])?);
    Ok(control(SYN_REPLY, 0, &body))
}

fn rst_stream(id: u32) -> Vec<u8> {
    let mut body = (id & 0x7fff_ffff).to_be_bytes().to_vec();
    body.extend_from_slice(&CANCEL.to_be_bytes());
    control(RST_STREAM, 0, &body)
}

/// GOAWAY with the last stream we accepted and status OK.
fn go_away(last: u32) -> Vec<u8> {
    let mut body = (last & 0x7fff_ffff).to_be_bytes().to_vec();
    body.extend_from_slice(&0u32.to_be_bytes());
    control(GOAWAY, 0, &body)
}

/// The value of header `name` (lower case) of a stream.
pub(crate) fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// The first protocol of the client's offer (the values of every `X-Stream-Protocol-Version` header, in its order
/// of preference, also comma-separated) that is one of `ours` (Ref: apimachinery `httpstream.Handshake`).
pub(crate) fn negotiate<'a>(
    offered: impl IntoIterator<Item = &'a str>,
    ours: &[&'static str],
) -> Option<&'static str> {
    offered
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| ours.iter().find(|o| **o == p).copied())
}

/// What the client did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The client opened stream `id` (already answered with a SYN_REPLY); `fin`: it will send nothing on it.
    Stream {
        id: u32,
        headers: Vec<(String, String)>,
        fin: bool,
    },
    Data {
        id: u32,
        data: Vec<u8>,
        fin: bool,
    },
    Reset {
        id: u32,
    },
}

enum Command {
    Reply(u32),
    Data { id: u32, data: Vec<u8>, fin: bool },
    Reset(u32),
    Ping(u32),
}

/// Writes on the client's streams; the connection closes once every clone is dropped.
#[derive(Clone)]
pub(crate) struct Sender(mpsc::Sender<Command>);

impl Sender {
    /// Sends `data` on stream `id` in frames of at most 32 KiB; false once the connection is gone.
    pub async fn data(&self, id: u32, data: &[u8]) -> bool {
        for chunk in data.chunks(CHUNK) {
            let cmd = Command::Data {
                id,
                data: chunk.to_vec(),
                fin: false,
            };
            if self.0.send(cmd).await.is_err() {
                return false;
            }
        }
        true
    }

    /// Ends our side of stream `id` (an empty data frame with FIN).
    pub async fn fin(&self, id: u32) -> bool {
        let cmd = Command::Data {
            id,
            data: Vec::new(),
            fin: true,
        };
        self.0.send(cmd).await.is_ok()
    }

    /// Resets stream `id` (RST_STREAM, CANCEL).
    pub async fn reset(&self, id: u32) -> bool {
        self.0.send(Command::Reset(id)).await.is_ok()
    }
}

/// A served SPDY connection: the client's events, in order, until it closes (or breaks the protocol), and the
/// sender for our frames.
pub(crate) struct Connection {
    pub events: mpsc::Receiver<Event>,
    pub sender: Sender,
}

/// Serves SPDY on an upgraded HTTP connection.
pub(crate) fn over_io<S>(io: S) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (r, w) = tokio::io::split(io);
    start(Source::Raw(r), Wire::Raw(w))
}

/// Serves SPDY carried in the binary messages of a WebSocket.
pub(crate) fn over_websocket<S>(ws: WebSocketStream<S>) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sink, source) = ws.split();
    start(Source::Ws(source), Wire::Ws(sink))
}

enum Source<S> {
    Raw(ReadHalf<S>),
    Ws(SplitStream<WebSocketStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Source<S> {
    /// Appends what arrived to `buf`; false at the end of the connection.
    async fn read(&mut self, buf: &mut Vec<u8>) -> bool {
        match self {
            Source::Raw(r) => {
                let mut chunk = [0u8; 16 * 1024];
                match r.read(&mut chunk).await {
                    Ok(0) | Err(_) => false,
                    Ok(n) => {
                        buf.extend_from_slice(&chunk[..n]);
                        true
                    }
                }
            }
            Source::Ws(s) => loop {
                match s.next().await {
                    Some(Ok(Message::Binary(b))) => {
                        buf.extend_from_slice(&b);
                        return true;
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return false,
                    Some(Ok(_)) => continue,
                }
            },
        }
    }
}

enum Wire<S> {
    Raw(WriteHalf<S>),
    Ws(SplitSink<WebSocketStream<S>, Message>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    async fn feed(&mut self, frame: Vec<u8>) -> bool {
        match self {
            Wire::Raw(w) => w.write_all(&frame).await.is_ok(),
            Wire::Ws(s) => s.feed(Message::Binary(frame.into())).await.is_ok(),
        }
    }

    async fn flush(&mut self) -> bool {
        match self {
            Wire::Raw(w) => w.flush().await.is_ok(),
            Wire::Ws(s) => s.flush().await.is_ok(),
        }
    }

    async fn close(&mut self) {
        match self {
            Wire::Raw(w) => {
                let _ = w.shutdown().await;
            }
            Wire::Ws(s) => {
                let _ = s.close().await;
            }
        }
    }
}

fn start<S>(source: Source<S>, wire: Wire<S>) -> Connection
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (commands, command_rx) = mpsc::channel::<Command>(64);
    let (event_tx, events) = mpsc::channel::<Event>(64);
    // The reader answers with replies and pongs but must not keep the connection open by itself.
    let reader = tokio::spawn(read_loop(source, commands.downgrade(), event_tx));
    tokio::spawn(write_loop(wire, command_rx, reader.abort_handle()));
    Connection {
        events,
        sender: Sender(commands),
    }
}

async fn read_loop<S>(
    mut source: Source<S>,
    commands: mpsc::WeakSender<Command>,
    events: mpsc::Sender<Event>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let command = |c: Command| {
        let commands = commands.clone();
        async move {
            if let Some(tx) = commands.upgrade() {
                let _ = tx.send(c).await;
            }
        }
    };
    let mut headers = HeaderDecoder::new();
    let mut buf = Vec::new();
    loop {
        loop {
            let frame = match next_frame(&mut buf, &mut headers) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(error = %e, "SPDY session ended: protocol error");
                    return;
                }
            };
            let event = match frame {
                Frame::SynStream { id, fin, headers } => {
                    command(Command::Reply(id)).await;
                    Event::Stream { id, headers, fin }
                }
                Frame::Data { id, fin, data } => Event::Data { id, data, fin },
                Frame::RstStream { id } => Event::Reset { id },
                Frame::Ping { id } => {
                    command(Command::Ping(id)).await;
                    continue;
                }
                Frame::GoAway => return,
                Frame::Other => continue,
            };
            if events.send(event).await.is_err() {
                return;
            }
        }
        if !source.read(&mut buf).await {
            return;
        }
    }
}

async fn write_loop<S>(
    mut wire: Wire<S>,
    mut commands: mpsc::Receiver<Command>,
    reader: tokio::task::AbortHandle,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut headers = HeaderEncoder::new();
    let mut last_stream = 0;
    'run: while let Some(first) = commands.recv().await {
        // Write what is queued, then flush once.
        let mut next = Some(first);
        while let Some(cmd) = next {
            let frame = match cmd {
                Command::Reply(id) => {
                    last_stream = last_stream.max(id);
                    match syn_reply(&mut headers, id) {
                        Ok(f) => f,
                        Err(e) => {
                            tracing::debug!(error = %e, "SPDY reply could not be encoded");
                            break 'run;
                        }
                    }
                }
                Command::Data { id, data, fin } => data_frame(id, fin, &data),
                Command::Reset(id) => rst_stream(id),
                Command::Ping(id) => control(PING, 0, &id.to_be_bytes()),
            };
            if !wire.feed(frame).await {
                break 'run;
            }
            next = commands.try_recv().ok();
        }
        if !wire.flush().await {
            break;
        }
    }
    // Every sender is gone (or the client stopped reading): GOAWAY and close, bounded in time.
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        if wire.feed(go_away(last_stream)).await {
            wire.flush().await;
        }
        wire.close().await;
    })
    .await;
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syn_stream(codec: &mut HeaderEncoder, id: u32, headers: &[(&str, &str)]) -> Vec<u8> {
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&codec.encode(headers).unwrap());
        control(SYN_STREAM, 0, &body)
    }

    #[test]
    fn the_dictionary_is_the_specs() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.ends_with(b"enq=0."));
    }

    #[test]
    fn frames_round_trip_with_compressed_headers_across_a_session() {
        let (mut client, mut server) = (HeaderEncoder::new(), HeaderDecoder::new());
        let mut wire = syn_stream(
            &mut client,
            1,
            &[("streamType", "error"), ("port", "80"), ("requestID", "0")],
        );
        wire.extend(syn_stream(
            &mut client,
            3,
            &[("streamType", "data"), ("port", "80"), ("requestID", "0")],
        ));
        wire.extend(data_frame(3, true, b"GET /"));
        wire.extend(control(PING, 0, &7u32.to_be_bytes()));
        // Frames may arrive split anywhere.
        let mut buf = wire[..5].to_vec();
        assert_eq!(next_frame(&mut buf, &mut server).unwrap(), None);
        buf.extend_from_slice(&wire[5..]);
        let first = next_frame(&mut buf, &mut server).unwrap().unwrap();
        assert_eq!(
            first,
            Frame::SynStream {
                id: 1,
                fin: false,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("port".into(), "80".into()),
                    ("requestid".into(), "0".into())
                ]
            }
        );
        // The second header block only decodes with the shared zlib context of the first.
        assert!(matches!(
            next_frame(&mut buf, &mut server).unwrap(),
            Some(Frame::SynStream { id: 3, .. })
        ));
        assert_eq!(
            next_frame(&mut buf, &mut server).unwrap(),
            Some(Frame::Data {
                id: 3,
                fin: true,
                data: b"GET /".to_vec()
            })
        );
        assert_eq!(
            next_frame(&mut buf, &mut server).unwrap(),
            Some(Frame::Ping { id: 7 })
        );
        assert!(buf.is_empty());
        // Our replies decode on the client's side.
        let (mut ours, mut theirs) = (HeaderEncoder::new(), HeaderDecoder::new());
        let reply = syn_reply(&mut ours, 1).unwrap();
        assert_eq!(u16::from_be_bytes([reply[2], reply[3]]), SYN_REPLY);
        assert_eq!(theirs.decode(&reply[12..]).unwrap(), vec![]);
    }

    #[test]
    fn other_spdy_versions_are_refused() {
        let mut f = control(PING, 0, &[0, 0, 0, 1]);
        f[1] = 2;
        let mut buf = f;
        assert_eq!(
            next_frame(&mut buf, &mut HeaderDecoder::new()),
            Err(SpdyError::Version(2))
        );
    }

    #[test]
    fn the_clients_first_supported_protocol_wins() {
        let ours = ["v4.channel.k8s.io"];
        assert_eq!(
            negotiate(
                [
                    "v5.channel.k8s.io",
                    "v4.channel.k8s.io",
                    "v3.channel.k8s.io"
                ],
                &ours
            ),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(
            negotiate(["v5.channel.k8s.io, v4.channel.k8s.io"], &ours),
            Some("v4.channel.k8s.io")
        );
        assert_eq!(negotiate(["channel.k8s.io"], &ours), None);
        assert_eq!(negotiate([], &ours), None);
    }

    /// A client's side of a connection over an in-memory pipe.
    struct Client {
        io: tokio::io::DuplexStream,
        headers: HeaderEncoder,
        replies: HeaderDecoder,
        buf: Vec<u8>,
    }

    impl Client {
        async fn send(&mut self, frame: Vec<u8>) {
            self.io.write_all(&frame).await.unwrap();
        }

        async fn open(&mut self, id: u32, stream_type: &str) {
            let f = syn_stream(&mut self.headers, id, &[("streamType", stream_type)]);
            self.send(f).await;
        }

        async fn frame(&mut self) -> Option<Frame> {
            loop {
                // Our SYN_REPLYs come back as `Other` (a client would decode them); check the raw type first.
                if self.buf.len() >= 8 && self.buf[0] & 0x80 != 0 {
                    let typ = u16::from_be_bytes([self.buf[2], self.buf[3]]);
                    if typ == SYN_REPLY {
                        let len = (usize::from(self.buf[5]) << 16)
                            | (usize::from(self.buf[6]) << 8)
                            | usize::from(self.buf[7]);
                        if self.buf.len() >= 8 + len {
                            let f: Vec<u8> = self.buf.drain(..8 + len).collect();
                            assert_eq!(self.replies.decode(&f[12..]).unwrap(), vec![]);
                            return Some(Frame::Other);
                        }
                    }
                }
                if let Some(f) = next_frame(&mut self.buf, &mut self.replies).unwrap() {
                    return Some(f);
                }
                let mut chunk = [0u8; 4096];
                let n = self.io.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }
    }

    #[tokio::test]
    async fn streams_are_replied_pings_echoed_and_the_connection_ends_with_goaway() {
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let mut conn = over_io(ours);
        let mut client = Client {
            io: theirs,
            headers: HeaderEncoder::new(),
            replies: HeaderDecoder::new(),
            buf: Vec::new(),
        };
        client.open(1, "error").await;
        client.open(3, "stdout").await;
        client.send(control(PING, 0, &9u32.to_be_bytes())).await;
        client.send(data_frame(3, true, b"")).await;
        match conn.events.recv().await.unwrap() {
            Event::Stream { id: 1, headers, .. } => {
                assert_eq!(header(&headers, "streamtype"), Some("error"))
            }
            e => panic!("{e:?}"),
        }
        assert!(matches!(
            conn.events.recv().await,
            Some(Event::Stream { id: 3, .. })
        ));
        assert_eq!(
            conn.events.recv().await,
            Some(Event::Data {
                id: 3,
                data: vec![],
                fin: true
            })
        );
        assert_eq!(client.frame().await, Some(Frame::Other));
        assert_eq!(client.frame().await, Some(Frame::Other));
        assert_eq!(client.frame().await, Some(Frame::Ping { id: 9 }));
        // A large write is split into frames; FIN ends the stream.
        let big = vec![7u8; CHUNK + 10];
        assert!(conn.sender.data(3, &big).await);
        assert!(conn.sender.fin(3).await);
        let mut got = Vec::new();
        loop {
            match client.frame().await.unwrap() {
                Frame::Data { id: 3, fin, data } => {
                    got.extend(data);
                    if fin {
                        break;
                    }
                }
                f => panic!("{f:?}"),
            }
        }
        assert_eq!(got, big);
        drop(conn);
        assert_eq!(client.frame().await, Some(Frame::GoAway));
        assert_eq!(client.frame().await, None);
    }
}
