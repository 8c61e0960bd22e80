//! Board recovery: wait for the agent, power-cycle (respecting the minimum off time),
//! health check; after `max_failed_recoveries` the board goes `bad` and the alert
//! metric fires. Each incident leaves a post-mortem bundle (console tail, last
//! telemetry, trial ids) under `incidents/<id>/` in the data dir.

pub mod console;
pub mod power;

use crate::registry::{Health, SchedState};
use crate::scheduling::Shared;
use crate::store::now_ms;
use proto::wire::{ControllerMsg, Outcome, Record};
use std::sync::Arc;
use std::time::Duration;

/// Starts recovering `board` unless it is already being recovered. `fail_fast`: the
/// console showed a crash signature, so do not wait for the agent first.
pub fn start(shared: Arc<Shared>, board: String, cause: String, fail_fast: bool) {
    {
        let mut lab = shared.lab();
        if lab.recovering.contains(&board) {
            return;
        }
        let Some(b) = lab.boards.get_mut(&board) else {
            return;
        };
        if matches!(b.health, Health::Maintenance | Health::Retired) {
            return;
        }
        b.state = SchedState::Recovering;
        lab.recovering.insert(board.clone());
        shared.update_board_gauges(&lab);
    }
    tracing::warn!(board, cause, fail_fast, "recovery started");
    tokio::spawn(escalate(shared, board, cause, fail_fast));
}

async fn wait_online(shared: &Shared, board: &str, ms: u64, since_session: Option<u64>) -> bool {
    let deadline = now_ms() + ms;
    loop {
        {
            let lab = shared.lab();
            if let Some(s) = lab.boards.get(board).and_then(|b| b.session.as_ref())
                && Some(s.id) != since_session
            {
                return true;
            }
        }
        if now_ms() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With the agent connected: stop its old job, let it re-send its spool, run a
/// health check.
async fn settle_and_check(shared: &Arc<Shared>, board: &str) -> bool {
    let job = {
        let mut lab = shared.lab();
        let job = lab.leases.get(board).map(|l| l.job_id);
        if let Some(j) = job
            && !lab.cancels.contains_key(board)
        {
            if let Some(b) = lab.boards.get(board) {
                b.send(ControllerMsg::Cancel { job_id: j });
            }
            lab.cancels.insert(board.to_string(), (j, Vec::new()));
        }
        job
    };
    if let Some(rx) = shared.cancel_wait(board) {
        let r = tokio::time::timeout(Duration::from_secs(30), rx).await;
        if r.is_err() {
            tracing::warn!(board, ?job, "old job did not confirm cancellation");
            shared.lab().cancels.remove(board);
        }
    }
    // The agent re-sends its spool right after Hello; wait until it is committed so
    // the in-flight trial's own records (or the agent's crash records) are seen.
    let deadline = now_ms() + 15_000;
    loop {
        let caught_up = {
            let lab = shared.lab();
            match lab.boards.get(board) {
                Some(b) => match &b.session {
                    Some(s) => b.committed_upto >= s.spool_head_at_hello,
                    None => return false,
                },
                None => return false,
            }
        };
        if caught_up || now_ms() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A board that just booted may need a moment before its accelerator answers.
    for attempt in 0..3 {
        if shared.health_check(board).await {
            return true;
        }
        if attempt < 2 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    false
}

async fn unless_crashed(
    shared: &Shared,
    board: &str,
    crashes: u64,
    f: impl std::future::Future<Output = bool>,
) -> bool {
    let watch = async {
        loop {
            if shared.consoles.crash_count(board) != crashes {
                tracing::warn!(board, "crashed again during recovery");
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::select! {
        r = f => r,
        r = watch => r,
    }
}

/// After power-on: wait for the OS to reach its login prompt when there is a console
/// (bootloader-aware: never poke a board that is still in U-Boot), then for the agent.
async fn wait_booted(shared: &Shared, board: &str, on_ms: u64, ms: u64) -> bool {
    let deadline = on_ms + ms;
    if shared.consoles.has(board) {
        loop {
            if shared
                .consoles
                .prompt_seen(board)
                .is_some_and(|t| t >= on_ms)
            {
                break;
            }
            if now_ms() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    wait_online(shared, board, deadline.saturating_sub(now_ms()), None).await
}

async fn escalate(shared: Arc<Shared>, board: String, cause: String, fail_fast: bool) {
    let t = &shared.cfg.timing;
    let m = shared.metrics.clone();
    let held = shared.hold_in_flight(&board);
    // What the console said around the failure (the panic block follows its first
    // line within milliseconds); the bundle also gets the tail after recovery.
    if fail_fast {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let console_at_incident = shared.consoles.tail(&board);
    let trials: Vec<(u64, u64)> = held.iter().map(|(c, _, t, _)| (*c, *t)).collect();
    let incident = shared
        .store
        .open_incident(&board, cause.clone(), trials.clone())
        .await
        .ok();
    let mut actions: Vec<String> = Vec::new();
    let mut power_cycled = false;
    let mut ok = false;

    if !fail_fast {
        actions.push("wait_reconnect".into());
        let online = wait_online(&shared, &board, t.reconnect_wait_ms, None).await;
        if online {
            ok = settle_and_check(&shared, &board).await;
        }
        m.recoveries
            .with_label_values(&["wait_reconnect", if ok { "ok" } else { "failed" }])
            .inc();
    }
    let power = shared.cfg.board(&board).and_then(|b| b.power.clone());
    let mut failed = shared
        .lab()
        .boards
        .get(&board)
        .map(|b| b.failed_recoveries)
        .unwrap_or(0);
    while !ok {
        match &power {
            Some(p) => {
                actions.push("power_cycle".into());
                let cycle = async {
                    power::act(p, &board, "off").await?;
                    tokio::time::sleep(Duration::from_millis(power::min_off_ms(p))).await;
                    power::act(p, &board, "on").await.map(|_| now_ms())
                }
                .await;
                match cycle {
                    Ok(on_ms) => {
                        power_cycled = true;
                        m.recoveries.with_label_values(&["power_cycle", "ok"]).inc();
                        // A crash printed while we wait (e.g. the agent resumed an
                        // undervolted trial) ends this attempt at once.
                        let crashes = shared.consoles.crash_count(&board);
                        ok = unless_crashed(&shared, &board, crashes, async {
                            wait_booted(&shared, &board, on_ms, t.boot_wait_ms).await
                                && settle_and_check(&shared, &board).await
                        })
                        .await;
                    }
                    Err(e) => {
                        tracing::error!(board, error = %e, "power control failed");
                        actions.push(format!("power_error: {e}"));
                        m.recoveries
                            .with_label_values(&["power_cycle", "error"])
                            .inc();
                    }
                }
            }
            None => {
                actions.push("wait_boot_no_power_driver".into());
                let online = wait_online(&shared, &board, t.boot_wait_ms, None).await;
                ok = online && settle_and_check(&shared, &board).await;
            }
        }
        m.recoveries
            .with_label_values(&["health_check", if ok { "ok" } else { "failed" }])
            .inc();
        if !ok {
            failed += 1;
            tracing::warn!(board, failed, "recovery attempt failed");
            if failed >= t.max_failed_recoveries {
                break;
            }
        }
    }

    // The trial in flight when a board died is a crash outcome. A board that comes
    // back reports it itself (its agent sees the new boot id) and re-sends its spool,
    // so the controller only writes it for a board that never came back; otherwise
    // the held trial, if still open, simply goes back to the queue.
    let _ = power_cycled;
    if let Some((campaign, job, trial, attempt)) = held
        && !shared.trial_is_final(campaign, trial)
        && !ok
    {
        let inputs = shared.run_inputs(campaign);
        let recs: Vec<Record> = inputs
            .iter()
            .map(|i| crash_record(campaign, job, trial, attempt, *i, &cause))
            .collect();
        match shared.store.ingest(&board, recs.clone(), 0).await {
            Ok(new) => {
                let fresh: Vec<&Record> = recs
                    .iter()
                    .zip(&new)
                    .filter(|(_, n)| **n)
                    .map(|(r, _)| r)
                    .collect();
                shared.on_records(&board, &fresh);
                tracing::warn!(board, campaign, trial, "in-flight trial recorded as crash");
            }
            Err(e) => tracing::error!(board, error = %e, "could not store crash records"),
        }
    }

    let bundle = write_bundle(
        &shared,
        &board,
        incident,
        &cause,
        &actions,
        &trials,
        ok,
        &console_at_incident,
    );
    let (health, reason) = if ok {
        (Health::Good, None)
    } else {
        (
            Health::Bad,
            Some(format!("{failed} failed recoveries after: {cause}")),
        )
    };
    {
        let mut lab = shared.lab();
        lab.recovering.remove(&board);
        shared.release_lease(&mut lab, &board);
        if let Some(b) = lab.boards.get_mut(&board) {
            b.state = SchedState::Idle;
            if !matches!(b.health, Health::Maintenance | Health::Retired) {
                b.health = health;
                b.health_reason = reason.clone();
            }
            b.failed_recoveries = if ok { 0 } else { failed };
        }
        m.board_bad_alert
            .with_label_values(&[&board])
            .set((!ok) as i64);
        shared.pump(&mut lab);
    }
    let _ = shared
        .store
        .set_board_health(&board, health.as_str(), reason, if ok { 0 } else { failed })
        .await;
    if let Some(id) = incident {
        let _ = shared
            .store
            .close_incident(id, actions, if ok { "recovered" } else { "bad" }, bundle)
            .await;
    }
    tracing::warn!(board, ok, "recovery finished");
}

fn crash_record(
    campaign: u64,
    job: u64,
    trial: u64,
    attempt: u32,
    input: u32,
    cause: &str,
) -> Record {
    Record {
        job_id: job,
        campaign_id: campaign,
        trial_id: trial,
        attempt,
        input,
        ..Record::unmeasured(
            Outcome::Crash,
            format!("board died during the trial: {cause}"),
        )
    }
}

#[allow(clippy::too_many_arguments)]
fn write_bundle(
    shared: &Shared,
    board: &str,
    incident: Option<u64>,
    cause: &str,
    actions: &[String],
    trials: &[(u64, u64)],
    ok: bool,
    at_incident: &[String],
) -> Option<String> {
    let id = incident?;
    let dir = shared
        .store
        .dir
        .join("incidents")
        .join(format!("{id}-{board}"));
    std::fs::create_dir_all(&dir).ok()?;
    let tail = shared.consoles.tail(board).join("\n");
    let _ = std::fs::write(dir.join("console_tail.txt"), tail);
    let _ = std::fs::write(dir.join("console_at_incident.txt"), at_incident.join("\n"));
    let telemetry = shared
        .lab()
        .boards
        .get(board)
        .and_then(|b| b.last_telemetry.clone());
    let summary = serde_json::json!({
        "incident": id, "board": board, "cause": cause, "actions": actions,
        "result": if ok { "recovered" } else { "bad" },
        "trials": trials.iter().map(|(c, t)| serde_json::json!({"campaign": c, "trial": t})).collect::<Vec<_>>(),
        "last_telemetry": telemetry.map(|t| serde_json::json!({
            "unix_ms": t.unix_ms, "power_w": t.power_w, "current_a": t.current_a,
            "rails_mv": t.rails_mv, "temps_c": t.temps_c,
        })),
        "written_ms": now_ms(),
    });
    let _ = std::fs::write(
        dir.join("incident.json"),
        serde_json::to_vec_pretty(&summary).unwrap_or_default(),
    );
    Some(dir.display().to_string())
}
