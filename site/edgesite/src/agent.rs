//! `edgesite agent`: a node agent that joins a site from another machine. It joins once with a
//! token (certificates are kept in the data dir), talks to the API servers with its node
//! certificate through its load balancer (moving to a live server when one dies), and dials out
//! a tunnel to each server so they can reach its logs without an inbound connection.

use std::fs::File;

use anyhow::{Context, Result, bail};
use tokio_util::sync::CancellationToken;

use crate::AgentCommandArgs;

pub fn run(args: AgentCommandArgs) -> Result<()> {
    let server = args.server.trim_end_matches('/').to_string();
    if !server.starts_with("https://") {
        bail!("--server {server:?} must be the site's https:// URL, e.g. https://10.0.0.1:6443");
    }
    let config = args.agent.to_config(&args.data_dir, false)?;
    let device_setup = args
        .agent
        .devices
        .setup(&args.data_dir, &config.node_name)?;
    let mesh_config = args.agent.mesh.to_config(
        &args.data_dir,
        &config.node_name,
        &config.cluster_domain,
        false,
    )?;
    crate::private_dir(&config.root)?;
    let lock_path = config.root.join("edgesite-agent.lock");
    let lock =
        File::create(&lock_path).with_context(|| format!("create {}", lock_path.display()))?;
    if lock.try_lock().is_err() {
        bail!(
            "another edgesite agent is already using data dir {}; stop it first or choose another --data-dir",
            args.data_dir.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edgesite-agent")
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async move {
        edged::check(&config).await?;
        let credentials = crate::join::credentials(
            &args.data_dir,
            &server,
            args.token.as_deref(),
            &config.node_name,
        )
        .await?;
        let shutdown = CancellationToken::new();
        // Every API client goes through the load balancer, which moves to a live server when
        // the one in use dies; the servers are learned as the agent runs.
        let balancer = link::balancer::Balancer::start(
            &crate::api_servers::authority(&server)?,
            Some(config.root.join("api-servers.json")),
            shutdown.clone(),
        )
        .await
        .context("start the load balancer in front of the servers")?;
        let client = crate::join::kube_client(&crate::join::AgentCredentials {
            server: format!("https://{}", balancer.local_addr()),
            ..credentials.clone()
        })
        .await?;
        let tunnel = edged::streaming::tunnel::TunnelConfig {
            server: credentials.server.clone(),
            ca_pem: credentials.ca.clone(),
            cert_pem: credentials.cert.clone(),
            key_pem: credentials.key.clone(),
        };
        let (tunnel_urls, tunnel_urls_rx) = tokio::sync::watch::channel(vec![server.clone()]);
        tokio::spawn(crate::api_servers::follow(
            client.clone(),
            balancer,
            server.clone(),
            tunnel_urls,
            shutdown.clone(),
        ));
        let tunnel_stop = shutdown.child_token();
        let kubelet = crate::kubelet_api::Settings {
            port: config.kubelet_port,
            node: config.node_name.clone(),
            client: client.clone(),
            ca_pem: credentials.ca.clone(),
            cert_dir: config.root.join("pki"),
            shutdown: shutdown.clone(),
        };
        let publish = move |router: axum::Router| {
            let kubelet = kubelet.start(&router);
            tokio::spawn(crate::api_servers::tunnels(
                tunnel,
                router,
                tunnel_urls_rx,
                tunnel_stop.clone(),
            ));
            (tunnel_stop.drop_guard(), kubelet)
        };
        tracing::info!(node = %config.node_name, server = %server, "EdgeSite agent starting");
        let device_twin = match device_setup {
            Some(setup) => Some(crate::devices::start(
                setup,
                client.clone(),
                shutdown.clone(),
            )?),
            None => None,
        };
        let share = crate::ingress::start(
            &args.agent.ingress,
            mesh_config.is_some(),
            &config.node_name,
            client.clone(),
            shutdown.clone(),
        );
        let mesh = match mesh_config {
            Some(mesh) => {
                Some(crate::mesh::start(mesh, client.clone(), shutdown.clone(), share).await?)
            }
            None => None,
        };
        let mut agent = tokio::spawn(edged::run(config, client, publish, shutdown.clone()));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("interrupt received, shutting down"),
            _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
            finished = &mut agent => {
                return match finished {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(anyhow::Error::new(e).context("node agent")),
                    Err(e) => Err(anyhow::anyhow!("node agent task failed: {e}")),
                };
            }
        }
        shutdown.cancel();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), agent).await;
        if let Some(twin) = device_twin {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), twin).await;
        }
        if let Some(mesh) = mesh {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), mesh).await;
        }
        Ok(())
    })
}
