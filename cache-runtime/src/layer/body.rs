//! Reading a response body for storage without ever holding more of it
//! than may be stored: past the limit, what was read goes out first and
//! the rest streams through.

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

/// A body read up to a limit.
pub(super) enum Read<B> {
    /// The whole body, within the limit and without trailers.
    Complete(Bytes),
    /// Too large (or with trailers): the frames read so far, then the rest.
    Streaming(Resumed<B>),
}

/// Reads `body` while it fits in `limit` bytes.
pub(super) async fn read_within<B>(body: B, limit: usize) -> Result<Read<B>, B::Error>
where
    B: Body<Data = Bytes>,
{
    let mut body = Box::pin(body);
    let mut frames = VecDeque::new();
    let mut size = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        // Trailers end the body, but a stored response could not replay
        // them: such a body goes out as it came.
        let fits = frame.data_ref().is_some_and(|data| {
            size = size.saturating_add(data.len());
            size <= limit
        });
        frames.push_back(frame);
        if !fits {
            return Ok(Read::Streaming(Resumed { frames, rest: body }));
        }
    }
    let mut whole = BytesMut::with_capacity(size);
    for frame in frames {
        if let Ok(data) = frame.into_data() {
            whole.extend_from_slice(&data);
        }
    }
    Ok(Read::Complete(whole.freeze()))
}

/// The frames already read from a body, then the body itself.
pub(super) struct Resumed<B> {
    frames: VecDeque<Frame<Bytes>>,
    rest: Pin<Box<B>>,
}

impl<B: Body<Data = Bytes>> Body for Resumed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.frames.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        self.rest.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.frames.is_empty() && self.rest.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn chunks(n: usize) -> impl Body<Data = Bytes, Error = std::convert::Infallible> {
        let frames = (0..n).map(|i| Ok(Frame::data(Bytes::from(vec![i as u8; 10]))));
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn a_body_within_the_limit_is_read_whole() {
        let Ok(Read::Complete(whole)) = read_within(chunks(3), 30).await else { panic!("complete") };
        assert_eq!(whole.len(), 30);
        let Ok(Read::Complete(empty)) = read_within(Full::new(Bytes::new()), 0).await else { panic!("complete") };
        assert!(empty.is_empty());
    }

    #[tokio::test]
    async fn past_the_limit_the_body_streams_on_unchanged() {
        let Ok(Read::Streaming(resumed)) = read_within(chunks(100), 25).await else { panic!("streaming") };
        assert_eq!(resumed.frames.len(), 3, "read no further than the limit");
        let all = resumed.collect().await.unwrap().to_bytes();
        assert_eq!(all.len(), 1000);
        assert_eq!(all[999], 99);
    }
}
