//! The I/O plumbing under the caller's side of HTTP/1.1: what a caller's
//! connection runs over (plain TCP, split without a lock, or anything else
//! boxed: the listener's TLS, an intercepted tunnel), its halves, a
//! stream with bytes already read put back in front (what followed a
//! `CONNECT` head, a peeked first byte), and TLS read a record at a time.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Anything a caller's connection can run over.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Io for T {}

/// A caller's connection: plain TCP (split without a lock) or anything else
/// (the listener's TLS, an intercepted tunnel), boxed.
pub enum Transport {
    Tcp(TcpStream),
    Boxed(Box<dyn Io>),
}

pub enum ReadHalf {
    Tcp(OwnedReadHalf),
    Boxed(tokio::io::ReadHalf<Box<dyn Io>>),
}

pub enum WriteHalf {
    Tcp(OwnedWriteHalf),
    Boxed(tokio::io::WriteHalf<Box<dyn Io>>),
}

impl Transport {
    pub fn split(self) -> (ReadHalf, WriteHalf) {
        match self {
            Self::Tcp(s) => {
                let (r, w) = s.into_split();
                (ReadHalf::Tcp(r), WriteHalf::Tcp(w))
            }
            Self::Boxed(b) => {
                let (r, w) = tokio::io::split(b);
                (ReadHalf::Boxed(r), WriteHalf::Boxed(w))
            }
        }
    }

    /// Puts split halves back together (they must come from one `split`).
    pub fn join(r: ReadHalf, w: WriteHalf) -> Option<Self> {
        match (r, w) {
            (ReadHalf::Tcp(r), WriteHalf::Tcp(w)) => r.reunite(w).ok().map(Self::Tcp),
            (ReadHalf::Boxed(r), WriteHalf::Boxed(w)) => {
                if r.is_pair_of(&w) {
                    Some(Self::Boxed(r.unsplit(w)))
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// `AsyncRead` / `AsyncWrite` for an enum over a TCP half and a boxed one,
/// passed through to whichever it holds.
macro_rules! delegate_io {
    (read $t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_read(cx, buf),
                    Self::Boxed(s) => Pin::new(s).poll_read(cx, buf),
                }
            }
        }
    };
    (write $t:ty) => {
        impl AsyncWrite for $t {
            fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write(cx, buf),
                    Self::Boxed(s) => Pin::new(s).poll_write(cx, buf),
                }
            }

            fn poll_write_vectored(
                self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[io::IoSlice<'_>],
            ) -> Poll<io::Result<usize>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                    Self::Boxed(s) => Pin::new(s).poll_write_vectored(cx, bufs),
                }
            }

            fn is_write_vectored(&self) -> bool {
                match self {
                    Self::Tcp(s) => s.is_write_vectored(),
                    Self::Boxed(s) => s.is_write_vectored(),
                }
            }

            fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_flush(cx),
                    Self::Boxed(s) => Pin::new(s).poll_flush(cx),
                }
            }

            fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                match self.get_mut() {
                    Self::Tcp(s) => Pin::new(s).poll_shutdown(cx),
                    Self::Boxed(s) => Pin::new(s).poll_shutdown(cx),
                }
            }
        }
    };
}

delegate_io!(read Transport);
delegate_io!(write Transport);
delegate_io!(read ReadHalf);
delegate_io!(write WriteHalf);

/// A stream with bytes already read from it put back in front: what a
/// caller sent after its `CONNECT` head, a peeked first byte.
pub struct Rewind<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Rewind<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Self { prefix, inner }
    }
}

/// A connection after a `2xx` answer to `CONNECT`.
pub type Upgraded = Rewind<Transport>;

impl<T: AsyncRead + Unpin> AsyncRead for Rewind<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Rewind<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A stream that keeps its own read buffer ([`AsyncBufRead`]: a TLS
/// session) read one fill at a time: a read hands over what the buffer
/// holds, or fills it once and hands that over. tokio-rustls' `poll_read`
/// goes on after a read that brought data, to fill the reader's buffer to
/// the brim — a read that would block, through rustls and tokio's
/// readiness (~400 instructions), after each request head and each
/// response that arrived (callgrind, `credproxy-connect`). The next read
/// takes whatever came since.
pub struct FillOnce<T>(pub T);

impl<T: AsyncBufRead + Unpin> AsyncRead for FillOnce<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let inner = &mut self.get_mut().0;
        let data = std::task::ready!(Pin::new(&mut *inner).poll_fill_buf(cx))?;
        let n = data.len().min(buf.remaining());
        buf.put_slice(&data[..n]);
        Pin::new(inner).consume(n);
        Poll::Ready(Ok(()))
    }
}

/// Largest vectored write [`FillOnce`] joins into one slice before the
/// session sees it: a response head and a small body. Larger writes go to
/// the session as they are (the copy would cost more than what it saves).
const JOIN_AT_MOST: usize = 2048;

thread_local! {
    /// Where [`FillOnce`] joins a small vectored write: one per thread, not
    /// per connection (it is used only for the length of one `poll_write`).
    static JOINED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A small vectored write is handed to the session as one slice: rustls
/// collects the slices of a vectored write of more than one into a vector,
/// an allocation on every response written (head and body), while the
/// record it seals is the same either way. (The codec writes a head, a
/// body and a chunk end as three slices, some of them empty.)
impl<T: AsyncWrite + Unpin> AsyncWrite for FillOnce<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let inner = Pin::new(&mut self.get_mut().0);
        let mut parts = bufs.iter().filter(|b| !b.is_empty());
        let first = parts.next();
        if parts.next().is_none() {
            // One slice with bytes (or none): nothing to join.
            return inner.poll_write(cx, first.map_or(&[][..], |b| &b[..]));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total > JOIN_AT_MOST {
            return inner.poll_write_vectored(cx, bufs);
        }
        JOINED.with(|joined| {
            // Never re-entered (the session's write does not come back here);
            // if it were, the slices go as they are.
            let Ok(mut joined) = joined.try_borrow_mut() else { return inner.poll_write_vectored(cx, bufs) };
            joined.clear();
            for b in bufs {
                joined.extend_from_slice(b);
            }
            inner.poll_write(cx, &joined)
        })
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records the slices of every write call and takes at most `take`
    /// bytes a call (what a socket with little room does).
    struct Recorder {
        calls: Vec<Vec<Vec<u8>>>,
        got: Vec<u8>,
        take: usize,
    }

    impl Recorder {
        fn taking(take: usize) -> Self {
            Self { calls: Vec::new(), got: Vec::new(), take }
        }

        fn accept(&mut self, parts: &[&[u8]]) -> usize {
            self.calls.push(parts.iter().map(|p| p.to_vec()).collect());
            let mut n = 0;
            for p in parts {
                let k = (self.take - n).min(p.len());
                self.got.extend_from_slice(&p[..k]);
                n += k;
            }
            n
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(self.get_mut().accept(&[buf])))
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let parts: Vec<&[u8]> = bufs.iter().map(|b| &b[..]).collect();
            Poll::Ready(Ok(self.get_mut().accept(&parts)))
        }

        fn is_write_vectored(&self) -> bool {
            true
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn write_vectored(w: &mut FillOnce<Recorder>, parts: &[&[u8]]) -> usize {
        let slices: Vec<io::IoSlice<'_>> = parts.iter().map(|p| io::IoSlice::new(p)).collect();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        match Pin::new(w).poll_write_vectored(&mut cx, &slices) {
            Poll::Ready(r) => r.unwrap(),
            Poll::Pending => panic!("the recorder never waits"),
        }
    }

    #[test]
    fn a_small_vectored_write_reaches_the_session_as_one_slice() {
        let mut w = FillOnce(Recorder::taking(usize::MAX));
        let head: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
        assert_eq!(write_vectored(&mut w, &[head, b"", b"hello"]), head.len() + 5);
        assert_eq!(w.0.calls, vec![vec![[head, b"hello"].concat()]]);
        // One part with bytes among empty ones: that part alone.
        assert_eq!(write_vectored(&mut w, &[b"", b"0\r\n\r\n", b""]), 5);
        assert_eq!(w.0.calls[1], vec![b"0\r\n\r\n".to_vec()]);
        // Nothing at all: nothing written.
        assert_eq!(write_vectored(&mut w, &[b"", b""]), 0);
        assert_eq!(w.0.got, [head, b"hello", b"0\r\n\r\n"].concat());
    }

    #[test]
    fn a_large_vectored_write_goes_to_the_session_as_it_is() {
        let mut w = FillOnce(Recorder::taking(usize::MAX));
        let body = vec![b'x'; JOIN_AT_MOST];
        assert_eq!(write_vectored(&mut w, &[b"head\r\n\r\n", &body, b""]), 8 + JOIN_AT_MOST);
        assert_eq!(w.0.calls, vec![vec![b"head\r\n\r\n".to_vec(), body.clone(), Vec::new()]]);
    }

    #[test]
    fn a_joined_write_taken_in_part_counts_what_the_session_took() {
        let mut w = FillOnce(Recorder::taking(7));
        let parts: [&[u8]; 3] = [b"HTTP/1.1 204", b" No Content\r\n\r\n", b""];
        let whole = parts.concat();
        let mut done = 0;
        while done < whole.len() {
            // The caller's way: what is left of the parts, in order.
            let mut left: Vec<&[u8]> = Vec::new();
            let mut skip = done;
            for p in parts {
                let k = skip.min(p.len());
                left.push(&p[k..]);
                skip -= k;
            }
            let n = write_vectored(&mut w, &left);
            assert!(n > 0 && n <= 7);
            done += n;
        }
        assert_eq!(w.0.got, whole);
        assert!(w.0.calls.iter().all(|c| c.len() == 1), "{:?}", w.0.calls);
    }
}
