//! Reads and writes of a session's TLS stream that keep no memory while the session is idle,
//! and polling a future once.
//! Not here: what the bytes mean (`codec`, `pump`).

use std::future::Future;
use std::pin::{Pin, pin};
use std::task::Poll;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};

use crate::session::Stream;

/// Writes what `wbuf` holds and flushes. The buffer's memory is released, not kept for the
/// next write: most devices are idle most of the time, and a kept buffer was 1 KiB of each
/// idle device (heaptrack, 3,000 idle devices); an allocation per write costs nothing next
/// to the TLS record it goes into.
pub(crate) async fn write_out(stream: &mut Stream, wbuf: &mut BytesMut) -> std::io::Result<()> {
    if wbuf.is_empty() {
        return Ok(());
    }
    stream.write_all(wbuf).await?;
    *wbuf = BytesMut::new();
    stream.flush().await
}

/// Bytes read at most per call of [`read_some`].
const READ_CHUNK: usize = 4096;

/// Reads what the TLS stream has ready and appends it to `buf`, through a buffer on the stack
/// of the poll: `read_buf` needs spare room in `buf` for as long as it waits, which held 1 KiB
/// in every idle session. Like `read_buf`, 0 means end of stream.
pub(crate) async fn read_some(stream: &mut Stream, buf: &mut BytesMut) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *stream).poll_read(cx, &mut read) {
            Poll::Ready(Ok(())) => {
                buf.extend_from_slice(read.filled());
                Poll::Ready(Ok(read.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Polls `f` once: its value if ready now, else `None` (and `f` is dropped).
pub(crate) async fn ready_now<F: Future>(f: F) -> Option<F::Output> {
    let mut f = pin!(f);
    std::future::poll_fn(|cx| match f.as_mut().poll(cx) {
        Poll::Ready(v) => Poll::Ready(Some(v)),
        Poll::Pending => Poll::Ready(None),
    })
    .await
}
