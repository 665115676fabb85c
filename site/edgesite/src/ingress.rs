//! The node's built-in ingress (the `ingress` crate): flags, and its start beside the mesh,
//! whose service table and dialer it uses.

use std::net::IpAddr;

use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Clone, Debug)]
pub struct IngressArgs {
    /// No ingress on this node (K3s users turn off Traefik the same way).
    #[arg(long)]
    pub disable_ingress: bool,
    /// The ingress's HTTP port.
    #[arg(long, default_value_t = 80)]
    pub ingress_http_port: u16,
    /// The ingress's HTTPS port.
    #[arg(long, default_value_t = 443)]
    pub ingress_https_port: u16,
    /// The address the ingress listens on.
    #[arg(long, default_value = "0.0.0.0")]
    pub ingress_bind: IpAddr,
    /// The largest request body the ingress passes on (`512k`, `100m`, `1g`; `0`: no limit);
    /// an Ingress may set its own with `nginx.ingress.kubernetes.io/proxy-body-size`.
    #[arg(long, default_value = "100m", value_parser = body_size)]
    pub ingress_max_body_size: u64,
}

fn body_size(text: &str) -> Result<u64, String> {
    ingress::routes::parse_size(text).ok_or_else(|| {
        format!("{text:?} is not a size: bytes, or a number with k, m or g (0: no limit)")
    })
}

/// Starts node `node`'s ingress once the mesh shares its service table; hands back what the
/// mesh shares it through (`None`: no ingress).
pub fn start(
    args: &IngressArgs,
    mesh_enabled: bool,
    node: &str,
    client: kube::Client,
    shutdown: CancellationToken,
) -> Option<tokio::sync::oneshot::Sender<edgemesh::agent::Published>> {
    if args.disable_ingress {
        return None;
    }
    if !mesh_enabled {
        tracing::warn!(
            "no ingress on this node: it needs the mesh's service table (--disable-mesh turns it off too)"
        );
        return None;
    }
    let (share, shared) = tokio::sync::oneshot::channel();
    let config = ingress::IngressConfig {
        node: node.to_string(),
        http: (args.ingress_bind, args.ingress_http_port).into(),
        https: (args.ingress_bind, args.ingress_https_port).into(),
        max_body: args.ingress_max_body_size,
    };
    tokio::spawn(async move {
        let Ok(mesh) = shared.await else { return };
        if let Err(error) = ingress::run(config, client, mesh, shutdown).await {
            tracing::error!("the ingress is not running: {error:#}");
        }
    });
    Some(share)
}
