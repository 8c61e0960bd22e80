//! The REST API and the agent endpoint against bad input, on a real controller process.

mod common;
use common::*;
use controller::client::{ClientError, http_request};
use futures_util::{SinkExt, StreamExt};
use proto::wire::*;
use std::sync::Arc;
use tokio_tungstenite::tungstenite::Message;

fn status(e: ClientError) -> (u16, String) {
    match e {
        ClientError::Status { status, message } => (status, message),
        other => panic!("expected an HTTP error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_roles_and_bad_campaigns() {
    let mut lab = Lab::new(&["b0"], "");
    lab.start();
    // 401 without and with a wrong token.
    let (s, b) = http_request("GET", &format!("{}/api/campaigns", lab.url()), None, None)
        .await
        .unwrap();
    assert_eq!(s, 401, "{}", String::from_utf8_lossy(&b));
    assert!(String::from_utf8_lossy(&b).contains("missing bearer token"));
    let e = lab
        .client("nope-nope-nope")
        .json("GET", "/api/boards", None)
        .await
        .unwrap_err();
    assert_eq!(status(e), (401, "invalid bearer token".into()));
    // OpenAPI and metrics need no token.
    let (s, b) = http_request(
        "GET",
        &format!("{}/api/openapi.json", lab.url()),
        None,
        None,
    )
    .await
    .unwrap();
    assert_eq!(s, 200);
    let doc: serde_json::Value = serde_json::from_slice(&b).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    assert!(doc["paths"]["/api/campaigns/{id}/cancel"]["post"].is_object());

    let op = lab.client(OPERATOR);
    let ro = lab.client(READER);
    // Read-only may not submit or cancel (403), may read.
    let e = ro.submit("c.yaml", campaign_yaml(1, 2)).await.unwrap_err();
    assert_eq!(status(e).0, 403);
    let v = op.submit("c.yaml", campaign_yaml(1, 2)).await.unwrap();
    let id = v["id"].as_u64().unwrap();
    let e = ro
        .json("POST", &format!("/api/campaigns/{id}/cancel"), None)
        .await
        .unwrap_err();
    let (code, msg) = status(e);
    assert_eq!(code, 403);
    assert!(msg.contains("read-only"), "{msg}");
    assert!(
        ro.json("GET", &format!("/api/campaigns/{id}"), None)
            .await
            .is_ok()
    );
    // Malformed YAML, unknown field, impossible strata: 400 naming file, line, field.
    let (code, msg) = status(
        op.submit("bad.yaml", "name: [x\nmodels: 3\n".into())
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(msg.starts_with("bad.yaml: "), "{msg}");
    let (code, msg) = status(
        op.submit(
            "u.yaml",
            campaign_yaml(1, 2).replace("seed: 1", "seed: 1\nsede: 2"),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(msg.contains("sede") && msg.contains("line 9"), "{msg}");
    let (code, msg) = status(
        op.submit(
            "i.yaml",
            campaign_yaml(1, 2).replace("strata: [model, layer]", "strata: [model, voltage]"),
        )
        .await
        .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(
        msg.contains("impossible strata") && msg.contains("line 6"),
        "{msg}"
    );
    let (code, msg) = status(
        op.submit("f.yaml", campaign_yaml(1, 5000))
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 400);
    assert!(
        msg.contains("impossible strata") && msg.contains("sizing.count"),
        "{msg}"
    );
    // The rejected files did not create campaigns.
    let list = ro.json("GET", "/api/campaigns", None).await.unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    // Operator cancel works.
    let v = op
        .json("POST", &format!("/api/campaigns/{id}/cancel"), None)
        .await
        .unwrap();
    assert_eq!(v["state"], "cancelled");
    let (code, _) = status(
        op.json("POST", &format!("/api/campaigns/{id}/resume"), None)
            .await
            .unwrap_err(),
    );
    assert_eq!(code, 409);
}

async fn expect_close(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> (u16, String) {
    while let Some(m) = ws.next().await {
        match m {
            Ok(Message::Close(Some(f))) => return (u16::from(f.code), f.reason.to_string()),
            Ok(Message::Close(None)) => return (0, String::new()),
            Ok(_) => continue,
            Err(e) => return (0, e.to_string()),
        }
    }
    (0, "stream ended".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_agent_frames_are_refused_and_nothing_is_lost() {
    let mut lab = Lab::new(&["b0"], "");
    lab.start();
    let op = lab.client(OPERATOR);
    let id = op.submit("c.yaml", campaign_yaml(3, 2)).await.unwrap()["id"]
        .as_u64()
        .unwrap();

    // A well-behaved session commits some records first.
    let agent = Arc::new(TestAgent::new("b0", &lab.ws_url(), 5));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let a2 = agent.clone();
    let h = tokio::spawn(async move { a2.run(stop_rx).await });
    for _ in 0..600 {
        if agent.state.lock().unwrap().ran >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    h.await.unwrap();
    let committed_before = {
        let st = agent.state.lock().unwrap();
        st.seq - st.spool.len() as u64
    };
    assert!(committed_before > 0);

    let hello = |tok: &str| AgentMsg::Hello(agent.hello(tok)).encode();

    // Wrong token: Refused + policy close.
    let (mut ws, _) = tokio_tungstenite::connect_async(lab.ws_url())
        .await
        .unwrap();
    ws.send(Message::Binary(hello("wrong").into()))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    let Message::Binary(b) = m else {
        panic!("expected Refused, got {m:?}")
    };
    assert!(
        matches!(ControllerMsg::decode(&b).unwrap(), ControllerMsg::Refused { reason } if reason.contains("wrong token"))
    );
    assert_eq!(expect_close(&mut ws).await.0, 1008);

    // Garbage after a valid Hello: 1007 naming the decode error.
    let (mut ws, _) = tokio_tungstenite::connect_async(lab.ws_url())
        .await
        .unwrap();
    ws.send(Message::Binary(hello("tok-b0").into()))
        .await
        .unwrap();
    ws.send(Message::Binary(vec![0xff, 0xfe, 0x01, 0x02, 0x03].into()))
        .await
        .unwrap();
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 1007, "{reason}");
    assert!(reason.contains("malformed"), "{reason}");

    // Oversized frame: 1009.
    let (mut ws, _) = tokio_tungstenite::connect_async(lab.ws_url())
        .await
        .unwrap();
    ws.send(Message::Binary(hello("tok-b0").into()))
        .await
        .unwrap();
    ws.send(Message::Binary(vec![1u8; MAX_FRAME_BYTES + 10].into()))
        .await
        .unwrap();
    let (code, reason) = expect_close(&mut ws).await;
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("exceeds"), "{reason}");

    // Text frame: 1003.
    let (mut ws, _) = tokio_tungstenite::connect_async(lab.ws_url())
        .await
        .unwrap();
    ws.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(expect_close(&mut ws).await.0, 1003);

    // Garbage as the very first frame.
    let (mut ws, _) = tokio_tungstenite::connect_async(lab.ws_url())
        .await
        .unwrap();
    ws.send(Message::Binary(vec![0x05].into())).await.unwrap();
    assert_eq!(expect_close(&mut ws).await.0, 1007);

    // Nothing stored was lost: the next Welcome confirms what was committed.
    let (mut ws, _) = tokio_tungstenite::connect_async(lab.ws_url())
        .await
        .unwrap();
    ws.send(Message::Binary(hello("tok-b0").into()))
        .await
        .unwrap();
    let m = ws.next().await.unwrap().unwrap();
    let Message::Binary(b) = m else { panic!() };
    let ControllerMsg::Welcome(w) = ControllerMsg::decode(&b).unwrap() else {
        panic!("no welcome")
    };
    assert!(
        w.committed_upto >= committed_before,
        "{} < {committed_before}",
        w.committed_upto
    );
    let rep = op
        .json("GET", &format!("/api/campaigns/{id}/report"), None)
        .await
        .unwrap();
    assert!(rep["trials"].as_u64().unwrap() >= 1, "{rep}");
    let metrics = http_request("GET", &format!("{}/metrics", lab.url()), None, None)
        .await
        .unwrap()
        .1;
    let m = String::from_utf8_lossy(&metrics);
    assert!(
        m.contains("hil_agent_frames_rejected_total{reason=\"malformed\"}"),
        "{m}"
    );
    assert!(
        m.contains("hil_agent_frames_rejected_total{reason=\"oversized\"}"),
        "{m}"
    );
}
