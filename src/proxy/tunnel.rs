//! `CONNECT` tunnels: intercepted (TLS terminated with a minted leaf, or plain
//! HTTP when the first bytes are not a TLS ClientHello) or blind (bytes
//! copied both ways). Inner requests of an intercepted tunnel go through the
//! same pipeline as forward-mode requests.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::uri::Authority;
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::{handle, ProxyBody, ProxyState};

/// First byte of a TLS record carrying a handshake (ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// Serves an intercepted tunnel: TLS with `tls` if the client starts a
/// handshake, else plain HTTP/1.1.
pub(super) async fn serve_intercepted(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    upgraded: Upgraded,
    authority: Authority,
    tls: Arc<ServerConfig>,
) {
    let limits = state.limits;
    let mut shutdown = state.shutdown.clone();
    let mut io = TokioIo::new(upgraded);
    let mut first = [0u8; 1];
    // A tunnel that never says anything is closed like a slow request head.
    let n = match tokio::time::timeout(limits.header_read_timeout, io.read(&mut first)).await {
        Ok(Ok(0) | Err(_)) | Err(_) => return,
        Ok(Ok(n)) => n,
    };
    let io = Prefixed { prefix: Bytes::copy_from_slice(&first[..n]), inner: io };
    if first[0] == TLS_HANDSHAKE {
        let accepted =
            tokio::time::timeout(limits.header_read_timeout, tokio_rustls::TlsAcceptor::from(tls).accept(io));
        let stream = match accepted.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                // Typically a client that does not trust credproxy's CA.
                debug!(%peer, host = %authority.host(), error = %e, "TLS handshake in tunnel failed");
                return;
            }
            Err(_) => {
                debug!(%peer, host = %authority.host(), "TLS handshake in tunnel timed out");
                return;
            }
        };
        let svc = service_fn(move |req| inner(state.clone(), peer, "https", authority.clone(), req));
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes);
        builder.http2().timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
        let result = super::serve_until_drained!(builder.serve_connection(TokioIo::new(stream), svc), shutdown);
        if let Err(e) = result {
            debug!(%peer, error = %e, "intercepted tunnel ended with an error");
        }
    } else {
        // undici tunnels even http:// targets: plain HTTP inside CONNECT.
        let svc = service_fn(move |req| inner(state.clone(), peer, "http", authority.clone(), req));
        let result = super::serve_until_drained!(
            super::http1_builder(&limits).serve_connection(TokioIo::new(io), svc),
            shutdown
        );
        if let Err(e) = result {
            debug!(%peer, error = %e, "plain tunnel ended with an error");
        }
    }
}

/// Copies bytes both ways between the client and an already connected,
/// policy-checked upstream socket.
pub(super) async fn serve_blind(peer: SocketAddr, upgraded: Upgraded, mut upstream: TcpStream) {
    let mut client = TokioIo::new(upgraded);
    match tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
        Ok((up, down)) => debug!(%peer, up, down, "blind tunnel closed"),
        Err(e) => debug!(%peer, error = %e, "blind tunnel ended with an error"),
    }
}

type InnerFuture = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

/// An inner request: its target is the tunnel's authority, whatever the
/// request line or `Host` says. Boxed: the pipeline that spawned this tunnel
/// is the pipeline it calls, and the box breaks that type cycle.
fn inner(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    scheme: &'static str,
    authority: Authority,
    mut req: Request<Incoming>,
) -> InnerFuture {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match format!("{scheme}://{authority}{pq}").parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        Err(_) => *req.uri_mut() = Uri::from_static("/"), // origin-form: answered with 400 by the pipeline
    }
    Box::pin(handle(state, peer, req))
}

/// Replays bytes already read (the peeked first byte) before the stream.
struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
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
}
