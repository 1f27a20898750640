//! Redis, for the cluster mode: a self-healing connection and the fenced lease scripts.
//!
//! Every lease operation is one Lua script, so one round trip and atomic on the server:
//! acquire takes the lease *and* the next fencing token together (`SET NX PX` + `INCR`), release
//! is compare-and-delete, and re-acquiring one's own lease renews it. Keys of one event share a
//! hash tag (`{id}`), so the scripts also work on a Redis Cluster.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Script;

use super::lease::{LeaseError, Token};

/// How long one Redis command may take before the caller answers 503 instead of waiting.
const RESPONSE_TIMEOUT: Duration = Duration::from_millis(1000);
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// Takes the lease for ARGV[1] (owner) for ARGV[2] ms, with a token above ARGV[3] (the highest
/// token the database has seen: after a Redis restart without persistence the counter starts
/// over, and the floor puts it back above every token ever written).
///
/// Fairness: the replicas refused the lease queue for it in `want` (a sorted set in the order
/// they first asked; each entry alive while its `want:<replica>` marker, refreshed on every ask,
/// lives — a replica that stopped asking drops out after one TTL). The holder, when it comes back
/// for its next batch while anyone queues, yields instead of renewing and queues at the back; a
/// free lease goes only to the head of the queue. So replicas take turns in order. (One `want`
/// slot, before: with three replicas the two that had just held the lease kept taking the slot
/// back, and the third waited up to the lease's TTL: a 1.8 s p99 through nginx on PostgreSQL.)
///
/// Yielding publishes the event id on `LEASE_FREE` (ARGV[4], ARGV[5]), so the waiting replica
/// takes the lease at once instead of at its next poll.
///
/// Returns the token, -1 (held by someone else, or queued behind another) or -2 (yielded to a
/// waiting replica).
const ACQUIRE: &str = r#"
local me = ARGV[1]
local function live(who) return redis.call('EXISTS', KEYS[3] .. ':' .. who) == 1 end
local function head()
  while true do
    local first = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
    if not first or live(first) then return first end
    redis.call('ZREM', KEYS[3], first)
  end
end
local function queue()
  redis.call('SET', KEYS[3] .. ':' .. me, 1, 'PX', ARGV[2])
  if not redis.call('ZSCORE', KEYS[3], me) then
    redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[3] .. ':seq'), me)
  end
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
  redis.call('PEXPIRE', KEYS[3] .. ':seq', ARGV[2])
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= me then
  queue()
  return -1
end
local first = head()
if first and first ~= me then
  queue()
  if holder then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[4], ARGV[5])
    return -2
  end
  return -1
end
if first then
  redis.call('ZREM', KEYS[3], me)
  redis.call('DEL', KEYS[3] .. ':' .. me)
end
local token = redis.call('INCR', KEYS[2])
local floor = tonumber(ARGV[3])
if token <= floor then
  token = floor + 1
  redis.call('SET', KEYS[2], token)
end
redis.call('SET', KEYS[1], me, 'PX', ARGV[2])
return token
"#;

/// Deletes the lease only if ARGV[1] still holds it; tells the waiting replicas (KEYS[2], the
/// `want` queue) on `LEASE_FREE`.
const RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if redis.call('ZCARD', KEYS[2]) > 0 then redis.call('PUBLISH', ARGV[2], ARGV[3]) end
  return 1
end
return 0
"#;

/// Channel on which a lease that someone wants is announced free (payload: the event id).
/// A hint only: a lost message costs the waiter one poll interval, never correctness.
pub const LEASE_FREE: &str = "ticketd:lease-free";

/// Channel on which a replica announces that a cancellation gave seats of an event back
/// (payload: the event id): the others clear their sold-out flag for it.
pub const SEATS_RETURNED: &str = "ticketd:seats-returned";

/// Listens on `LEASE_FREE` and `SEATS_RETURNED` for as long as the process runs, reconnecting
/// when Redis goes away, and calls `on_free` or `on_returned` with each event id. Measured without it: a hot event shared by three
/// replicas changed hands about 340 times a second and each hand-over waited ~2 ms for the
/// waiter's next poll (the timer's 1 ms granularity included), more than the batch itself took.
/// A quiet subscription is pinged now and then: a half-open connection would otherwise go
/// silent for good (only latency would suffer: the poll stays as the fallback).
pub async fn watch_notifications(
    client: redis::Client,
    on_free: impl Fn(i64),
    on_returned: impl Fn(i64),
) {
    use futures_util::StreamExt;
    const KEEPALIVE: Duration = Duration::from_secs(5);
    loop {
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&[LEASE_FREE, SEATS_RETURNED]).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match connected {
            Ok(Ok(pubsub)) => {
                let (mut sink, mut messages) = pubsub.split();
                loop {
                    tokio::select! {
                        msg = messages.next() => match msg {
                            Some(msg) => {
                                if let Ok(event) = msg.get_payload::<i64>() {
                                    if msg.get_channel_name() == SEATS_RETURNED {
                                        on_returned(event);
                                    } else {
                                        on_free(event);
                                    }
                                }
                            }
                            None => break,
                        },
                        () = tokio::time::sleep(KEEPALIVE) => {
                            let pong = tokio::time::timeout(RESPONSE_TIMEOUT, sink.ping::<redis::Value>());
                            if !matches!(pong.await, Ok(Ok(_))) {
                                break;
                            }
                        }
                    }
                }
                tracing::debug!("lease notifications: connection lost; reconnecting");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "lease notifications: cannot subscribe"),
            Err(_) => tracing::debug!("lease notifications: connect timed out"),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A Redis connection that connects lazily and reconnects by itself: the service starts and
/// serves reads while Redis is down, and bookings resume when it is back, without a restart.
#[derive(Clone)]
pub struct RedisLink {
    client: redis::Client,
    conn: ConnectionManager,
}

impl RedisLink {
    /// Must be called inside a tokio runtime (the connection's driver task lives there).
    pub fn new(url: &str) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(RESPONSE_TIMEOUT))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)
            .map_err(|e| e.to_string())?;
        Ok(RedisLink { client, conn })
    }

    /// The client, for a dedicated connection (blocking reads).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// A handle for one command (cheap: the connection is multiplexed).
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    pub async fn ping(&self) -> Result<(), LeaseError> {
        let mut c = self.conn();
        redis::cmd("PING")
            .query_async::<String>(&mut c)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }
}

pub(crate) fn unavailable(e: redis::RedisError) -> LeaseError {
    LeaseError::Unavailable(format!("redis: {e}"))
}

/// The fenced lease on Redis.
#[derive(Clone)]
pub struct RedisLease {
    link: RedisLink,
    acquire: Script,
    release: Script,
    ttl_ms: u64,
}

fn keys(event: i64) -> (String, String, String) {
    (
        format!("ticketd:lease:{{{event}}}"),
        format!("ticketd:fence:{{{event}}}"),
        // A sorted set (the queue); the single-slot string of before had another name.
        format!("ticketd:wanted:{{{event}}}"),
    )
}

impl RedisLease {
    pub fn new(link: RedisLink, ttl: Duration) -> Self {
        RedisLease {
            link,
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            ttl_ms: ttl.as_millis().max(1) as u64,
        }
    }

    /// Takes or renews the lease. A command lost to a dropped connection (Redis restarted) is
    /// sent once more on the fresh connection: a second acquire by the same owner only renews,
    /// so the retry is safe, and it spares the clients a 503 for a reconnect.
    pub async fn acquire(
        &self,
        event: i64,
        owner: &str,
        floor: Token,
    ) -> Result<Option<Token>, LeaseError> {
        let (lease, fence, want) = keys(event);
        let mut attempt = 0;
        loop {
            let mut c = self.link.conn();
            let res: redis::RedisResult<i64> = self
                .acquire
                .key(&lease)
                .key(&fence)
                .key(&want)
                .arg(owner)
                .arg(self.ttl_ms)
                .arg(floor)
                .arg(LEASE_FREE)
                .arg(event)
                .invoke_async(&mut c)
                .await;
            match res {
                Ok(token) => return Ok((token > 0).then_some(token)),
                Err(e) if attempt == 0 && reconnectable(&e) => attempt += 1,
                Err(e) => return Err(unavailable(e)),
            }
        }
    }

    /// Publishes on `SEATS_RETURNED`.
    pub async fn announce_seats_returned(&self, event: i64) -> Result<(), LeaseError> {
        let mut c = self.link.conn();
        redis::cmd("PUBLISH")
            .arg(SEATS_RETURNED)
            .arg(event)
            .query_async::<i64>(&mut c)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Compare-and-delete; idempotent, so retried like `acquire`.
    pub async fn release(&self, event: i64, owner: &str) -> Result<(), LeaseError> {
        let (lease, _, want) = keys(event);
        let mut attempt = 0;
        loop {
            let mut c = self.link.conn();
            let res: redis::RedisResult<i64> = self
                .release
                .key(&lease)
                .key(&want)
                .arg(owner)
                .arg(LEASE_FREE)
                .arg(event)
                .invoke_async(&mut c)
                .await;
            match res {
                Ok(_) => return Ok(()),
                Err(e) if attempt == 0 && reconnectable(&e) => attempt += 1,
                Err(e) => return Err(unavailable(e)),
            }
        }
    }
}

/// The connection broke under the command (it was not executed, or executing it twice is
/// harmless for our scripts): worth one more try on the reconnected link.
fn reconnectable(e: &redis::RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal()
}
