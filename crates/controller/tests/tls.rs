//! wss: the controller with `tls:` serves the agent websocket (and everything else)
//! over TLS only; an agent completes Hello/Welcome through it, plain HTTP is refused.

use futures_util::{SinkExt, StreamExt};
use proto::wire::*;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

/// Starts `hil-controller` on a free port with one board token (`b0: tok-b0`) plus
/// `extra` config lines, and waits until it accepts connections.
fn start_controller(dir: &std::path::Path, extra: &str) -> (std::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.join("c.yaml"),
        format!(
            "listen: 127.0.0.1:{port}\ndata_dir: {d}/data\nmodels_dir: {d}\n{extra}tokens:\n  boards: {{b0: tok-b0}}\n",
            d = dir.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_hil-controller"))
        .arg("--config")
        .arg(dir.join("c.yaml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..600 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_session_over_wss() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let tls = format!(
        "tls: {{cert: {d}/cert.pem, key: {d}/key.pem}}\n",
        d = dir.path().display()
    );
    let (mut child, port) = start_controller(dir.path(), &tls);

    // Plain HTTP on the TLS port gets no HTTP answer.
    let plain = controller::client::http_request(
        "GET",
        &format!("http://127.0.0.1:{port}/healthz"),
        None,
        None,
    )
    .await;
    assert!(
        !matches!(plain, Ok((200, _))),
        "plain HTTP answered on a TLS listener"
    );

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut ws, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{port}/v1/agent"), tls)
            .await
            .unwrap();
    let hello = AgentMsg::Hello(Hello {
        proto_version: PROTO_VERSION,
        proto_min_version: PROTO_MIN_VERSION,
        agent_version: "t".into(),
        board_id: "b0".into(),
        token: "tok-b0".into(),
        capabilities: Capabilities::default(),
        features: vec!["cancel".into(), "future-thing".into()],
        spool_head: 0,
        active_job: None,
    });
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    let Message::Binary(b) = m else {
        panic!("{m:?}")
    };
    let ControllerMsg::Welcome(w) = ControllerMsg::decode(&b).unwrap() else {
        panic!("no Welcome")
    };
    assert_eq!(w.proto_version, 1);
    // Only the intersection of features is granted.
    assert_eq!(w.features, vec!["cancel".to_string()]);
    ws.send(Message::Binary(
        AgentMsg::Heartbeat { seq: 7, unix_ms: 0 }.encode().into(),
    ))
    .await
    .unwrap();
    loop {
        let m = ws.next().await.unwrap().unwrap();
        if let Message::Binary(b) = m
            && let Ok(ControllerMsg::HeartbeatAck { seq }) = ControllerMsg::decode(&b)
        {
            assert_eq!(seq, 7);
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_without_overlap_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, port) = start_controller(dir.path(), "");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}/v1/agent"))
        .await
        .unwrap();
    let hello = AgentMsg::Hello(Hello {
        proto_version: 3,
        proto_min_version: 2,
        agent_version: "future".into(),
        board_id: "b0".into(),
        token: "tok-b0".into(),
        capabilities: Capabilities::default(),
        features: vec![],
        spool_head: 0,
        active_job: None,
    });
    ws.send(Message::Binary(hello.encode().into()))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    let Message::Binary(b) = m else {
        panic!("{m:?}")
    };
    let ControllerMsg::Refused { reason } = ControllerMsg::decode(&b).unwrap() else {
        panic!("expected Refused")
    };
    assert!(reason.contains("no common protocol version"), "{reason}");
    let _ = child.kill();
    let _ = child.wait();
}
