//! An agent's client-side load balancer, as K3s's: a TCP forwarder on a loopback port of its own
//! in front of the site's servers. The agent's API clients connect to it; each connection goes to
//! the server the last one went to, or, when that one does not answer, to the next server that
//! does. TLS passes through untouched (every server's certificate names 127.0.0.1), so the agent
//! keeps verifying the server it reached.
//!
//! The servers are the one the agent was given (`--server`, tried first: it is known to be
//! reachable from the agent) and those the agent learns from the `kubernetes` Service's endpoints
//! ([`Balancer::set_servers`]), saved to a file so an agent restarted while its first server is
//! down still finds the others.
//! The server in use is checked every [`CHECK`]; when it stops accepting connections, or leaves
//! the list, the connections forwarded to it are closed so their clients reconnect (through the
//! balancer, to a live server) instead of waiting on a dead peer.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How often the server in use is checked.
pub const CHECK: Duration = Duration::from_secs(2);
/// How long a server has to accept a connection.
pub const DIAL_TIMEOUT: Duration = Duration::from_secs(3);

/// A running balancer; it stops with the shutdown token it was started with.
#[derive(Clone)]
pub struct Balancer {
    inner: Arc<Inner>,
    local: SocketAddr,
}

struct Inner {
    state: Mutex<State>,
    file: Option<PathBuf>,
}

struct State {
    /// `host:port` of the server the agent was given.
    default: String,
    /// `host:port` of the servers learned, in order.
    servers: Vec<String>,
    /// The server the last connection went to.
    current: Option<String>,
    /// Per server: cancels the connections forwarded to it.
    forwarded: HashMap<String, CancellationToken>,
}

impl State {
    /// Servers in the order to try them: the one in use, the given one (known to be reachable
    /// from here, even through NAT), the learned ones.
    fn candidates(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        let all = self
            .current
            .iter()
            .chain(std::iter::once(&self.default))
            .chain(self.servers.iter());
        for s in all {
            if !out.contains(s) {
                out.push(s.clone());
            }
        }
        out
    }

    fn token(&mut self, server: &str) -> CancellationToken {
        self.forwarded
            .entry(server.to_string())
            .or_default()
            .clone()
    }

    /// Closes the connections forwarded to `server`.
    fn drop_connections(&mut self, server: &str) {
        if let Some(token) = self.forwarded.remove(server) {
            token.cancel();
        }
    }
}

impl Balancer {
    /// Listens on 127.0.0.1 (a free port) and forwards to `default` (`host:port`) and the servers
    /// saved in `file` by an earlier run.
    pub async fn start(
        default: &str,
        file: Option<PathBuf>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Balancer> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let local = listener.local_addr()?;
        let servers = file.as_deref().map(crate::saved::load).unwrap_or_default();
        let balancer = Balancer {
            inner: Arc::new(Inner {
                state: Mutex::new(State {
                    default: default.to_string(),
                    servers,
                    current: None,
                    forwarded: HashMap::new(),
                }),
                file,
            }),
            local,
        };
        tokio::spawn(balancer.clone().accept(listener, shutdown.clone()));
        tokio::spawn(balancer.clone().check(shutdown));
        Ok(balancer)
    }

    /// Where the agent's clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The server in use, once a connection went to one.
    pub fn current(&self) -> Option<String> {
        self.state().current.clone()
    }

    /// The learned servers.
    pub fn servers(&self) -> Vec<String> {
        self.state().servers.clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Replaces the learned servers (`host:port`); connections to a server no longer listed
    /// are closed. An empty list is ignored: a moment without endpoints is not a reason to
    /// forget where the servers are.
    pub fn set_servers(&self, mut servers: Vec<String>) {
        servers.sort();
        servers.dedup();
        if servers.is_empty() {
            return;
        }
        let mut state = self.state();
        if state.servers == servers {
            return;
        }
        tracing::info!(?servers, "the site's API servers");
        let gone: Vec<String> = state
            .forwarded
            .keys()
            .filter(|s| !servers.contains(s) && **s != state.default)
            .cloned()
            .collect();
        for server in gone {
            state.drop_connections(&server);
            if state.current.as_deref() == Some(server.as_str()) {
                state.current = None;
            }
        }
        state.servers = servers.clone();
        drop(state);
        if let Some(file) = &self.inner.file
            && let Err(e) = crate::saved::save(file, &servers)
        {
            tracing::warn!("save the servers to {}: {e}", file.display());
        }
    }

    async fn accept(self, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((client, _)) => {
                    tokio::spawn(self.clone().forward(client, shutdown.clone()));
                }
                Err(e) => {
                    tracing::warn!("load balancer: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// Connects to the first server that answers.
    async fn connect(&self) -> Option<(String, TcpStream)> {
        let candidates = self.state().candidates();
        for server in candidates {
            match tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&server)).await {
                Ok(Ok(stream)) => {
                    let mut state = self.state();
                    if state.current.as_deref() != Some(server.as_str()) {
                        tracing::info!(%server, "load balancer: using server");
                        state.current = Some(server.clone());
                    }
                    return Some((server, stream));
                }
                Ok(Err(e)) => tracing::debug!(%server, "load balancer: {e}"),
                Err(_) => tracing::debug!(%server, "load balancer: no answer"),
            }
            let mut state = self.state();
            if state.current.as_deref() == Some(server.as_str()) {
                state.current = None;
                state.drop_connections(&server);
            }
        }
        None
    }

    async fn forward(self, mut client: TcpStream, shutdown: CancellationToken) {
        let Some((server, mut upstream)) = self.connect().await else {
            tracing::warn!("load balancer: no server of the site answers");
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let closed = self.state().token(&server);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = closed.cancelled() => {}
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
        }
    }

    /// Notices a server that stopped answering while connections to it look open (a machine
    /// that died sends no reset).
    async fn check(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK) => {}
            }
            let Some(server) = self.current() else {
                continue;
            };
            let answers = matches!(
                tokio::time::timeout(DIAL_TIMEOUT, TcpStream::connect(&server)).await,
                Ok(Ok(_))
            );
            if !answers {
                tracing::warn!(%server, "load balancer: the server in use does not answer; its connections are closed");
                let mut state = self.state();
                if state.current.as_deref() == Some(server.as_str()) {
                    state.current = None;
                }
                state.drop_connections(&server);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers each connection with its name.
    async fn named(name: &'static str) -> (String, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    Ok((mut s, _)) = listener.accept() => {
                        tokio::spawn(async move {
                            let _ = s.write_all(name.as_bytes()).await;
                            // Hold the connection even after the server stops listening, as a
                            // machine that died does: only the balancer's check closes it.
                            std::future::pending::<()>().await;
                            drop(s);
                        });
                    }
                }
            }
        });
        (addr, stop)
    }

    async fn ask(balancer: &Balancer) -> (String, TcpStream) {
        let mut s = TcpStream::connect(balancer.local_addr()).await.unwrap();
        let mut buf = [0u8; 1];
        let n = s.read(&mut buf).await.unwrap();
        (String::from_utf8_lossy(&buf[..n]).into_owned(), s)
    }

    #[tokio::test]
    async fn moves_to_a_live_server_and_closes_connections_to_a_dead_one() {
        let (a, stop_a) = named("a").await;
        let (b, _stop_b) = named("b").await;
        let dir = std::env::temp_dir().join(format!("lb-{}", std::process::id()));
        let shutdown = CancellationToken::new();
        let lb = Balancer::start(&a, Some(dir.clone()), shutdown.clone())
            .await
            .unwrap();
        let (first, mut held) = ask(&lb).await;
        assert_eq!(first, "a");
        lb.set_servers(vec![a.clone(), b.clone()]);
        // Server a stops answering; the connection held to it is closed for us.
        stop_a.cancel();
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(CHECK * 3, held.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "a connection to a dead server stays open");
        let (next, _) = ask(&lb).await;
        assert_eq!(next, "b");
        assert_eq!(lb.current(), Some(b.clone()));
        // A new balancer knows the learned servers from the file.
        let again = Balancer::start("127.0.0.1:1", Some(dir.clone()), shutdown.clone())
            .await
            .unwrap();
        assert_eq!(again.servers().len(), 2);
        let (via_file, _) = ask(&again).await;
        assert_eq!(via_file, "b");
        shutdown.cancel();
        let _ = std::fs::remove_file(dir);
    }
}
