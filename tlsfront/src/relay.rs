//! Copying a robot's connection to its worker and back until either side closes, or until no byte has
//! moved either way for the idle timeout: a client that holds a connection open without sending (before
//! its first request, between requests, or not reading its answers) is closed instead of holding a task,
//! two descriptors and a worker's connection for good.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How a relayed connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// One side closed (or failed) and the other was told.
    Closed,
    /// Nothing moved for the idle timeout.
    Idle,
}

/// When bytes last moved on either leg, in milliseconds since the relay began.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity { start: Instant::now(), last_ms: AtomicU64::new(0) }
    }

    fn touch(&self) {
        let elapsed = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(elapsed, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// A stream that records in `activity` every read or write that moved at least one byte.
struct Touching<'a, S> {
    stream: &'a mut S,
    activity: &'a Activity,
}

impl<S: AsyncRead + Unpin> AsyncRead for Touching<'_, S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut *this.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Touching<'_, S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut *this.stream).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(written)) if written > 0) {
            this.activity.touch();
        }
        polled
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_shutdown(cx)
    }
}

/// Returns once `activity` has seen nothing for `limit`.
async fn silence(activity: &Activity, limit: Duration) {
    loop {
        let deadline = activity.last() + limit;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// Copy both ways between `client` and `worker` (half-closes passed on) until both have closed, or
/// until nothing has moved for `idle`; the streams are closed when their owner drops them.
pub async fn until_idle<A, B>(client: &mut A, worker: &mut B, idle: Duration) -> Ended
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let activity = Activity::new();
    let mut client = Touching { stream: client, activity: &activity };
    let mut worker = Touching { stream: worker, activity: &activity };
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut worker) => Ended::Closed,
        () = silence(&activity, idle) => Ended::Idle,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    }

    #[test]
    fn bytes_pass_both_ways_and_a_close_ends_the_relay() {
        runtime().block_on(async {
            let (mut robot, mut front_side) = duplex(1024);
            let (mut worker_side, mut worker) = duplex(1024);
            let relay = tokio::spawn(async move {
                until_idle(&mut front_side, &mut worker_side, Duration::from_secs(5)).await
            });
            robot.write_all(b"request").await.unwrap();
            let mut got = [0u8; 7];
            worker.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"request");
            worker.write_all(b"answer").await.unwrap();
            drop(worker);
            let mut answer = Vec::new();
            robot.read_to_end(&mut answer).await.unwrap();
            assert_eq!(answer, b"answer");
            drop(robot);
            assert_eq!(relay.await.unwrap(), Ended::Closed);
        });
    }

    #[test]
    fn silence_ends_the_relay_and_traffic_postpones_it() {
        runtime().block_on(async {
            let (mut robot, mut front_side) = duplex(1024);
            let (mut worker_side, mut worker) = duplex(1024);
            let started = Instant::now();
            let relay = tokio::spawn(async move {
                until_idle(&mut front_side, &mut worker_side, Duration::from_millis(300)).await
            });
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_millis(150)).await;
                robot.write_all(b"x").await.unwrap();
                let mut one = [0u8; 1];
                worker.read_exact(&mut one).await.unwrap();
            }
            assert_eq!(relay.await.unwrap(), Ended::Idle);
            let took = started.elapsed();
            assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(3), "{took:?}");
            let mut rest = Vec::new();
            assert_eq!(robot.read_to_end(&mut rest).await.unwrap(), 0); // the relay's ends are dropped
        });
    }
}
