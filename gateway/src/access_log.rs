//! The request log: one JSON line per request on stdout, with status, latency, subscription id
//! (never the key), backend and tokens.
//!
//! A request only moves a small record into a bounded channel; a dedicated thread formats and
//! writes. Nothing on the request path blocks on stdout or formats text, and if the writer falls
//! behind, records are dropped and counted rather than slowing requests down.
//!
//! The writer drains the channel every [`DRAIN_INTERVAL`] instead of waiting on it: a waiting
//! reader would have every request pay for waking it (a futex call and a context switch, measured
//! at a fifth of the gateway's CPU per request), and one write per interval replaces one per
//! request. On shutdown, [`RequestLog::flush`] writes what is queued before the process exits.

use std::io::Write;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::context::{ApiInfo, RequestContext};
use crate::protocol::Operation;
use crate::protocol::openai::Usage;
use crate::subscription::Subscription;
use crate::upstream::backend::Backend;

/// Records queued between two drains; at 25 ms a drain, room for 160,000 requests a second.
const CAPACITY: usize = 4_096;
const DRAIN_INTERVAL: Duration = Duration::from_millis(25);

#[derive(Clone)]
pub struct RequestLog {
    sender: Option<SyncSender<Message>>,
    dropped: Arc<AtomicU64>,
}

// Nearly every message is a record; boxing it would cost an allocation per request.
#[allow(clippy::large_enum_variant)]
enum Message {
    Record(Record),
    /// Write everything queued so far, then acknowledge.
    Flush(SyncSender<()>),
}

struct Record {
    at: SystemTime,
    request_id: String,
    method: http::Method,
    path: String,
    status: u16,
    first_byte_us: u64,
    duration_us: u64,
    client_ip: IpAddr,
    api: Arc<ApiInfo>,
    operation: Operation,
    subscription: Option<Arc<Subscription>>,
    backend: Option<Arc<Backend>>,
    model: Option<String>,
    usage: Option<Usage>,
    error: Option<&'static str>,
    client_disconnected: bool,
    stream_incomplete: bool,
    cache: Option<(&'static str, Option<&'static str>, Option<f32>)>,
    saved_tokens: Option<u64>,
}

impl RequestLog {
    /// A log that writes nothing (`server.request-log = false`).
    pub fn disabled() -> Self {
        Self { sender: None, dropped: Arc::default() }
    }

    pub fn to_stdout() -> Self {
        let (sender, receiver) = sync_channel(CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let writer_dropped = dropped.clone();
        let spawned = std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || write_records(&receiver, &writer_dropped));
        match spawned {
            Ok(_) => Self { sender: Some(sender), dropped },
            Err(e) => {
                tracing::error!(error = %e, "cannot start the request log writer; request lines are off");
                Self::disabled()
            }
        }
    }

    pub fn record(&self, ctx: &RequestContext) {
        let Some(sender) = &self.sender else { return };
        let record = Record {
            at: SystemTime::now(),
            request_id: ctx.request_id.clone(),
            method: ctx.request.method.clone(),
            path: ctx.request.path.clone(),
            status: ctx.outcome.status,
            first_byte_us: ctx.outcome.first_byte_us,
            duration_us: u64::try_from(ctx.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            client_ip: ctx.client_ip,
            api: ctx.api.clone(),
            operation: ctx.operation,
            subscription: ctx.subscription.clone(),
            backend: ctx.backend.clone(),
            model: ctx.model().map(str::to_owned),
            usage: ctx.usage,
            error: ctx.outcome.error.as_ref().map(|e| e.code()),
            client_disconnected: ctx.outcome.client_disconnected,
            stream_incomplete: ctx.outcome.stream_incomplete,
            cache: ctx.cache.as_ref().map(|c| (c.status.name(), c.reason, c.score)),
            saved_tokens: ctx.cache.as_ref().and_then(|c| c.saved).map(|u| u.total_tokens),
        };
        if let Err(TrySendError::Full(_)) = sender.try_send(Message::Record(record)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Writes every queued line; called on shutdown so the last requests are not lost.
    pub fn flush(&self) {
        let Some(sender) = &self.sender else { return };
        let (ack, acked) = sync_channel(1);
        if sender.send(Message::Flush(ack)).is_ok() {
            let _ = acked.recv_timeout(Duration::from_secs(5));
        }
    }
}

#[derive(Serialize)]
struct Line<'a> {
    timestamp: String,
    level: &'static str,
    target: &'static str,
    message: &'static str,
    request_id: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    latency_ms: f64,
    duration_ms: f64,
    client_ip: IpAddr,
    api: &'a str,
    operation: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    subscription_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    team: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    backend: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    total_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cached_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    client_disconnected: bool,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream_incomplete: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_score: Option<f32>,
    /// Backend tokens a cache hit saved (the cached answer's usage).
    #[serde(skip_serializing_if = "Option::is_none")]
    saved_tokens: Option<u64>,
}

fn write_records(receiver: &Receiver<Message>, dropped: &AtomicU64) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut reported_dropped = 0;
    loop {
        std::thread::sleep(DRAIN_INTERVAL);
        let mut acks = Vec::new();
        let disconnected = loop {
            match receiver.try_recv() {
                Ok(Message::Record(record)) => {
                    let _ = serde_json::to_writer(&mut buffer, &line(&record));
                    buffer.push(b'\n');
                }
                Ok(Message::Flush(ack)) => acks.push(ack),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        let total_dropped = dropped.load(Ordering::Relaxed);
        if total_dropped != reported_dropped {
            tracing::warn!(dropped = total_dropped - reported_dropped, "request log fell behind; lines were dropped");
            reported_dropped = total_dropped;
        }
        if !buffer.is_empty() {
            let mut stdout = std::io::stdout().lock();
            let _ = stdout.write_all(&buffer).and_then(|()| stdout.flush());
            buffer.clear();
        }
        for ack in acks {
            let _ = ack.send(());
        }
        if disconnected {
            return;
        }
    }
}

fn line(record: &Record) -> Line<'_> {
    let usage = record.usage;
    Line {
        timestamp: humantime::format_rfc3339_micros(record.at).to_string(),
        level: "INFO",
        target: "aigw::request",
        message: "request",
        request_id: &record.request_id,
        method: record.method.as_str(),
        path: &record.path,
        status: record.status,
        latency_ms: record.first_byte_us as f64 / 1000.0,
        duration_ms: record.duration_us as f64 / 1000.0,
        client_ip: record.client_ip,
        api: &record.api.id,
        operation: record.operation.id(),
        subscription_id: record.subscription.as_deref().map(|s| s.id.as_str()),
        team: record.subscription.as_deref().map(|s| s.team.as_str()),
        backend: record.backend.as_deref().map(|b| b.id.as_str()),
        model: record.model.as_deref(),
        prompt_tokens: usage.map(|u| u.prompt_tokens),
        completion_tokens: usage.map(|u| u.completion_tokens),
        total_tokens: usage.map(|u| u.total_tokens),
        cached_tokens: usage.map(|u| u.cached_tokens),
        error: record.error,
        client_disconnected: record.client_disconnected,
        stream_incomplete: record.stream_incomplete,
        cache: record.cache.map(|c| c.0),
        cache_reason: record.cache.and_then(|c| c.1),
        cache_score: record.cache.and_then(|c| c.2),
        saved_tokens: record.saved_tokens,
    }
}
