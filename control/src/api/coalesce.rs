//! A connection's writes gathered into one socket write per scheduling round.
//!
//! Why: hyper's HTTP/2 server flushes its connection after every poll, and a stream that finishes its response
//! wakes the connection task into the worker's LIFO slot, so it runs — and writes — before the other streams
//! that became ready in the same store batch get their turn. Measured on pod creates (curl, 64 streams in
//! flight): one `writev` per response, each a TLS record, a TCP segment and a loopback softirq of its own.
//! grpc-go (etcd's server) batches the other way: its writer flushes only once no frame is queued.
//!
//! [`Coalescing`] sits between the TCP socket and TLS: writes are kept in a buffer, and the first flush after
//! new data yields once (the task re-queues itself behind the tasks already ready) before writing the buffer,
//! so the responses finished meanwhile go out in the same write. An idle server pays one extra poll per flush;
//! a write never waits for anything but the tasks that were already runnable.
//!
//! Only HTTP/2 connections gather ([`Coalescing::gather`], once ALPN has chosen the protocol): many streams
//! share them. An HTTP/1.1 connection carries one request at a time, so it would only pay the yield, and its
//! upgraded streams (exec, attach, port-forward) are copied by code that may drop the connection after an
//! error without a last flush: their bytes must reach the socket as they are written, as on a plain socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes above which a write first drains the buffer to the socket (backpressure: a slow reader
/// cannot grow it without bound).
const HIGH_WATER: usize = 256 * 1024;

/// An I/O stream whose writes are gathered until a flush, and whose flushes yield once before writing.
pub(crate) struct Coalescing<T> {
    inner: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already written to `inner`.
    written: usize,
    /// Whether this flush already yielded once.
    yielded: bool,
    /// Whether writes are gathered; until then (and after) they go straight to `inner`.
    gathering: bool,
}

impl<T> Coalescing<T> {
    /// A stream that writes straight through until [`Coalescing::gather`] turns gathering on.
    pub(crate) fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            written: 0,
            yielded: false,
            gathering: false,
        }
    }

    /// Turns gathering writes on or off; bytes already gathered are written before any later write.
    pub(crate) fn gather(&mut self, on: bool) {
        self.gathering = on;
    }
}

impl<T: AsyncWrite + Unpin> Coalescing<T> {
    /// Writes the whole buffer to `inner`.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            match Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.written..]) {
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "the connection accepts no more bytes",
                    )))
                }
                Poll::Ready(Ok(n)) => self.written += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.buf.clear();
        self.written = 0;
        // A buffer grown by a burst is not kept for the connection's lifetime.
        if self.buf.capacity() > HIGH_WATER {
            self.buf = Vec::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Room for more bytes: below the high-water mark, or once the buffer is drained.
    fn poll_room(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.buf.len() < HIGH_WATER {
            return Poll::Ready(Ok(()));
        }
        self.poll_drain(cx)
    }

    /// Whether a write goes straight to `inner`: not gathering, and (then) nothing gathered is left before it.
    fn poll_passes_through(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        if self.gathering {
            return Poll::Ready(Ok(false));
        }
        match self.poll_drain(cx) {
            Poll::Ready(Ok(())) => Poll::Ready(Ok(true)),
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalescing<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalescing<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_passes_through(cx) {
            Poll::Ready(Ok(true)) => return Pin::new(&mut this.inner).poll_write(cx, data),
            Poll::Ready(Ok(false)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match this.poll_room(cx) {
            Poll::Ready(Ok(())) => {
                this.buf.extend_from_slice(data);
                Poll::Ready(Ok(data.len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match this.poll_passes_through(cx) {
            Poll::Ready(Ok(true)) => {
                return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
            }
            Poll::Ready(Ok(false)) => {}
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => return Poll::Pending,
        }
        match this.poll_room(cx) {
            Poll::Ready(Ok(())) => {
                let mut n = 0;
                for b in bufs {
                    this.buf.extend_from_slice(b);
                    n += b.len();
                }
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.gathering || self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.gathering && this.written < this.buf.len() && !this.yielded {
            // Woken while running, a tokio task goes to the back of its worker's queue (not the LIFO slot).
            this.yielded = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match this.poll_drain(cx) {
            Poll::Ready(Ok(())) => {}
            other => return other,
        }
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A sink that records each write it gets and can refuse writes until released.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        blocked: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.blocked {
                return Poll::Pending;
            }
            self.get_mut().writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_until_a_flush_reach_the_socket_as_one_write() {
        let mut conn = Coalescing::new(Recorder::default());
        conn.gather(true);
        conn.write_all(b"HEADERS").await.expect("write");
        conn.write_all(b"DATA").await.expect("write");
        assert!(
            conn.inner.writes.is_empty(),
            "nothing is written before a flush"
        );
        conn.flush().await.expect("flush");
        assert_eq!(conn.inner.writes, vec![b"HEADERSDATA".to_vec()]);
        // A flush with nothing new neither yields nor writes.
        conn.flush().await.expect("flush");
        assert_eq!(conn.inner.writes.len(), 1);
    }

    #[tokio::test]
    async fn the_first_flush_yields_once_then_writes() {
        let mut conn = Coalescing::new(Recorder::default());
        conn.gather(true);
        conn.write_all(b"response").await.expect("write");
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(Pin::new(&mut conn).poll_flush(&mut cx).is_pending());
        assert!(conn.inner.writes.is_empty());
        assert!(matches!(
            Pin::new(&mut conn).poll_flush(&mut cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(conn.inner.writes, vec![b"response".to_vec()]);
    }

    #[tokio::test]
    async fn a_full_buffer_waits_for_the_socket() {
        let mut conn = Coalescing::new(Recorder {
            blocked: true,
            ..Default::default()
        });
        conn.gather(true);
        let chunk = vec![7u8; HIGH_WATER];
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(matches!(
            Pin::new(&mut conn).poll_write(&mut cx, &chunk),
            Poll::Ready(Ok(n)) if n == HIGH_WATER
        ));
        // At the high-water mark, a write must drain first; the socket takes nothing, so the writer waits.
        assert!(Pin::new(&mut conn)
            .poll_write(&mut cx, b"more")
            .is_pending());
        conn.inner.blocked = false;
        assert!(matches!(
            Pin::new(&mut conn).poll_write(&mut cx, b"more"),
            Poll::Ready(Ok(4))
        ));
        assert_eq!(conn.inner.writes.concat().len(), HIGH_WATER);
        assert!(Pin::new(&mut conn).poll_shutdown(&mut cx).is_ready());
        assert_eq!(conn.inner.writes.concat().len(), HIGH_WATER + 4);
    }

    #[tokio::test]
    async fn without_gathering_each_write_reaches_the_socket_at_once() {
        let mut conn = Coalescing::new(Recorder::default());
        conn.write_all(b"handshake").await.expect("write");
        assert_eq!(conn.inner.writes, vec![b"handshake".to_vec()]);
        conn.gather(true);
        conn.write_all(b"gathered").await.expect("write");
        assert_eq!(conn.inner.writes.len(), 1);
        // Turned off again (an upgraded stream): what was gathered goes first, then the new bytes, unbuffered.
        conn.gather(false);
        conn.write_all(b"direct").await.expect("write");
        assert_eq!(
            conn.inner.writes,
            vec![
                b"handshake".to_vec(),
                b"gathered".to_vec(),
                b"direct".to_vec()
            ]
        );
    }

    #[tokio::test]
    async fn bytes_pass_through_both_ways_over_a_real_stream() {
        let (a, b) = tokio::io::duplex(64);
        let mut a = Coalescing::new(a);
        let mut b = Coalescing::new(b);
        a.gather(true);
        b.gather(true);
        let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let sent = payload.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&sent).await.expect("write");
            a.shutdown().await.expect("shutdown");
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        writer.await.expect("writer");
        assert_eq!(got, payload);
    }
}
