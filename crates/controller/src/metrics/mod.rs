//! Prometheus metrics. Label sets are bounded: boards and campaigns are operator-sized
//! sets, outcomes/states are enums, and no label ever carries a trial or record id.
//! Per-campaign series are removed when the campaign finishes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub boards: IntGaugeVec,
    pub board_up: IntGaugeVec,
    pub board_bad_alert: IntGaugeVec,
    pub board_health: IntGaugeVec,
    pub power_watts: GaugeVec,
    pub rail_volts: GaugeVec,
    pub rail_min_volts: GaugeVec,
    pub rail_max_volts: GaugeVec,
    pub temperature_celsius: GaugeVec,
    pub inference_latency: HistogramVec,
    pub trial_outcomes: IntCounterVec,
    pub campaign_outcomes: IntCounterVec,
    pub campaign_trials_planned: IntGaugeVec,
    pub campaign_trials_done: IntGaugeVec,
    pub campaign_progress: GaugeVec,
    pub ingest_records: IntCounter,
    pub ingest_duplicates: IntCounter,
    pub ingest_batch_seconds: HistogramVec,
    pub store_commit_seconds: HistogramVec,
    pub recoveries: IntCounterVec,
    pub ws_rejected: IntCounterVec,
    pub agents_connected: prometheus::IntGauge,
    pub canary_runs: IntCounterVec,
    pub canary_mismatches: IntCounterVec,
    pub infra_retries: IntCounter,
    pub layer_trials: IntCounterVec,
    pub layer_failures: IntCounterVec,
    pub voltage_trials: IntCounterVec,
    pub voltage_failures: IntCounterVec,
    /// Per campaign, the label tails created on the breakdown counters above, so
    /// `forget_campaign` can remove them (prometheus 0.14 has no partial-match removal).
    breakdowns: Mutex<BTreeMap<String, BreakdownKeys>>,
}

#[derive(Default)]
struct BreakdownKeys {
    layers: BTreeSet<[String; 2]>,
    voltages: BTreeSet<[String; 3]>,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    // Names are static and unique; a clash is a programming error caught by the tests.
    r.register(Box::new(c.clone()))
        .expect("metric registered twice");
    c
}

impl Metrics {
    pub fn new() -> Metrics {
        let r = Registry::new();
        let lat_buckets = prometheus::exponential_buckets(0.0005, 2.0, 16).expect("buckets");
        let fast = prometheus::exponential_buckets(0.0001, 2.0, 16).expect("buckets");
        Metrics {
            boards: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hil_boards",
                        "Boards by connectivity, scheduling state and health",
                    ),
                    &["connectivity", "state", "health"],
                )
                .expect("m"),
            ),
            board_up: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hil_board_up",
                        "1 if the board's agent is connected and heartbeating",
                    ),
                    &["board"],
                )
                .expect("m"),
            ),
            board_bad_alert: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hil_board_bad_alert",
                        "1 once a board went bad after failed recoveries",
                    ),
                    &["board"],
                )
                .expect("m"),
            ),
            board_health: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hil_board_health",
                        "1 for the board's current health, 0 for the other values",
                    ),
                    &["board", "health"],
                )
                .expect("m"),
            ),
            power_watts: reg(
                &r,
                GaugeVec::new(
                    Opts::new("hil_board_power_watts", "Board input power"),
                    &["board"],
                )
                .expect("m"),
            ),
            rail_volts: reg(
                &r,
                GaugeVec::new(
                    Opts::new("hil_board_rail_volts", "Measured rail voltage (read-back)"),
                    &["board", "rail"],
                )
                .expect("m"),
            ),
            rail_min_volts: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "hil_board_rail_min_volts",
                        "Hard lower limit of a rail, from the agent's Hello capabilities",
                    ),
                    &["board", "rail"],
                )
                .expect("m"),
            ),
            rail_max_volts: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "hil_board_rail_max_volts",
                        "Hard upper limit of a rail, from the agent's Hello capabilities",
                    ),
                    &["board", "rail"],
                )
                .expect("m"),
            ),
            temperature_celsius: reg(
                &r,
                GaugeVec::new(
                    Opts::new("hil_board_temperature_celsius", "Board temperature sensors"),
                    &["board", "sensor"],
                )
                .expect("m"),
            ),
            inference_latency: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "hil_inference_latency_seconds",
                        "Per-inference accelerator latency",
                    )
                    .buckets(lat_buckets),
                    &["model"],
                )
                .expect("m"),
            ),
            trial_outcomes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_inference_outcomes_total",
                        "Inferences committed, by model and outcome",
                    ),
                    &["model", "outcome"],
                )
                .expect("m"),
            ),
            campaign_outcomes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_campaign_inference_outcomes_total",
                        "Inferences committed for active campaigns, by outcome",
                    ),
                    &["campaign", "outcome"],
                )
                .expect("m"),
            ),
            campaign_trials_planned: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hil_campaign_trials_planned",
                        "Injections in an active campaign's list",
                    ),
                    &["campaign"],
                )
                .expect("m"),
            ),
            campaign_trials_done: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "hil_campaign_trials_done",
                        "Injections of an active campaign with a final outcome",
                    ),
                    &["campaign"],
                )
                .expect("m"),
            ),
            campaign_progress: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "hil_campaign_progress_ratio",
                        "Done / planned for active campaigns",
                    ),
                    &["campaign"],
                )
                .expect("m"),
            ),
            ingest_records: reg(
                &r,
                IntCounter::new(
                    "hil_ingest_records_total",
                    "Records committed and acknowledged",
                )
                .expect("m"),
            ),
            ingest_duplicates: reg(
                &r,
                IntCounter::new(
                    "hil_ingest_duplicate_records_total",
                    "Records received again and dropped as already stored",
                )
                .expect("m"),
            ),
            ingest_batch_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "hil_ingest_batch_seconds",
                        "Time from receiving a record batch to its ack",
                    )
                    .buckets(fast.clone()),
                    &[],
                )
                .expect("m"),
            ),
            store_commit_seconds: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "hil_store_commit_seconds",
                        "Store transaction time by kind",
                    )
                    .buckets(fast),
                    &["kind"],
                )
                .expect("m"),
            ),
            recoveries: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_recoveries_total",
                        "Recovery actions by action and result",
                    ),
                    &["action", "result"],
                )
                .expect("m"),
            ),
            ws_rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_agent_frames_rejected_total",
                        "Agent frames or connections refused, by reason",
                    ),
                    &["reason"],
                )
                .expect("m"),
            ),
            agents_connected: reg(
                &r,
                prometheus::IntGauge::new("hil_agents_connected", "Open agent websocket sessions")
                    .expect("m"),
            ),
            canary_runs: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_field_canary_runs_total",
                        "Field-mode canary inferences",
                    ),
                    &["board"],
                )
                .expect("m"),
            ),
            canary_mismatches: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_field_canary_mismatches_total",
                        "Field-mode canary inferences that differ from golden",
                    ),
                    &["board"],
                )
                .expect("m"),
            ),
            infra_retries: reg(
                &r,
                IntCounter::new(
                    "hil_trial_infra_retries_total",
                    "Trials re-queued after an infrastructure error",
                )
                .expect("m"),
            ),
            layer_trials: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_campaign_layer_trials_total",
                        "Finalised counted trials of an active campaign, by model and injected layer",
                    ),
                    &["campaign", "model", "layer"],
                )
                .expect("m"),
            ),
            layer_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_campaign_layer_failures_total",
                        "Finalised failed trials of an active campaign, by model and injected layer",
                    ),
                    &["campaign", "model", "layer"],
                )
                .expect("m"),
            ),
            voltage_trials: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_campaign_voltage_trials_total",
                        "Finalised counted trials of an active campaign, by model and rail set-point",
                    ),
                    &["campaign", "model", "rail", "millivolts"],
                )
                .expect("m"),
            ),
            voltage_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "hil_campaign_voltage_failures_total",
                        "Finalised failed trials of an active campaign, by model and rail set-point",
                    ),
                    &["campaign", "model", "rail", "millivolts"],
                )
                .expect("m"),
            ),
            breakdowns: Mutex::new(BTreeMap::new()),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts one finalised trial in the per-layer and per-voltage breakdowns, with the
    /// report's rule: only outcomes that `trial::counts` enter n, failures are
    /// `Outcome::is_failure`. Trials without a voltage point only count per layer.
    pub fn count_final_trial(
        &self,
        campaign: &str,
        model: &str,
        layer: &str,
        voltages: &[(String, u32)],
        outcome: proto::wire::Outcome,
    ) {
        if !crate::scheduling::trial::counts(outcome) {
            return;
        }
        let fail = outcome.is_failure();
        let mut keys = self.breakdowns.lock().unwrap_or_else(|e| e.into_inner());
        let k = keys.entry(campaign.to_string()).or_default();
        let l = [campaign, model, layer];
        self.layer_trials.with_label_values(&l).inc();
        // Create the failure series at 0 too, so failure-rate ratios exist from the start.
        let f = self.layer_failures.with_label_values(&l);
        if fail {
            f.inc();
        }
        k.layers.insert([model.to_string(), layer.to_string()]);
        for (rail, mv) in voltages {
            let mv = mv.to_string();
            let v = [campaign, model, rail.as_str(), mv.as_str()];
            self.voltage_trials.with_label_values(&v).inc();
            let f = self.voltage_failures.with_label_values(&v);
            if fail {
                f.inc();
            }
            k.voltages.insert([model.to_string(), rail.clone(), mv]);
        }
    }

    /// Drop every series of a finished campaign.
    pub fn forget_campaign(&self, id: &str) {
        let keys = self
            .breakdowns
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        if let Some(k) = keys {
            for [m, l] in &k.layers {
                let _ = self.layer_trials.remove_label_values(&[id, m, l]);
                let _ = self.layer_failures.remove_label_values(&[id, m, l]);
            }
            for [m, r, mv] in &k.voltages {
                let _ = self.voltage_trials.remove_label_values(&[id, m, r, mv]);
                let _ = self.voltage_failures.remove_label_values(&[id, m, r, mv]);
            }
        }
        let _ = self.campaign_trials_planned.remove_label_values(&[id]);
        let _ = self.campaign_trials_done.remove_label_values(&[id]);
        let _ = self.campaign_progress.remove_label_values(&[id]);
        for o in proto::wire::Outcome::ALL {
            let _ = self
                .campaign_outcomes
                .remove_label_values(&[id, o.as_str()]);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_and_forgets_campaign_series() {
        let m = Metrics::new();
        m.campaign_outcomes
            .with_label_values(&["7", "masked"])
            .inc();
        m.campaign_progress.with_label_values(&["7"]).set(0.5);
        assert!(
            m.render()
                .contains("hil_campaign_progress_ratio{campaign=\"7\"} 0.5")
        );
        m.forget_campaign("7");
        assert!(!m.render().contains("campaign=\"7\""));
    }

    #[test]
    fn breakdowns_follow_the_report_rule_and_are_forgotten() {
        use proto::wire::Outcome;
        let m = Metrics::new();
        let v = vec![("vccint".to_string(), 560u32)];
        m.count_final_trial("3", "tiny", "enc1", &v, Outcome::SdcCritical);
        m.count_final_trial("3", "tiny", "enc1", &v, Outcome::Masked);
        // Refused / abandoned trials are excluded from n, like in the report.
        m.count_final_trial("3", "tiny", "enc1", &v, Outcome::Refused);
        m.count_final_trial("3", "tiny", "enc1", &v, Outcome::InfraError);
        m.count_final_trial("3", "tiny", "dec1", &[], Outcome::Masked);
        let t = m.render();
        assert!(
            t.contains(
                "hil_campaign_layer_trials_total{campaign=\"3\",layer=\"enc1\",model=\"tiny\"} 2"
            ),
            "{t}"
        );
        assert!(t.contains(
            "hil_campaign_layer_failures_total{campaign=\"3\",layer=\"enc1\",model=\"tiny\"} 1"
        ));
        assert!(t.contains(
            "hil_campaign_layer_failures_total{campaign=\"3\",layer=\"dec1\",model=\"tiny\"} 0"
        ));
        assert!(t.contains(
            "hil_campaign_voltage_trials_total{campaign=\"3\",millivolts=\"560\",model=\"tiny\",rail=\"vccint\"} 2"
        ));
        assert!(t.contains(
            "hil_campaign_voltage_failures_total{campaign=\"3\",millivolts=\"560\",model=\"tiny\",rail=\"vccint\"} 1"
        ));
        m.count_final_trial("4", "tiny", "enc1", &v, Outcome::Masked);
        m.forget_campaign("3");
        let t = m.render();
        assert!(!t.contains("campaign=\"3\""), "{t}");
        assert!(t.contains("campaign=\"4\""));
    }

    /// `promtool check metrics` lints names, help and types; run it when installed.
    #[test]
    fn promtool_accepts_the_exposition() {
        let m = Metrics::new();
        m.board_up.with_label_values(&["b0"]).set(1);
        m.board_health.with_label_values(&["b0", "good"]).set(1);
        m.rail_volts.with_label_values(&["b0", "vccint"]).set(0.85);
        m.rail_min_volts
            .with_label_values(&["b0", "vccint"])
            .set(0.55);
        m.rail_max_volts
            .with_label_values(&["b0", "vccint"])
            .set(0.9);
        m.inference_latency
            .with_label_values(&["tiny-relu-int8"])
            .observe(0.002);
        m.trial_outcomes
            .with_label_values(&["tiny-relu-int8", "masked"])
            .inc();
        m.recoveries.with_label_values(&["power_cycle", "ok"]).inc();
        m.ingest_batch_seconds
            .with_label_values::<&str>(&[])
            .observe(0.001);
        let text = m.render();
        let Ok(mut child) = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("promtool not installed; skipping the lint");
            return;
        };
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
