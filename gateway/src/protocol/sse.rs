//! Relays a backend's server-sent events to the client while reading token usage out of them.
//!
//! Bytes go out as soon as the events they belong to are complete: only the tail of an event that
//! is still arriving is held back. The usage chunk the gateway asked for on the client's behalf is
//! removed from what the client sees; everything else passes through byte for byte.

use bytes::{Bytes, BytesMut};

use crate::cache::answer::StreamAssembler;
use crate::protocol::openai::{Usage, usage_of_chunk};

/// Longest event the relay holds while it waits for the event's blank line. OpenAI's chunks are a
/// few hundred bytes and one of the longest answers in a single event is well under 1 MiB; without
/// a bound a backend that never sends a blank line would grow the buffer until memory runs out.
pub const MAX_EVENT_BYTES: usize = 1024 * 1024;

pub struct SseRelay {
    pending: BytesMut,
    /// Drop usage-only chunks (the client did not ask for usage; the gateway did).
    strip_usage: bool,
    usage: Option<Usage>,
    saw_done: bool,
    /// Joins the chunks into the completion they amount to, when a policy wants the answer.
    assembler: Option<StreamAssembler>,
}

impl SseRelay {
    pub fn new(strip_usage: bool) -> Self {
        Self { pending: BytesMut::new(), strip_usage, usage: None, saw_done: false, assembler: None }
    }

    /// Also assemble the chunks into a chat completion (see [`SseRelay::assembled`]).
    pub fn assembling(mut self) -> Self {
        self.assembler = Some(StreamAssembler::default());
        self
    }

    /// The completion the stream amounted to, as JSON, if it was assembled and whole.
    pub fn assembled(&mut self) -> Option<Bytes> {
        let completion = self.assembler.take()?.finish()?;
        serde_json::to_vec(&completion).ok().map(Bytes::from)
    }

    /// Takes the next piece of the backend's body and returns what may go to the client now. An
    /// error says which bound the backend's stream broke (an event longer than
    /// [`MAX_EVENT_BYTES`], an index the assembler refuses): nothing more of it should be relayed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Bytes, &'static str> {
        self.pending.extend_from_slice(chunk);
        let mut out: Option<BytesMut> = None;
        let mut scanned = 0;
        // `pending` up to `kept` is forwardable; events to drop are cut out as they are found.
        while let Some((event_len, boundary_len)) = next_event(&self.pending[scanned..]) {
            let event_end = scanned + event_len + boundary_len;
            let drop_event = self.inspect(scanned, scanned + event_len)?;
            if drop_event {
                let keep = self.pending.split_to(scanned);
                out.get_or_insert_with(BytesMut::new).extend_from_slice(&keep);
                let _dropped = self.pending.split_to(event_end - scanned);
                scanned = 0;
            } else {
                scanned = event_end;
            }
        }
        if self.pending.len() - scanned > MAX_EVENT_BYTES {
            return Err("an event longer than 1 MiB");
        }
        let ready = self.pending.split_to(scanned);
        Ok(match out {
            None => ready.freeze(),
            Some(mut out) => {
                out.extend_from_slice(&ready);
                out.freeze()
            }
        })
    }

    /// Whatever is left when the backend's body ends (a final event without its blank line).
    pub fn finish(&mut self) -> Result<Bytes, &'static str> {
        if self.pending.is_empty() {
            return Ok(Bytes::new());
        }
        let len = self.pending.len();
        if self.inspect(0, len)? {
            self.pending.clear();
        }
        Ok(self.pending.split().freeze())
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// The stream ended with `data: [DONE]`, i.e. it was complete.
    pub fn saw_done(&self) -> bool {
        self.saw_done
    }

    /// Records what the event at `pending[start..end]` says; true when it must not reach the client.
    fn inspect(&mut self, start: usize, end: usize) -> Result<bool, &'static str> {
        let event = &self.pending[start..end];
        let mut drop_event = false;
        for line in event.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(data) = line.strip_prefix(b"data:") else { continue };
            let data = data.strip_prefix(b" ").unwrap_or(data);
            if data == b"[DONE]" {
                self.saw_done = true;
                continue;
            }
            // Usage first: when the chunk breaks a bound, the usage it reports is still booked.
            if let Some(chunk) = usage_of_chunk(data) {
                self.usage = Some(chunk.usage);
                drop_event |= chunk.usage_only && self.strip_usage;
            }
            if let Some(assembler) = &mut self.assembler {
                assembler.push(data)?;
            }
        }
        Ok(drop_event)
    }
}

/// Length of the first complete event in `buf` and of the blank line that ends it.
fn next_event(buf: &[u8]) -> Option<(usize, usize)> {
    let mut from = 0;
    while let Some(i) = memchr::memchr(b'\n', &buf[from..]) {
        let nl = from + i;
        match buf.get(nl + 1) {
            Some(b'\n') => return Some((nl, 2)),
            Some(b'\r') if buf.get(nl + 2) == Some(&b'\n') => return Some((nl, 3)),
            _ => from = nl + 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const STREAM: &str = concat!(
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Hello\"}}],\"usage\":null}\n\n",
        "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
        "data: [DONE]\n\n",
    );

    /// Feeds the stream in pieces of every size from 1 byte up, as TCP might deliver it.
    fn relay_in_pieces(strip_usage: bool, piece: usize) -> (String, SseRelay) {
        let mut relay = SseRelay::new(strip_usage);
        let mut out = Vec::new();
        for chunk in STREAM.as_bytes().chunks(piece) {
            out.extend_from_slice(&relay.push(chunk).expect("within bounds"));
        }
        out.extend_from_slice(&relay.finish().expect("within bounds"));
        (String::from_utf8(out).expect("utf-8"), relay)
    }

    #[test]
    fn passes_everything_when_the_client_asked_for_usage() {
        for piece in 1..=STREAM.len() {
            let (out, relay) = relay_in_pieces(false, piece);
            assert_eq!(out, STREAM, "piece size {piece}");
            assert_eq!(relay.usage().map(|u| u.total_tokens), Some(10));
            assert!(relay.saw_done());
        }
    }

    #[test]
    fn removes_only_the_usage_chunk_otherwise() {
        let expected = STREAM.replace(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":1,\"total_tokens\":10,\"prompt_tokens_details\":{\"cached_tokens\":0}}}\n\n",
            "",
        );
        for piece in 1..=STREAM.len() {
            let (out, relay) = relay_in_pieces(true, piece);
            assert_eq!(out, expected, "piece size {piece}");
            assert_eq!(relay.usage().map(|u| (u.prompt_tokens, u.completion_tokens)), Some((9, 1)));
        }
    }

    #[test]
    fn forwards_complete_events_at_once_and_holds_partial_ones() {
        let mut relay = SseRelay::new(true);
        assert_eq!(relay.push(b"data: {\"a\":1}\n\ndata: {\"b\""), Ok(Bytes::from_static(b"data: {\"a\":1}\n\n")));
        assert_eq!(relay.push(b":2}\r\n\r\n"), Ok(Bytes::from_static(b"data: {\"b\":2}\r\n\r\n")));
        assert!(!relay.saw_done());
        assert_eq!(relay.push(b"data: [DONE]"), Ok(Bytes::new()));
        assert_eq!(relay.finish(), Ok(Bytes::from_static(b"data: [DONE]")));
        assert!(relay.saw_done());
    }

    #[test]
    fn an_event_that_never_ends_is_refused_at_the_bound() {
        let mut relay = SseRelay::new(true);
        assert_eq!(relay.push(b"data: {\"a\":1}\n\ndata: \""), Ok(Bytes::from_static(b"data: {\"a\":1}\n\n")));
        let piece = vec![b'x'; 64 * 1024];
        let mut held = 7;
        while held + piece.len() <= MAX_EVENT_BYTES {
            assert_eq!(relay.push(&piece), Ok(Bytes::new()));
            held += piece.len();
        }
        assert_eq!(relay.push(&piece), Err("an event longer than 1 MiB"));
    }
}
