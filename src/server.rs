//! The HTTP/1 server: actix-web's `HttpServer::listen`, rebuilt from its parts (actix-server,
//! actix-http's `HttpService`) so that every connection's socket is a [`GuardedStream`], which
//! bounds what one client can make the server buffer.
//!
//! Why: actix-http 3.20's h1 dispatcher reads up to 128 KiB of a connection and then decodes
//! *every* complete request in it into its pipeline queue (`MAX_PIPELINED_MESSAGES` = 16 is
//! checked only before decoding, dispatcher.rs l.916; the decode loop at l.929 has no limit);
//! each queued request costs ~7 KiB (a `HeaderMap` with capacity 16). A client that pipelines
//! `GET`s and never reads the answers pinned ~21 MiB per connection (150 such connections: RSS
//! 3.57 GiB), and with body-less responses its `write_buf` grows without limit too (the idle
//! branch pops the next request without looking at it, l.617). No upstream issue covers it
//! (actix/actix-web#4180, "Remove HTTP/1.x pipelining", would have, and was closed unmerged).
//!
//! So the stream reads only when that cannot build a backlog:
//! - not while the socket refuses our responses (the client does not read); it wakes when the
//!   socket is writable again, and a connection whose writes make no progress for
//!   `write_stall_timeout` is closed (actix-http has no write timeout);
//! - not while a request is in the app, except that request's own body;
//! - otherwise at most `read_chunk` bytes per dispatcher poll.
//!
//! So at most `read_chunk` bytes of pipelined requests are decoded ahead of the app (measured:
//! 50 connections that pipeline and never read grow RSS by 2–22 MiB, not by gigabytes).
//!
//! Workers, backlog, the connection cap, the shutdown timeout and signals are the same
//! `actix_server` builder `HttpServer::run` uses: SIGTERM stays graceful.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::{cell::Cell, fmt, future::Future, io, net, pin::Pin, rc::Rc, time::Duration};

use actix_http::{
    body::MessageBody, error::PayloadError, Extensions, HttpService, KeepAlive, Payload, Protocol,
};
use actix_http::{Request, Response};
use actix_server::ServerBuilder;
use actix_service::ServiceFactoryExt as _;
use actix_service::{
    apply_fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory,
};
use actix_web::{dev::AppConfig, http::header::CONTENT_LENGTH, web::Bytes, Error};
use futures_util::Stream;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::{sleep, Sleep},
};

/// Client connections open now, and the most open at once since `take_connection_high` last
/// ran: after many close, the service hands their freed memory back (`startup`).
static OPEN: AtomicUsize = AtomicUsize::new(0);
static HIGH: AtomicUsize = AtomicUsize::new(0);

pub fn open_connections() -> usize {
    OPEN.load(Ordering::Relaxed)
}

/// The most connections open at once since the last call (which it starts over from now).
pub fn take_connection_high() -> usize {
    HIGH.swap(OPEN.load(Ordering::Relaxed), Ordering::Relaxed)
}

/// Per-connection state shared by the stream and the service wrapper (via `conn_data`).
#[derive(Default)]
struct ConnState {
    busy: Cell<bool>,           // a request is in the service (h1: at most one)
    allowance: Cell<u64>,       // bytes we may read while busy (its `Content-Length` body)
    body_wanted: Cell<bool>,    // the handler waits for more of its chunked body
    waker: Cell<Option<Waker>>, // a read refused while busy; woken when that changes
}

impl ConnState {
    fn wake(&self) {
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// Wraps a chunked request body (its length is unknown): we read only when the handler waits
/// for more of it, so little can be read past its end (where pipelined requests would follow).
struct ChunkedBody<S>(S, Rc<ConnState>);
impl<S: Stream<Item = Result<Bytes, PayloadError>> + Unpin> Stream for ChunkedBody<S> {
    type Item = S::Item;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let item = Pin::new(&mut self.0).poll_next(cx);
        self.1.body_wanted.set(item.is_pending());
        if item.is_pending() {
            self.1.wake();
        }
        item
    }
}

struct Leave(Rc<ConnState>);
impl Drop for Leave {
    fn drop(&mut self) {
        self.0.busy.set(false);
        self.0.body_wanted.set(false);
        self.0.wake();
    }
}

pub struct GuardedStream {
    io: TcpStream,
    conn: Rc<ConnState>,
    read_chunk: usize,
    filled: bool,        // last read filled its limit: more may be waiting in the socket
    write_blocked: bool, // last `poll_write` returned `Pending`
    tick_every: Duration,
    tick: Option<Pin<Box<Sleep>>>, // runs while write-blocked; dropped on write progress
    ticks: u32,                    // ticks without write progress
    stall_ticks: Option<u32>,
    trickle: bool, // a tick fired: one 1-byte read allowed
}

impl GuardedStream {
    /// Ticks while writes are blocked. Each tick allows one 1-byte read: if the pipeline is empty
    /// the dispatcher arms its keep-alive timer even though responses are still unflushed, and
    /// only a read clears it; without this a slow reader with requests still unread in the
    /// kernel would be closed (RST) after keep-alive. After `stall_ticks` ticks without write
    /// progress: `Err(TimedOut)`, and the dispatcher drops the connection (it has no write timeout).
    fn poll_tick(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let every = self.tick_every;
        let tick = self.tick.get_or_insert_with(|| Box::pin(sleep(every)));
        while tick.as_mut().poll(cx).is_ready() {
            self.ticks += 1;
            self.trickle = true;
            if self.stall_ticks.is_some_and(|max| self.ticks >= max) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client stopped reading responses",
                ));
            }
            let next = tokio::time::Instant::now() + every;
            tick.as_mut().reset(next);
        }
        Ok(())
    }
}

impl GuardedStream {
    fn counted(self) -> Self {
        let open = OPEN.fetch_add(1, Ordering::Relaxed) + 1;
        HIGH.fetch_max(open, Ordering::Relaxed);
        self
    }
}

impl Drop for GuardedStream {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::Relaxed);
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let busy = this.conn.busy.get();
        let limit = if this.write_blocked {
            this.poll_tick(cx)?;
            if std::mem::take(&mut this.trickle) {
                1
            } else {
                // Wake when the client reads again; the dispatcher then retries its write, whose
                // success wakes us once more (see `poll_write`). If already writable, poll again.
                if this.io.poll_write_ready(cx)?.is_ready() {
                    cx.waker().wake_by_ref();
                }
                return Poll::Pending;
            }
        } else if busy {
            if this.conn.body_wanted.get() {
                this.read_chunk
            } else {
                match this.conn.allowance.get() {
                    0 => {
                        this.conn.waker.set(Some(cx.waker().clone()));
                        return Poll::Pending;
                    }
                    n => usize::try_from(n).unwrap_or(usize::MAX),
                }
            }
        } else if std::mem::take(&mut this.filled) {
            // Let the dispatcher decode what it got; it cannot leave a backlog while idle.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        } else {
            this.read_chunk
        };
        let mut limited = buf.take(limit);
        let ptr = limited.filled().as_ptr();
        std::task::ready!(Pin::new(&mut this.io).poll_read(cx, &mut limited))?;
        debug_assert_eq!(ptr, limited.filled().as_ptr());
        let n = limited.filled().len();
        // SAFETY: the inner read initialised and filled these `n` bytes of `buf` (tokio's `Take`).
        unsafe { buf.assume_init(n) };
        buf.advance(n);
        if busy {
            this.conn
                .allowance
                .set(this.conn.allowance.get().saturating_sub(n as u64));
        }
        this.filled = n == limit && !this.write_blocked;
        if busy && this.filled {
            this.conn.body_wanted.set(false); // one chunk per wait; a short read drained the socket
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, data) {
            Poll::Pending => {
                this.write_blocked = true;
                this.poll_tick(cx)?;
                Poll::Pending
            }
            Poll::Ready(Ok(n)) if n > 0 => {
                if this.write_blocked {
                    cx.waker().wake_by_ref(); // resume the reads refused while blocked
                }
                (this.write_blocked, this.tick, this.ticks, this.trickle) = (false, None, 0, false);
                Poll::Ready(Ok(n))
            }
            other => other,
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// What `actix_web::HttpServer` passes to `HttpService::build()` (defaults = its defaults; add
/// `tcp_nodelay`/`h1_allow_half_closed` if you set them), plus the guard's limits. Workers,
/// backlog, max connections, shutdown timeout, signals: set on `actix_server::Server::build()`.
#[derive(Clone, Debug)]
pub struct H1Settings {
    pub keep_alive: KeepAlive,
    pub client_request_timeout: Duration,
    /// `HttpServer` uses 1 s; `HttpService::build()` alone would use 0 (no linger).
    pub client_disconnect_timeout: Duration,
    /// Bytes read per dispatcher poll while no request is in the service, and the slack beyond a
    /// request's `Content-Length`. Bounds the pipelined requests decoded at once.
    pub read_chunk: usize,
    /// Close a connection whose responses made no write progress for this long.
    pub write_stall_timeout: Option<Duration>,
}

impl Default for H1Settings {
    fn default() -> Self {
        Self {
            keep_alive: KeepAlive::Timeout(Duration::from_secs(5)),
            client_request_timeout: Duration::from_secs(5),
            client_disconnect_timeout: Duration::from_secs(1),
            read_chunk: 4096,
            write_stall_timeout: Some(Duration::from_secs(30)),
        }
    }
}

/// `HttpServer::listen` for plain-TCP HTTP/1 (actix-web 4.18.1 src/server.rs), with every
/// connection wrapped in [`GuardedStream`] and the app wrapped to tell it when it is busy.
pub fn listen<F, I, S, B>(
    builder: ServerBuilder,
    lst: net::TcpListener,
    settings: H1Settings,
    factory: F,
) -> io::Result<ServerBuilder>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    B: MessageBody + 'static,
{
    let addr = lst.local_addr()?;
    // Lets dispatchers stop keep-alive on `ServerHandle::stop(true)` / SIGTERM, as HttpServer does.
    let shutdown = builder.graceful_shutdown_signal();
    builder.listen(format!("actix-web-service-{addr}"), lst, move || {
        let s = settings.clone();
        let (host, shutdown) = (
            addr.to_string(), // what `HttpServer` reports without `server_hostname`
            shutdown.clone(),
        );
        // `AppConfig::new` is pub(crate); `__priv_test_new` is its doc(hidden) public twin (used by
        // actix-test). `AppConfig::default()` would claim host localhost:8080 / addr 127.0.0.1:8080.
        let config = move |_| AppConfig::__priv_test_new(false, host.clone(), addr);
        let app =
            map_config(factory().into_factory(), config).map_err(|err| err.into().error_response());
        let chunk = s.read_chunk as u64;
        let app = apply_fn_factory(app, move |mut req: Request, srv: &_| {
            let length = req
                .head()
                .headers
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            let has_body = !matches!(req.payload(), Payload::None);
            let leave = req.conn_data::<Rc<ConnState>>().cloned().map(|conn| {
                conn.allowance.set(match length {
                    Some(len) if has_body => len.saturating_add(chunk),
                    _ => 0,
                });
                if has_body && length.is_none() {
                    let body = ChunkedBody(req.take_payload(), conn.clone());
                    *req.payload() = Payload::Stream {
                        payload: Box::pin(body),
                    };
                }
                conn.busy.set(true);
                Leave(conn)
            });
            let fut = Service::call(srv, req);
            async move {
                let res = fut.await;
                drop(leave);
                res
            }
        });
        let http = HttpService::<GuardedStream, _, _>::build()
            .graceful_shutdown_signal(move || {
                let s = shutdown.clone();
                async move { s.notified().await }
            })
            .keep_alive(s.keep_alive)
            .client_request_timeout(s.client_request_timeout)
            .client_disconnect_timeout(s.client_disconnect_timeout)
            .local_addr(addr)
            .on_connect_ext(|io: &GuardedStream, ext: &mut Extensions| {
                ext.insert(io.conn.clone());
            })
            .finish(app);
        let read_chunk = s.read_chunk;
        // Tick well inside the keep-alive period (see `poll_tick`).
        let tick_every = match s.keep_alive {
            KeepAlive::Timeout(ka) => {
                (ka / 3).clamp(Duration::from_millis(50), Duration::from_secs(1))
            }
            _ => Duration::from_secs(1),
        };
        let stall_ticks = s
            .write_stall_timeout
            .map(|t| (t.as_millis() / tick_every.as_millis()).max(1) as u32);
        fn_service(move |io: TcpStream| async move {
            let peer = io.peer_addr().ok();
            let io = GuardedStream {
                io,
                conn: Rc::default(),
                read_chunk,
                filled: false,
                write_blocked: false,
                tick_every,
                tick: None,
                ticks: 0,
                stall_ticks,
                trickle: false,
            }
            .counted();
            Ok((io, Protocol::Http1, peer))
        })
        .and_then(http)
    })
}
