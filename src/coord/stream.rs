//! The finalization queue of the cluster mode: a Redis Stream read through a consumer group.
//!
//! `ticketd:finalize` holds one entry per booking to issue (`booking=<id>`, and from the writer
//! also `event`, `user`, `qty`: what the ticket vouches for, so no read is needed). Every finalizer
//! actor of every replica is a consumer of the group `finalizers`: XREADGROUP hands each entry to
//! one consumer, XACK (plus XDEL, to keep the stream short) retires it once the booking is
//! FINALIZED. An entry its consumer never acknowledged (the replica died, the issuance failed)
//! stays pending; once idle past the visibility timeout a live consumer takes it over with
//! XAUTOCLAIM. An entry delivered more than `max_deliveries` times is parked in the dead-letter
//! stream `ticketd:finalize:dead` (its booking id also in the set `ticketd:finalize:dead-ids`, so
//! the sweeper does not resurrect it) until an operator replays it.
//!
//! The stream is not the source of truth: the bookings table is (PENDING until FINALIZED). The
//! sweeper pushes PENDING bookings again whose entry was never written (a crash between commit
//! and push) or was lost (Redis restarted without persistence). Duplicates are harmless: issuing
//! is idempotent.

use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamPendingCountReply, StreamReadReply};
use redis::AsyncConnectionConfig;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::queue::Owed;
use super::redis::RedisLink;
use crate::ticket::TicketFacts;

pub const STREAM: &str = "ticketd:finalize";
pub const DEAD: &str = "ticketd:finalize:dead";
pub const DEAD_IDS: &str = "ticketd:finalize:dead-ids";
pub const GROUP: &str = "finalizers";

/// Most ids written by one pipelined XADD round trip.
const PUSH_BATCH: usize = 512;

/// An entry handed to a consumer: the stream id and the booking it names (None: unreadable,
/// a poison entry), with the ticket's facts when the entry carries them.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: String,
    pub booking: Option<Owed>,
}

impl Entry {
    fn from_stream(s: &StreamId) -> Self {
        let field = |name: &str| s.get::<String>(name).and_then(|v| v.parse::<i64>().ok());
        let booking = field("booking").filter(|n| *n >= 1).map(|booking_id| {
            let facts = match (field("event"), field("user"), field("qty")) {
                (Some(event_id), Some(user_id), Some(quantity)) => Some(TicketFacts {
                    booking_id,
                    event_id,
                    user_id,
                    quantity,
                }),
                _ => None,
            };
            Owed { booking_id, facts }
        });
        Entry {
            id: s.id.clone(),
            booking,
        }
    }
}

/// The producer side: a channel to a pusher task that pipelines XADDs, so the writer thread
/// never waits on Redis. A full channel drops the booking: the sweeper pushes it again later.
#[derive(Clone)]
pub struct StreamPusher {
    tx: mpsc::Sender<Owed>,
}

impl StreamPusher {
    /// Starts the pusher task on the current runtime.
    pub fn start(link: RedisLink, capacity: usize) -> Self {
        let (tx, mut rx) = mpsc::channel::<Owed>(capacity.max(1));
        actix::spawn(async move {
            let mut batch = Vec::with_capacity(PUSH_BATCH);
            while let Some(first) = rx.recv().await {
                batch.clear();
                batch.push(first);
                while batch.len() < PUSH_BATCH {
                    match rx.try_recv() {
                        Ok(id) => batch.push(id),
                        Err(_) => break,
                    }
                }
                if let Err(e) = push_now(&link.conn(), &batch).await {
                    warn!(error = %e, n = batch.len(), "could not push to the finalize stream; the sweeper will");
                }
            }
        });
        StreamPusher { tx }
    }

    /// Never blocks (callable from the writer thread); what does not fit is dropped (and swept).
    pub fn push(&self, committed: Vec<TicketFacts>) {
        for facts in committed {
            if self.tx.try_send(facts.into()).is_err() {
                break;
            }
        }
    }
}

/// XADDs `owed` in one pipelined round trip.
pub async fn push_now(conn: &ConnectionManager, owed: &[Owed]) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    for o in owed {
        let cmd = pipe
            .cmd("XADD")
            .arg(STREAM)
            .arg("*")
            .arg("booking")
            .arg(o.booking_id);
        if let Some(f) = &o.facts {
            cmd.arg("event")
                .arg(f.event_id)
                .arg("user")
                .arg(f.user_id)
                .arg("qty")
                .arg(f.quantity);
        }
        cmd.ignore();
    }
    let mut c = conn.clone();
    pipe.query_async::<()>(&mut c).await
}

/// Creates the group (and the stream) if missing. Reading from `0`, a group created after a
/// Redis restart still sees every entry pushed since.
pub async fn ensure_group(conn: &ConnectionManager) -> redis::RedisResult<()> {
    let mut c = conn.clone();
    let r: redis::RedisResult<()> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(STREAM)
        .arg(GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut c)
        .await;
    match r {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// One consumer of the group, with its own connection (XREADGROUP BLOCK would hold up every
/// other command on a shared, multiplexed connection).
pub struct Consumer {
    pub name: String,
    link: RedisLink,
    block: Duration,
    own: Option<MultiplexedConnection>,
}

impl Consumer {
    pub fn new(link: RedisLink, name: String, block: Duration) -> Self {
        Consumer {
            name,
            link,
            block,
            own: None,
        }
    }

    async fn own_conn(&mut self) -> redis::RedisResult<MultiplexedConnection> {
        if let Some(c) = &self.own {
            return Ok(c.clone());
        }
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(self.block + Duration::from_secs(2)));
        let c = self
            .link
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        self.own = Some(c.clone());
        Ok(c)
    }

    pub fn link(&self) -> &RedisLink {
        &self.link
    }

    /// Entries for this consumer: with `pending_after`, those delivered to it before (after
    /// that id) and never acknowledged, which a restarted consumer drains first; else new ones,
    /// waiting up to the block time. A missing group (Redis restarted) is created again.
    pub async fn read(
        &mut self,
        pending_after: Option<&str>,
        count: usize,
    ) -> redis::RedisResult<Vec<Entry>> {
        let mut c = self.own_conn().await?;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count);
        if pending_after.is_none() {
            cmd.arg("BLOCK").arg(self.block.as_millis() as u64);
        }
        cmd.arg("STREAMS")
            .arg(STREAM)
            .arg(pending_after.unwrap_or(">"));
        let res: redis::RedisResult<Option<StreamReadReply>> = cmd.query_async(&mut c).await;
        match res {
            Ok(reply) => Ok(reply
                .map(|r| {
                    r.keys
                        .iter()
                        .flat_map(|k| k.ids.iter().map(Entry::from_stream))
                        .collect()
                })
                .unwrap_or_default()),
            Err(e) => {
                if e.code() == Some("NOGROUP") {
                    ensure_group(&self.link.conn()).await?;
                } else if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() {
                    self.own = None; // reconnect next time
                }
                Err(e)
            }
        }
    }
}

/// Acknowledges and deletes finished entries, all in one round trip.
pub async fn ack(conn: &ConnectionManager, entry_ids: &[String]) -> redis::RedisResult<()> {
    if entry_ids.is_empty() {
        return Ok(());
    }
    let mut c = conn.clone();
    redis::pipe()
        .cmd("XACK")
        .arg(STREAM)
        .arg(GROUP)
        .arg(entry_ids)
        .ignore()
        .cmd("XDEL")
        .arg(STREAM)
        .arg(entry_ids)
        .ignore()
        .query_async::<()>(&mut c)
        .await
}

/// Takes over entries idle longer than `min_idle` for `consumer`. Entries delivered more than
/// `max_deliveries` times are parked in the dead-letter stream instead; returns the rest.
pub async fn reclaim(
    conn: &ConnectionManager,
    consumer: &str,
    min_idle: Duration,
    max_deliveries: usize,
    count: usize,
) -> redis::RedisResult<Vec<Entry>> {
    let mut c = conn.clone();
    let idle = min_idle.as_millis() as u64;
    let claimed: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
        .arg(STREAM)
        .arg(GROUP)
        .arg(consumer)
        .arg(idle)
        .arg("0-0")
        .arg("COUNT")
        .arg(count)
        .query_async(&mut c)
        .await?;
    let mut live = Vec::new();
    for s in &claimed.claimed {
        let entry = Entry::from_stream(s);
        // XAUTOCLAIM counted this delivery; how many were there in all?
        let pending: StreamPendingCountReply = redis::cmd("XPENDING")
            .arg(STREAM)
            .arg(GROUP)
            .arg(&entry.id)
            .arg(&entry.id)
            .arg(1)
            .query_async(&mut c)
            .await?;
        let deliveries = pending.ids.first().map(|p| p.times_delivered).unwrap_or(0);
        if deliveries > max_deliveries {
            park(conn, &entry, deliveries).await?;
        } else {
            debug!(entry = %entry.id, deliveries, "reclaimed a stalled entry");
            live.push(entry);
        }
    }
    Ok(live)
}

/// Moves an entry to the dead-letter stream: logged, counted (XLEN), replayable.
async fn park(
    conn: &ConnectionManager,
    entry: &Entry,
    deliveries: usize,
) -> redis::RedisResult<()> {
    warn!(entry = %entry.id, booking = ?entry.booking, deliveries, "finalize entry dead-lettered");
    let mut c = conn.clone();
    let booking = entry
        .booking
        .map(|b| b.booking_id.to_string())
        .unwrap_or_else(|| "unreadable".into());
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("XADD")
        .arg(DEAD)
        .arg("*")
        .arg("booking")
        .arg(&booking)
        .arg("entry")
        .arg(&entry.id)
        .arg("deliveries")
        .arg(deliveries)
        .ignore()
        .cmd("XACK")
        .arg(STREAM)
        .arg(GROUP)
        .arg(&entry.id)
        .ignore()
        .cmd("XDEL")
        .arg(STREAM)
        .arg(&entry.id)
        .ignore();
    if let Some(b) = entry.booking {
        pipe.cmd("SADD").arg(DEAD_IDS).arg(b.booking_id).ignore();
    }
    pipe.query_async::<()>(&mut c).await?;
    crate::metrics::handles().dead_lettered.increment(1);
    Ok(())
}

/// Entries in the stream: queued, or delivered and not yet acknowledged (acknowledged entries
/// are deleted).
pub async fn depth(conn: &ConnectionManager) -> redis::RedisResult<u64> {
    let mut c = conn.clone();
    redis::cmd("XLEN").arg(STREAM).query_async(&mut c).await
}

/// Entries in the dead-letter stream.
pub async fn dead_letters(conn: &ConnectionManager) -> redis::RedisResult<u64> {
    let mut c = conn.clone();
    redis::cmd("XLEN").arg(DEAD).query_async(&mut c).await
}

/// Booking ids that have an entry in the stream (queued, or delivered and not yet acknowledged:
/// acknowledged entries are deleted).
pub async fn queued_ids(
    conn: &ConnectionManager,
) -> redis::RedisResult<std::collections::HashSet<i64>> {
    let mut c = conn.clone();
    let mut ids = std::collections::HashSet::new();
    let mut start = "-".to_string();
    loop {
        let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(STREAM)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut c)
            .await?;
        let Some(last) = r.ids.last() else {
            return Ok(ids);
        };
        start = format!("({}", last.id);
        ids.extend(
            r.ids
                .iter()
                .filter_map(|s| Entry::from_stream(s).booking.map(|b| b.booking_id)),
        );
    }
}

/// Booking ids parked as dead letters (the sweeper leaves them alone).
pub async fn dead_ids(conn: &ConnectionManager) -> redis::RedisResult<Vec<i64>> {
    let mut c = conn.clone();
    redis::cmd("SMEMBERS")
        .arg(DEAD_IDS)
        .query_async(&mut c)
        .await
}

/// Moves every dead letter back to the main stream with a fresh delivery count.
pub async fn replay(conn: &ConnectionManager) -> redis::RedisResult<u64> {
    let mut c = conn.clone();
    let mut replayed = 0;
    loop {
        let page: Vec<StreamId> = {
            let r: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
                .arg(DEAD)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(256)
                .query_async(&mut c)
                .await?;
            r.ids
        };
        if page.is_empty() {
            return Ok(replayed);
        }
        let mut pipe = redis::pipe();
        pipe.atomic();
        for s in &page {
            let booking: String = s.get("booking").unwrap_or_default();
            pipe.cmd("XADD")
                .arg(STREAM)
                .arg("*")
                .arg("booking")
                .arg(&booking)
                .ignore();
            pipe.cmd("SREM").arg(DEAD_IDS).arg(&booking).ignore();
            pipe.cmd("XDEL").arg(DEAD).arg(&s.id).ignore();
        }
        pipe.query_async::<()>(&mut c).await?;
        replayed += page.len() as u64;
    }
}
