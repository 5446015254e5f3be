//! Noticing a client that has gone before anything was written to it.
//!
//! actix-web learns that a client left only when a write to it fails, so a
//! request waiting in the queue, or a non-streaming one, would run to its
//! end for nobody. Each connection's socket is noted when it opens
//! ([`on_connect`]), and while a generation runs, [`hung_up`] peeks at it
//! every 100 ms: end-of-file or an error means the client is gone. This is
//! the check llama-server's HTTP library makes. A client that half-closes
//! its side after sending the request reads as gone too.

use std::any::Any;
use std::time::Duration;

use actix_web::HttpRequest;
use actix_web::dev::Extensions;

const POLL: Duration = Duration::from_millis(100);

/// A connection's socket, kept in its extensions.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerSocket(#[cfg(unix)] std::os::fd::RawFd);

/// `HttpServer::on_connect` hook: remembers the connection's socket.
pub(crate) fn on_connect(connection: &dyn Any, data: &mut Extensions) {
    #[cfg(unix)]
    if let Some(socket) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        use std::os::fd::AsRawFd;
        data.insert(PeerSocket(socket.as_raw_fd()));
    }
    #[cfg(not(unix))]
    let _ = (connection, data);
}

impl PeerSocket {
    pub(crate) fn of(req: &HttpRequest) -> Option<Self> {
        req.conn_data::<Self>().copied()
    }

    #[cfg(unix)]
    fn gone(self) -> bool {
        let mut byte = 0u8;
        // SAFETY: recv writes at most one byte into `byte`, and touches no
        // memory of ours otherwise, whatever the descriptor is. MSG_PEEK
        // leaves what it sees (a pipelined next request) for actix. The
        // descriptor stays the connection's while this is polled: see
        // `hung_up`.
        let n = unsafe {
            libc::recv(
                self.0,
                (&raw mut byte).cast(),
                1,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        match n {
            0 => true,
            n if n > 0 => false,
            _ => !matches!(
                std::io::Error::last_os_error().kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted
            ),
        }
    }

    #[cfg(not(unix))]
    fn gone(self) -> bool {
        false
    }
}

/// Resolves once the client behind `socket` has gone; never without one.
///
/// Poll it together with something that ends when the request's reply is
/// dropped (generate.rs selects it against the reply channel closing, which
/// is polled first): actix drops the reply before it closes the socket, so
/// a descriptor reused by a later connection is never peeked at.
pub(crate) async fn hung_up(socket: Option<PeerSocket>) {
    let Some(socket) = socket else {
        return std::future::pending().await;
    };
    loop {
        actix_web::rt::time::sleep(POLL).await;
        if socket.gone() {
            return;
        }
    }
}
