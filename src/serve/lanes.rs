//! The data plane's gRPC connections (ext_proc, ext_authz, the access log, gRPC health),
//! each served from accept to close by one thread: a lane, with a runtime of its own.
//!
//! Why: an Envoy worker sends all its requests over one HTTP/2 connection. On a
//! work-stealing runtime each stream's task is woken on whichever thread is idle, and
//! those hand-offs (futex wakes, context switches) cost more CPU than the decision: with
//! lanes, latchkey's CPU per request through the shipped config fell from 81 to 53 µs
//! under load (docs/benchmarks.md). In a lane a connection, its streams and their tasks
//! stay on one thread, as they do in Envoy. There is a lane per core; each connection
//! goes to the lane with the fewest open, so busy connections spread over the cores
//! however Envoy's connections come and go.
//!
//! A lane's runtime runs until [`Lanes`] is dropped, after its server has stopped:
//! whatever a request made on it (a pooled database connection a mint opened, an OAuth2
//! client's connection) keeps working until `serve` has flushed the audit.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::{Connected, Router};

use super::stopped;

/// A listener whose connections can be moved to another runtime.
pub trait Listener: Send + 'static {
    type Stream: Accepted;
    fn accept(&self) -> impl Future<Output = io::Result<Self::Stream>> + Send;
}

/// A connection taken off its listener's runtime, to be registered with a lane's.
pub trait Accepted: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static;
    /// Registers the connection with the runtime this is called on.
    fn register(self) -> io::Result<Self::Io>;
}

impl Listener for TcpListener {
    type Stream = std::net::TcpStream;
    async fn accept(&self) -> io::Result<std::net::TcpStream> {
        let (stream, _) = TcpListener::accept(self).await?;
        // One small gRPC message per phase: none may wait for more.
        stream.set_nodelay(true)?;
        stream.into_std()
    }
}

impl Accepted for std::net::TcpStream {
    type Io = tokio::net::TcpStream;
    fn register(self) -> io::Result<Self::Io> {
        tokio::net::TcpStream::from_std(self)
    }
}

impl Listener for UnixListener {
    type Stream = std::os::unix::net::UnixStream;
    async fn accept(&self) -> io::Result<std::os::unix::net::UnixStream> {
        let (stream, _) = UnixListener::accept(self).await?;
        stream.into_std()
    }
}

impl Accepted for std::os::unix::net::UnixStream {
    type Io = tokio::net::UnixStream;
    fn register(self) -> io::Result<Self::Io> {
        tokio::net::UnixStream::from_std(self)
    }
}

/// The lanes' threads; dropping this stops their runtimes and waits for them.
pub struct Lanes {
    release: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    /// Each lane's open connections.
    open: Vec<Arc<AtomicUsize>>,
}

impl Lanes {
    /// Each lane's open connections.
    fn open(&self) -> Vec<usize> {
        self.open
            .iter()
            .map(|n| n.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        let open: usize = self.open().iter().sum();
        if open > 0 {
            tracing::warn!(open, "closing data-plane connections still open at exit");
        }
        let _ = self.release.send(true);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Starts `count` lanes, each serving what `router` builds, and the future that deals
/// `listener`'s connections to them until `stopping`. The future ends once every lane's
/// server has stopped.
pub fn start<L: Listener>(
    listener: L,
    count: usize,
    router: impl Fn() -> Result<Router, tonic::transport::Error>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<(Lanes, impl Future<Output = anyhow::Result<()>> + Send)> {
    let (release, released) = watch::channel(false);
    let mut lanes = Lanes {
        release,
        threads: Vec::with_capacity(count),
        open: Vec::with_capacity(count),
    };
    let mut dealt = Vec::with_capacity(count);
    let mut served = Vec::with_capacity(count);
    for i in 0..count.max(1) {
        let (deal, incoming) = mpsc::unbounded_channel::<L::Stream>();
        let (done, finished) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("a data-plane runtime")?;
        // Built here, so that a bad TLS config fails `serve` before it says it is serving.
        let router = router().context("the data plane's gRPC server")?;
        let (stopping, released) = (stopping.clone(), released.clone());
        let open = Arc::new(AtomicUsize::new(0));
        lanes.open.push(open.clone());
        let thread = std::thread::Builder::new()
            .name(format!("latchkey-lane-{i}"))
            .spawn(move || {
                runtime.block_on(async move {
                    let serving = async move {
                        let incoming = UnboundedReceiverStream::new(incoming).map(move |s| {
                            let open = open.clone();
                            match s.register() {
                                Ok(io) => Ok(Counted { io, open }),
                                Err(e) => {
                                    open.fetch_sub(1, Ordering::Relaxed);
                                    Err(e)
                                }
                            }
                        });
                        let served = router
                            .serve_with_incoming_shutdown(incoming, stopped(stopping))
                            .await;
                        let _ = done.send(served);
                        std::future::pending::<()>().await;
                    };
                    tokio::select! {
                        () = serving => {}
                        () = stopped(released) => {}
                    }
                });
            })
            .context("a data-plane thread")?;
        lanes.threads.push(thread);
        dealt.push(deal);
        served.push(finished);
    }
    let open = lanes.open.clone();
    let dealing = async move {
        let mut next = 0usize;
        let stop = stopped(stopping);
        tokio::pin!(stop);
        loop {
            tokio::select! {
                biased;
                () = &mut stop => break,
                accepted = listener.accept() => match accepted {
                    Ok(stream) => {
                        // The fewest open; among equals, each in turn.
                        let lanes = dealt.len();
                        let lane = (0..lanes)
                            .map(|k| (next + k) % lanes)
                            .min_by_key(|&i| open[i].load(Ordering::Relaxed))
                            .unwrap_or(0);
                        next = (next + 1) % lanes;
                        open[lane].fetch_add(1, Ordering::Relaxed);
                        if dealt[lane].send(stream).is_err() {
                            open[lane].fetch_sub(1, Ordering::Relaxed);
                        }
                    }
                    Err(e) => {
                        // Out of descriptors, or a peer gone before it was accepted.
                        tracing::warn!(error = %e, "could not accept a data-plane connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
            }
        }
        drop(dealt);
        for finished in served {
            finished
                .await
                .context("a data-plane lane ended without its server")?
                .context("a data-plane lane")?;
        }
        Ok(())
    };
    Ok((lanes, dealing))
}

/// A lane's connection, counted open until it is dropped.
struct Counted<Io> {
    io: Io,
    open: Arc<AtomicUsize>,
}

impl<Io> Drop for Counted<Io> {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<Io: AsyncRead + Unpin> AsyncRead for Counted<Io> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

// Every method passed on, the vectored ones included: HTTP/2 writes its frames vectored.
impl<Io: AsyncWrite + Unpin> AsyncWrite for Counted<Io> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<Io: Connected> Connected for Counted<Io> {
    type ConnectInfo = Io::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::Channel;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    /// A new connection, asked once whether it is served.
    async fn connect_and_check(addr: std::net::SocketAddr) -> HealthClient<Channel> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = HealthClient::new(channel);
        let answer = client.check(HealthCheckRequest::default()).await.unwrap();
        assert_eq!(answer.into_inner().status, 1, "SERVING");
        client
    }

    async fn wait_for(done: impl Fn() -> bool) {
        for _ in 0..500 {
            if done() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 5 s");
    }

    /// Connections go to the lane with the fewest open (in turn among equals) and are
    /// answered on their lane's thread; a stop ends the dealing once every lane's server
    /// has stopped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn connections_are_dealt_to_lanes_and_served_there() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopping) = watch::channel(false);
        // The thread each request was answered on.
        let threads = Arc::new(Mutex::new(Vec::new()));
        let seen = threads.clone();
        let router = move || {
            let seen = seen.clone();
            let (_, health) = tonic_health::server::health_reporter();
            let health = InterceptedService::new(health, move |request| {
                let name = std::thread::current().name().map(str::to_owned);
                seen.lock().unwrap().push(name.unwrap_or_default());
                Ok(request)
            });
            Ok(tonic::transport::Server::builder().add_service(health))
        };
        let (lanes, dealing) = start(listener, 2, router, stopping).unwrap();
        let dealing = tokio::spawn(dealing);
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(connect_and_check(addr).await);
        }
        // Dealt in turn while the counts are equal.
        assert_eq!(
            *threads.lock().unwrap(),
            ["latchkey-lane-0", "latchkey-lane-1", "latchkey-lane-0"]
        );
        assert_eq!(lanes.open(), [2, 1]);
        // Closed connections are counted closed; then the fewest open wins over the
        // turn (which is lane 1's for the third below).
        drop(held);
        wait_for(|| lanes.open() == [0, 0]).await;
        let first = connect_and_check(addr).await;
        let second = connect_and_check(addr).await;
        drop(second);
        wait_for(|| lanes.open() == [0, 1]).await;
        let third = connect_and_check(addr).await;
        assert_eq!(lanes.open(), [1, 1]);
        assert_eq!(
            threads.lock().unwrap()[3..],
            ["latchkey-lane-1", "latchkey-lane-0", "latchkey-lane-0"]
        );
        drop((first, third));
        stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), dealing)
            .await
            .expect("the lanes stopped")
            .unwrap()
            .unwrap();
        drop(lanes);
    }
}
