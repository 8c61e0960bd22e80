//! Wires the controller together: store, scheduler, consoles, HTTP/ws listener.

use crate::config::Config;
use crate::metrics::Metrics;
use crate::scheduling::Shared;
use crate::store::Store;
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Tls(#[from] crate::link::tls::TlsError),
    #[error("listen on {0}: {1}")]
    Listen(String, std::io::Error),
}

/// Runs the controller until the process is stopped. `ready` receives the bound
/// address (useful with port 0).
pub async fn run(
    cfg: Config,
    ready: Option<tokio::sync::oneshot::Sender<std::net::SocketAddr>>,
) -> Result<(), ServerError> {
    let metrics = Arc::new(Metrics::new());
    let store = Store::open(&cfg.data_dir, metrics.clone(), cfg.timing.store_batch)?;
    let shared = Shared::new(cfg.clone(), store, metrics)?;
    for b in &cfg.boards {
        if let Some(dev) = &b.console {
            let s = shared.clone();
            let board = b.id.clone();
            let handle = tokio::runtime::Handle::current();
            shared.consoles.spawn(
                b.id.clone(),
                dev.clone(),
                b.console_baud,
                cfg.data_dir.join("consoles"),
                move |sig, line| {
                    let s = s.clone();
                    let board = board.clone();
                    handle.spawn(async move {
                        crate::recovery::start(s, board, format!("console: {sig}: {line}"), true);
                    });
                },
            );
        }
    }
    {
        let s = shared.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(std::time::Duration::from_millis(250));
            loop {
                iv.tick().await;
                s.tick();
            }
        });
    }
    let app = crate::api::router(shared.clone());
    let tcp = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|e| ServerError::Listen(cfg.listen.clone(), e))?;
    let addr = tcp
        .local_addr()
        .map_err(|e| ServerError::Listen(cfg.listen.clone(), e))?;
    tracing::info!(%addr, tls = cfg.tls.is_some(), data_dir = %cfg.data_dir.display(), "controller listening");
    if let Some(r) = ready {
        let _ = r.send(addr);
    }
    match &cfg.tls {
        Some(t) => {
            let sc = crate::link::tls::server_config(&t.cert, &t.key)?;
            let l = crate::link::tls::TlsListener::new(tcp, sc)
                .map_err(|e| ServerError::Listen(cfg.listen.clone(), e))?;
            axum::serve(l, app)
                .await
                .map_err(|e| ServerError::Listen(cfg.listen.clone(), e))
        }
        None => axum::serve(tcp, app)
            .await
            .map_err(|e| ServerError::Listen(cfg.listen.clone(), e)),
    }
}
