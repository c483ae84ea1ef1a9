//! `CONNECT` tunnels: intercepted (TLS terminated with a minted leaf, or plain
//! HTTP when the first bytes are not a TLS ClientHello) or blind (bytes
//! copied both ways). Inner requests of an intercepted tunnel go through the
//! same pipeline as forward-mode requests: HTTP/1.1 through our own codec,
//! h2 (when the client picks it by ALPN) through hyper.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme as UriScheme};
use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tracing::debug;

use super::{handle, serve_h1, Caller, ConnMemo, ProxyState, TunnelTarget};
use crate::h1::server::{FillOnce, Rewind, Transport, Upgraded};
use crate::upstream::CallerBody;

/// First byte of a TLS record carrying a handshake (ClientHello).
const TLS_HANDSHAKE: u8 = 0x16;

/// A tunnel's future, boxed: the pipeline that spawns a tunnel is the
/// pipeline the tunnel runs, and the box breaks that type cycle.
pub(super) type Served = Pin<Box<dyn Future<Output = ()> + Send>>;

/// Serves an intercepted tunnel: TLS with `tls` if the client starts a
/// handshake, else plain HTTP/1.1.
pub(super) fn serve_intercepted(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    upgraded: Upgraded,
    authority: Authority,
    tls: Arc<ServerConfig>,
    caller: Option<Arc<Caller>>,
) -> Served {
    Box::pin(intercepted(state, peer, upgraded, authority, tls, caller))
}

async fn intercepted(
    state: Arc<ProxyState>,
    peer: SocketAddr,
    mut upgraded: Upgraded,
    authority: Authority,
    tls: Arc<ServerConfig>,
    caller: Option<Arc<Caller>>,
) {
    let limits = state.limits;
    let mut first = [0u8; 1];
    // A tunnel that never says anything is closed like a slow request head.
    let n = match tokio::time::timeout(limits.header_read_timeout, upgraded.read(&mut first)).await {
        Ok(Ok(0) | Err(_)) | Err(_) => return,
        Ok(Ok(n)) => n,
    };
    let io = Rewind::new(Bytes::copy_from_slice(&first[..n]), upgraded);
    if first[0] != TLS_HANDSHAKE {
        // undici tunnels even http:// targets: plain HTTP inside CONNECT.
        let target = TunnelTarget { scheme: UriScheme::HTTP, authority, caller };
        return serve_h1(&state, Transport::Boxed(Box::new(io)), peer, Some(target)).await;
    }
    let accepted = tokio::time::timeout(limits.header_read_timeout, tokio_rustls::TlsAcceptor::from(tls).accept(io));
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
    let target = TunnelTarget { scheme: UriScheme::HTTPS, authority, caller };
    if stream.get_ref().1.alpn_protocol() != Some(b"h2") {
        return serve_h1(&state, Transport::Boxed(Box::new(FillOnce(stream))), peer, Some(target)).await;
    }
    let mut shutdown = state.shutdown.clone();
    let target = Arc::new(target);
    let svc = service_fn(move |req| inner(state.clone(), peer, target.clone(), req));
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder.timer(TokioTimer::new()).max_header_list_size(limits.max_header_bytes as u32);
    // An h2 connection with no stream open waits for nothing else: it ends
    // when nothing has moved for the tunnel idle timeout.
    let activity = Activity::new();
    let serve = async {
        super::serve_until_drained!(builder.serve_connection(TokioIo::new(activity.watch(stream)), svc), shutdown)
    };
    tokio::select! {
        result = serve => if let Err(e) = result {
            debug!(%peer, error = %e, "intercepted h2 tunnel ended with an error");
        },
        () = activity.idle_for(limits.tunnel_idle_timeout) => debug!(%peer, "intercepted h2 tunnel idle; closed"),
    }
}

/// Copies bytes both ways between the client and an already connected,
/// policy-checked upstream socket, until either side closes or nothing
/// moves for `idle` (`proxy.tunnel_idle_timeout_secs`).
pub(super) async fn serve_blind(peer: SocketAddr, client: Upgraded, upstream: TcpStream, idle: Duration) {
    let activity = Activity::new();
    let (mut client, mut upstream) = (activity.watch(client), activity.watch(upstream));
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match r {
            Ok((up, down)) => debug!(%peer, up, down, "blind tunnel closed"),
            Err(e) => debug!(%peer, error = %e, "blind tunnel ended with an error"),
        },
        () = activity.idle_for(idle) => debug!(%peer, idle_secs = idle.as_secs(), "blind tunnel idle; closed"),
    }
}

/// When bytes last moved on a tunnel's streams.
#[derive(Clone)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: Arc<AtomicU64>,
}

impl Activity {
    fn new() -> Self {
        Self { start: Instant::now(), last: Arc::new(AtomicU64::new(0)) }
    }

    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn watch<T>(&self, io: T) -> Watched<T> {
        Watched { io, activity: self.clone() }
    }

    /// Resolves once nothing has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last.load(Ordering::Relaxed));
            if last.elapsed() >= idle {
                return;
            }
            tokio::time::sleep_until((last + idle).into()).await;
        }
    }
}

/// A stream that records in [`Activity`] when bytes move.
struct Watched<T> {
    io: T,
    activity: Activity,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

type InnerFuture = Pin<Box<dyn Future<Output = Result<http::Response<super::ProxyBody>, Infallible>> + Send>>;

/// An inner h2 request: its target is the tunnel's authority.
fn inner(state: Arc<ProxyState>, peer: SocketAddr, target: Arc<TunnelTarget>, req: Request<Incoming>) -> InnerFuture {
    let (mut parts, body) = req.into_parts();
    parts.uri = target.absolute(&parts.uri);
    let req = Request::from_parts(parts, CallerBody::H2(body));
    // Each stream its own memo: streams run at once.
    let mut memo = ConnMemo::in_tunnel(target.caller.clone());
    Box::pin(async move { Ok(super::fields_in_map(handle(&state, peer, req, None, &mut memo).await)) })
}
