//! The real node and client code on turmoil's simulated network.
//!
//! Outgoing connections go through a [`Dialer`] that opens turmoil TCP streams (hosts are found
//! by name, `n1:7379`), and a node's server accepts from a turmoil listener. Nothing else about the
//! transport changes: tonic, HTTP/2, the peer protocol and the client's retry logic are the
//! production code.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use basalt_proto::dial::BoxedConnection;
use basalt_proto::Dialer;
use futures::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// Opens simulated TCP connections.
pub fn dialer() -> Dialer {
    Dialer::custom(|addr| {
        Box::pin(async move {
            let stream = turmoil::net::TcpStream::connect(addr).await?;
            Ok(Box::pin(stream) as BoxedConnection)
        })
    })
}

/// An accepted simulated connection, as tonic's server wants it.
pub struct SimConnection(turmoil::net::TcpStream);

impl Connected for SimConnection {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for SimConnection {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SimConnection {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Binds `port` on the current simulated host; returns the connections it accepts.
pub async fn listen(port: u16) -> io::Result<(impl Stream<Item = io::Result<SimConnection>>, SocketAddr)> {
    let listener = turmoil::net::TcpListener::bind(("0.0.0.0", port)).await?;
    let addr = listener.local_addr()?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = listener.accept().await.map(|(stream, _)| SimConnection(stream));
        Some((next, listener))
    });
    Ok((incoming, addr))
}
