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
    {
        // Recurring campaigns (`schedule:`): derived from the store alone, so a
        // restart neither forgets nor duplicates a run.
        let s = shared.clone();
        tokio::spawn(async move {
            let mut iv = tokio::time::interval(std::time::Duration::from_secs(20));
            loop {
                iv.tick().await;
                let st = s.store.clone();
                let now = crate::store::now_ms() / 1000;
                let due = tokio::task::spawn_blocking(move || {
                    let rows = st.campaigns_blocking()?;
                    let mut out = Vec::new();
                    for id in crate::campaign::cron::due(&rows, now) {
                        out.push((id, st.spec_yaml_blocking(id)?));
                    }
                    Ok::<_, crate::store::StoreError>(out)
                })
                .await;
                let Ok(Ok(due)) = due else { continue };
                for (id, yaml) in due {
                    let models = s.cfg.models_dir.clone();
                    let y2 = yaml.clone();
                    let origin = format!("campaign {id} (recurring)");
                    let c = match tokio::task::spawn_blocking(move || {
                        crate::campaign::compile(&origin, &y2, &models)
                    })
                    .await
                    {
                        Ok(Ok(c)) => c,
                        Ok(Err(e)) => {
                            tracing::error!(campaign = id, error = %e, "recurring campaign no longer compiles");
                            continue;
                        }
                        Err(_) => continue,
                    };
                    let (plan, strata, inj) =
                        (c.plan.clone(), c.strata.clone(), c.injections.clone());
                    if let Ok(new_id) = s.store.insert_campaign(yaml, c).await {
                        tracing::info!(
                            campaign = new_id,
                            after = id,
                            "recurring campaign submitted"
                        );
                        s.add_campaign(new_id, plan, strata, inj);
                    }
                }
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
