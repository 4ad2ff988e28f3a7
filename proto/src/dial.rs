//! How a node or a client opens a gRPC channel to a Basalt address.
//!
//! Production dials plain TCP. The deterministic simulator dials through its simulated network
//! instead, so that the very same client, forwarding and peer-transport code runs under it: the
//! only thing that changes is this one value, handed down to every place that creates a
//! [`Channel`]. Keeping that choice in one type is what guarantees the simulator never takes a
//! code path production does not.
//!
//! Channels are always lazy: creating one never touches the network, the first request connects,
//! and a broken connection is re-established by the next request.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;

use futures::future::BoxFuture;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tonic::transport::{Channel, Endpoint, Uri};

/// A connected byte stream of any kind.
pub trait Connection: AsyncRead + AsyncWrite + Send + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin + 'static> Connection for T {}

/// A boxed [`Connection`], what a custom dialer returns.
pub type BoxedConnection = Pin<Box<dyn Connection>>;

/// Opens a connection to `host:port`.
pub type DialFn = dyn Fn(String) -> BoxFuture<'static, io::Result<BoxedConnection>> + Send + Sync;

/// How channels are opened. See the module documentation.
#[derive(Clone, Default)]
pub enum Dialer {
    /// Plain TCP through the operating system.
    #[default]
    Tcp,
    /// Any other transport, given `host:port`.
    Custom(Arc<DialFn>),
}

impl Dialer {
    /// A dialer that opens connections with `dial`.
    pub fn custom<F>(dial: F) -> Self
    where
        F: Fn(String) -> BoxFuture<'static, io::Result<BoxedConnection>> + Send + Sync + 'static,
    {
        Dialer::Custom(Arc::new(dial))
    }

    /// A lazily connected channel to `endpoint` (see the module documentation).
    pub fn channel(&self, endpoint: Endpoint) -> Channel {
        match self {
            Dialer::Tcp => endpoint.connect_lazy(),
            Dialer::Custom(dial) => {
                let dial = dial.clone();
                endpoint.connect_with_connector_lazy(tower::service_fn(move |uri: Uri| {
                    let dial = dial.clone();
                    async move {
                        let authority = uri
                            .authority()
                            .ok_or_else(|| {
                                io::Error::new(io::ErrorKind::InvalidInput, format!("no host:port in {uri}"))
                            })?
                            .to_string();
                        dial(authority).await.map(TokioIo::new)
                    }
                }))
            }
        }
    }
}

impl fmt::Debug for Dialer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dialer::Tcp => f.write_str("Dialer::Tcp"),
            Dialer::Custom(_) => f.write_str("Dialer::Custom"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_custom_dialer_is_asked_for_the_endpoint_authority() {
        let asked: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = asked.clone();
        let dialer = Dialer::custom(move |addr| {
            seen.lock().unwrap().push(addr);
            Box::pin(async { Err(io::Error::new(io::ErrorKind::ConnectionRefused, "test dialer refuses")) })
        });
        let channel = dialer.channel(Endpoint::from_static("http://n7:7379"));
        let mut client = crate::v1::kv_client::KvClient::new(channel);
        let err = client
            .get(crate::v1::GetRequest::default())
            .await
            .expect_err("the dialer refuses every connection");
        assert_eq!(*asked.lock().unwrap(), vec!["n7:7379".to_string()], "{err}");
    }
}
