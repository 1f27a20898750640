//! How many client connections the process can hold.
//!
//! Each connection costs a file descriptor. When the process ran out of them (20,400 stalled
//! connections against the soft limit), `accept` failed in a loop, the database could not open
//! a file and `/health` went unanswered. So at start the soft `RLIMIT_NOFILE` is raised to the
//! hard limit, and the connection cap (`MAX_CONNECTIONS`) is lowered, if need be, to leave room
//! for every descriptor that is not a client: the listener, the database (three files per
//! SQLite connection: the database, its WAL and its shared memory), Redis and the runtime.

/// Binds `addr` and listens with a backlog of `backlog` connections. (actix-web's `backlog`
/// setting applies only to sockets it binds itself; a listener bound with std's `bind` gets
/// std's 128, and past the connection cap the 129th waiting client had its handshake dropped.)
/// The kernel clamps the backlog to `net.core.somaxconn`.
pub fn listen(addr: &str, backlog: i32) -> std::io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = addr.to_socket_addrs()?.next().ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to listen on")
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Descriptors kept free of client connections besides the database's: the listener, Redis
/// connections, the runtime's event fds and pipes, stdio, and margin for what a test or an
/// operator's tooling opens.
const RESERVED: u64 = 256;

/// Raises the soft file limit to the hard one; returns the soft limit now in force (None when
/// the platform does not say).
pub fn raise_file_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit/setrlimit only read and write the struct passed by pointer.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return None;
            }
            if lim.rlim_cur < lim.rlim_max {
                let raised = libc::rlimit {
                    rlim_cur: lim.rlim_max,
                    rlim_max: lim.rlim_max,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                    lim.rlim_cur = lim.rlim_max;
                }
            }
        }
        Some(lim.rlim_cur)
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// The connection cap in force: the configured one, or less if the file limit is lower than it
/// plus what the database (`db_connections` SQLite connections) and `RESERVED` need. Never below
/// 16, so a tiny limit still serves.
pub fn connection_cap(configured: u32, file_limit: Option<u64>, db_connections: u32) -> usize {
    let configured = configured as u64;
    let cap = match file_limit {
        Some(files) => configured.min(files.saturating_sub(RESERVED + 3 * db_connections as u64)),
        None => configured,
    };
    cap.max(16) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_below_the_file_limit() {
        assert_eq!(connection_cap(10_000, Some(1_048_576), 5), 10_000);
        // 1,024 files: 256 reserved, 15 for five database connections.
        assert_eq!(connection_cap(10_000, Some(1024), 5), 1024 - 256 - 15);
        assert_eq!(connection_cap(10_000, Some(100), 5), 16);
        assert_eq!(connection_cap(500, None, 5), 500);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let Some(now) = raise_file_limit() else {
            return;
        };
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) }, 0);
        assert_eq!(lim.rlim_cur, lim.rlim_max);
        assert_eq!(now, lim.rlim_cur);
    }
}
