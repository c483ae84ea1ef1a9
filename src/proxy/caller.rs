//! One caller's HTTP/1.1 connection — the proxy listener's, or the inside of
//! an intercepted tunnel — as an object with a few verbs: read the next
//! head, turn it into a request, run the pipeline, respond, and reclaim the
//! connection for the next request (or close it without losing the answer).
//! [`serve_h1`] is the loop over them.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use http_body_util::Full;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tracing::debug;

use super::drain::DrainGuard;
use super::{forward, handle, take_fields, ConnMemo, Handling, ProxyBody, ProxyError, ProxyState, TunnelTarget};
use crate::h1::server::{
    Continue, OnUpgrade, ReadSide, RequestBody, RequestHead, ResponseMeta, Transport, Upgraded, WriteHalf,
};
use crate::h1::{self, Framing, OwnFields};
use crate::upstream::CallerBody;

/// Request bodies read and dropped (so the connection can carry the next
/// request) when a response did not need them; more closes the connection.
const DISCARD_LIMIT: u64 = 256 * 1024;

/// Serves one HTTP/1.1 connection: read a head, run the pipeline, write the
/// response, and again while the caller keeps the connection alive.
pub(super) async fn serve_h1(state: &Arc<ProxyState>, io: Transport, peer: SocketAddr, tunnel: Option<TunnelTarget>) {
    let mut conn = CallerConn::new(state, io, peer, tunnel);
    loop {
        let head = match poll_fn(|cx| conn.poll_next_head(cx)).await {
            Ok(Some(head)) => head,
            // Closed by the caller, idle at shutdown, or too slow.
            Ok(None) => return,
            Err(refused) => return conn.refuse(refused).await,
        };
        let (parts, body, own) = conn.request(head);
        // The pipeline runs here, not in a method of its own: each async
        // layer is one more move of the request (and of the pipeline's
        // future) per request. `100 Continue` goes out when the pipeline
        // first reads the body; the caller gone meanwhile ends the connection.
        let (state, peer, memo) = (conn.state, conn.peer, &mut conn.memo);
        let resp = match &conn.ex.cont {
            None => {
                let mut h = Handling::begin(state, &parts);
                let result = forward(state, peer, parts, body, Some(own), &mut h.access, memo, h.started).await;
                h.finish(state, peer, result, memo)
            }
            Some(c) => {
                let req = Request::from_parts(parts, body);
                match with_continue(pin!(handle(state, peer, req, Some(own), memo)), c, &mut conn.wr).await {
                    Ok(resp) => resp,
                    Err(_) => return,
                }
            }
        };
        match conn.respond(resp).await {
            After::Next if conn.reclaim().await => {}
            After::Next | After::Close => return conn.close().await,
            After::Gone => return,
            After::Upgrade(to) => return conn.upgrade(to),
        }
    }
}

/// What ended the wait for a request head.
#[expect(clippy::large_enum_variant, reason = "returned once per request and matched at once; a box would allocate")]
enum HeadEvent {
    Head(Result<Option<RequestHead>, h1::Error>),
    Drained,
    TimedOut,
}

/// One request on its way through: what its response and the connection's
/// next step need to know. Kept in the connection and reset per request
/// (moving it through the verbs cost copies on every request).
#[derive(Default)]
struct Exchange {
    /// The body hands the read side back through here.
    home: Option<oneshot::Receiver<ReadSide>>,
    /// `Expect: 100-continue` with a body.
    cont: Option<Arc<Continue>>,
    /// `CONNECT`: where the connection goes after a 2xx.
    upgrade: Option<oneshot::Sender<Upgraded>>,
    keep_alive: bool,
    head_request: bool,
    http10: bool,
}

/// What follows a response.
enum After {
    /// Reclaim the connection for the next request.
    Next,
    /// Close it, letting the caller read the answer first.
    Close,
    /// It is gone (the write failed).
    Gone,
    /// A 2xx to `CONNECT`: the connection becomes the tunnel.
    Upgrade(oneshot::Sender<Upgraded>),
}

struct CallerConn<'a> {
    state: &'a Arc<ProxyState>,
    peer: SocketAddr,
    tunnel: Option<TunnelTarget>,
    /// The read side; while a request body is being read, the body has it.
    side: Option<ReadSide>,
    wr: WriteHalf,
    /// The response head being written (reused).
    out: Vec<u8>,
    /// When the head being read is due. One timer per connection, re-armed
    /// lazily: it fires at most once per `header_read_timeout`, and is then
    /// checked against this deadline (which moves on with every request).
    deadline: Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The timer has this task's waker: polled once, it keeps it until it
    /// fires (then it is polled again, checked and re-armed). Polling it on
    /// every wait for a head cost ~240 instructions a request.
    timer_armed: bool,
    drain: DrainGuard<'a>,
    /// What this connection resolved and proved last (a keep-alive caller
    /// repeats it).
    memo: ConnMemo,
    /// The request in flight.
    ex: Exchange,
}

impl<'a> CallerConn<'a> {
    fn new(state: &'a Arc<ProxyState>, io: Transport, peer: SocketAddr, tunnel: Option<TunnelTarget>) -> Self {
        let limits = state.limits;
        let (rd, wr) = io.split();
        let deadline = Instant::now() + limits.header_read_timeout;
        let memo = ConnMemo::in_tunnel(tunnel.as_ref().and_then(|t| t.caller.clone()));
        Self {
            state,
            peer,
            tunnel,
            side: Some(ReadSide::new(rd, limits.body_idle_timeout)),
            wr,
            out: Vec::with_capacity(1024),
            deadline,
            timer: Box::pin(tokio::time::sleep_until(deadline.into())),
            timer_armed: false,
            drain: DrainGuard { drain: &state.drain, id: None },
            memo,
            ex: Exchange::default(),
        }
    }

    /// The next request head. `Ok(None)`: the connection is done — the
    /// caller closed it, it was idle when shutdown started, or the head did
    /// not arrive in time. `Err`: a head to refuse ([`CallerConn::refuse`]).
    /// A poll function, not an `async fn`: no future of its own per request.
    /// Inlined: the head it returns is large, and is then written once.
    #[inline(always)]
    fn poll_next_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<RequestHead>, h1::Error>> {
        let Some(rs) = self.side.as_mut() else { return Poll::Ready(Ok(None)) };
        let state = self.state;
        let event = 'event: {
            if let Poll::Ready(r) = rs.poll_head(cx, state.limits.max_header_bytes) {
                break 'event HeadEvent::Head(r);
            }
            if self.drain.id.is_none() {
                self.drain.id = Some(state.drain.register(cx.waker()));
            }
            // An idle connection closes when shutdown starts; one mid-head finishes its request.
            if state.drain.is_draining() && !rs.has_partial_head() {
                break 'event HeadEvent::Drained;
            }
            if !self.timer_armed || self.timer.is_elapsed() {
                while self.timer.as_mut().poll(cx).is_ready() {
                    if Instant::now() >= self.deadline {
                        break 'event HeadEvent::TimedOut;
                    }
                    self.timer.as_mut().reset(self.deadline.into());
                }
                self.timer_armed = true;
            }
            return Poll::Pending;
        };
        Poll::Ready(match event {
            HeadEvent::Head(Ok(head)) => Ok(head),
            // A transport error: nobody to answer.
            HeadEvent::Head(Err(e)) if e.is_io() => Ok(None),
            HeadEvent::Head(Err(e)) => Err(e),
            HeadEvent::Drained => Ok(None),
            HeadEvent::TimedOut => {
                debug!(peer = %self.peer, "request head not received within proxy.header_read_timeout_ms; closing");
                Ok(None)
            }
        })
    }

    /// The request for the pipeline (head and body apart: the pipeline
    /// takes them so, no `Request` to build and take apart again), and the fields the codec set aside
    /// for the proxy (`X-Connection-Id`, `Proxy-Authorization`; the read
    /// side, home while a head is read, holds them). A body owns the read side while it is read, and
    /// sends it back when it ends (or is dropped half-read).
    #[inline(always)]
    fn request(&mut self, head: RequestHead) -> (http::request::Parts, CallerBody, OwnFields) {
        let RequestHead { mut parts, framing, keep_alive, expect_continue } = head;
        let own = self.side.as_mut().map(ReadSide::take_own).unwrap_or_default();
        if let Some(t) = &self.tunnel {
            parts.uri = t.absolute(&parts.uri);
        }
        let exchange = &mut self.ex;
        exchange.home = None;
        exchange.cont = None;
        exchange.upgrade = None;
        exchange.keep_alive = keep_alive;
        exchange.head_request = parts.method == Method::HEAD;
        exchange.http10 = parts.version == http::Version::HTTP_10;
        let connect = parts.method == Method::CONNECT;
        let body = match (framing, self.side.take()) {
            (Framing::Empty, side) => {
                self.side = side;
                RequestBody::empty()
            }
            (_, Some(mut rs)) => {
                rs.start_body(framing);
                let (tx, rx) = oneshot::channel();
                exchange.home = Some(rx);
                exchange.cont = expect_continue.then(|| Arc::new(Continue::default()));
                RequestBody::streaming(rs, tx, exchange.cont.clone())
            }
            // A head is only read when the read side is home.
            (_, None) => RequestBody::empty(),
        };
        if connect {
            let (tx, on_upgrade) = OnUpgrade::pair();
            parts.extensions.insert(on_upgrade);
            exchange.upgrade = Some(tx);
        }
        (parts, CallerBody::H1(body), own)
    }

    /// Writes the response, and says what comes next.
    #[inline(always)]
    async fn respond(&mut self, mut resp: Response<ProxyBody>) -> After {
        let exchange = &mut self.ex;
        // Is the read side back, and can the connection go on afterwards?
        if let Some(mut rx) = exchange.home.take() {
            self.side = rx.try_recv().ok();
        }
        let body_read = self.side.as_ref().is_some_and(ReadSide::body_done);
        let continue_unanswered = exchange.cont.as_ref().is_some_and(|c| !c.was_released());
        let mut close = !exchange.keep_alive || self.side.is_none() || self.state.drain.is_draining();
        // A caller still waiting for `100 Continue` may never send the body.
        close |= !body_read && continue_unanswered;
        let status = resp.status();
        let meta = ResponseMeta {
            head_request: exchange.head_request,
            connect: exchange.upgrade.is_some(),
            http10: exchange.http10,
            close,
            send_timeout: self.state.limits.send_timeout,
        };
        // An HTTP/1.1 upstream's fields are copied to the caller as they came.
        let fields = take_fields(&mut resp);
        match h1::server::write_response(&mut self.wr, &mut self.out, resp, fields, meta).await {
            Ok(true) => {}
            Ok(false) => close = true,
            Err(e) => {
                debug!(peer = %self.peer, error = %e, "writing the response failed; closing");
                return After::Gone;
            }
        }
        match self.ex.upgrade.take() {
            Some(to) if status.is_success() => After::Upgrade(to),
            _ if close => After::Close,
            _ => After::Next,
        }
    }

    /// Makes the connection ready for the next request: a body the pipeline
    /// did not read is read and dropped if it is small. False: it cannot go on.
    async fn reclaim(&mut self) -> bool {
        let Some(rs) = self.side.as_mut() else { return false };
        if !rs.body_done() {
            let header_read_timeout = self.state.limits.header_read_timeout;
            let discarded = tokio::time::timeout(header_read_timeout, rs.discard_body(DISCARD_LIMIT)).await;
            if !matches!(discarded, Ok(Ok(true))) {
                return false;
            }
        }
        self.deadline = Instant::now() + self.state.limits.header_read_timeout;
        true
    }

    /// Answers a head that could not be read (400, 431), then closes.
    async fn refuse(mut self, e: h1::Error) {
        let err = match e {
            h1::Error::HeadTooLarge(limit) => ProxyError::HeadTooLarge { limit },
            h1::Error::TooManyHeaders => ProxyError::TooManyHeaders,
            h1::Error::Malformed(why) => ProxyError::Malformed(why),
            _ => ProxyError::Malformed("invalid request"),
        };
        let problem = err.problem();
        debug!(error = %err, code = %problem.code, "request head refused");
        let metrics = &self.state.outbound.metrics;
        metrics.error(problem.code);
        metrics.request(None, problem.status().as_u16());
        let resp = problem.to_proxy_response().map(Full::new);
        let meta = ResponseMeta {
            head_request: false,
            connect: false,
            http10: false,
            close: true,
            send_timeout: self.state.limits.send_timeout,
        };
        let written = h1::server::write_response(&mut self.wr, &mut self.out, resp, None, meta);
        let _ = tokio::time::timeout(Duration::from_secs(5), written).await;
        self.close().await;
    }

    /// Closes the connection without losing the response just written:
    /// stop writing (FIN), then read and drop what the caller still sends
    /// for a moment, so unread input does not make the kernel reset it.
    async fn close(mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), self.wr.shutdown()).await;
        let Some(side) = self.side.take() else { return };
        let (mut rd, _) = side.into_parts();
        let drain = async {
            let mut sink = vec![0u8; 16 * 1024];
            let mut total = 0usize;
            while total < 1024 * 1024 {
                match tokio::io::AsyncReadExt::read(&mut rd, &mut sink).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => total += n,
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
    }

    /// Hands the connection (and what the caller sent after its `CONNECT`
    /// head) to the tunnel waiting for it.
    fn upgrade(mut self, to: oneshot::Sender<Upgraded>) {
        let Some(side) = self.side.take() else { return };
        let (rd, leftover) = side.into_parts();
        if let Some(io) = Transport::join(rd, self.wr) {
            let _ = to.send(Upgraded::new(leftover, io));
        }
    }
}

/// Runs the pipeline, answering `100 Continue` when it first reads the body.
/// The pipeline is pinned where it was made: taken by value, its large
/// future would sit in this one's state twice and make every request's
/// future (this branch is laid out beside the common one) as large.
async fn with_continue<F: Future<Output = Response<ProxyBody>>>(
    mut pipeline: Pin<&mut F>,
    cont: &Continue,
    wr: &mut WriteHalf,
) -> std::io::Result<Response<ProxyBody>> {
    let mut wanted = false;
    let mut sent = 0;
    poll_fn(|cx| {
        if let Poll::Ready(resp) = pipeline.as_mut().poll(cx) {
            return Poll::Ready(Ok(resp));
        }
        if !wanted {
            wanted = cont.poll_wanted(cx).is_ready();
        }
        while wanted && sent < h1::server::CONTINUE.len() {
            match Pin::new(&mut *wr).poll_write(cx, &h1::server::CONTINUE[sent..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    sent += n;
                    if sent == h1::server::CONTINUE.len() {
                        cont.release();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        Poll::Pending
    })
    .await
}
