//! A TCP proxy a test can cut: it stands between the gateway and PostgreSQL, so the store
//! can be taken away and given back while the gateway runs.

/// Cutting drops every connection and closes the listener, so reconnects are refused until a
/// new proxy starts on the same address.
pub struct Proxy {
    pub addr: std::net::SocketAddr,
    pub cut: tokio_util::sync::CancellationToken,
}

impl Proxy {
    pub async fn start(addr: std::net::SocketAddr, upstream: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cut = tokio_util::sync::CancellationToken::new();
        let stop = cut.clone();
        tokio::spawn(async move {
            loop {
                let (mut inbound, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    a = listener.accept() => a.unwrap(),
                };
                let upstream = upstream.clone();
                let stop = stop.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    }
                });
            }
        });
        Proxy { addr, cut }
    }
}
