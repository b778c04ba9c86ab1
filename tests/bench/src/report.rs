//! The table every run prints: one row per figure, with its baseline, the ratio, the target and
//! the machine's load average when it was measured.

use std::fmt::Write as _;

use serde::Serialize;

use crate::machine::Machine;

/// One measured figure.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Scenario letter (`a`–`g`).
    pub scenario: &'static str,
    /// What was measured.
    pub figure: String,
    /// The value, with its unit.
    pub value: String,
    /// What it is compared with, with its value (empty when the row is itself a baseline).
    pub baseline: String,
    /// value ÷ baseline (NaN when there is none).
    pub ratio: f64,
    /// The target, if the issue sets one.
    pub target: String,
    /// Whether the target is met (`None` when there is no target).
    pub met: Option<bool>,
    /// `/proc/loadavg` (1, 5, 15 min) when the figure was taken.
    pub load: String,
}

impl Row {
    /// A figure without a target.
    pub fn new(scenario: &'static str, figure: impl Into<String>, value: impl Into<String>) -> Row {
        Row {
            scenario,
            figure: figure.into(),
            value: value.into(),
            baseline: String::new(),
            ratio: f64::NAN,
            target: String::new(),
            met: None,
            load: crate::machine::load_average(),
        }
    }

    /// Adds the baseline and the ratio.
    pub fn against(mut self, baseline: impl Into<String>, ratio: f64) -> Row {
        self.baseline = baseline.into();
        self.ratio = ratio;
        self
    }

    /// Adds a target and whether it is met.
    pub fn target(mut self, target: impl Into<String>, met: bool) -> Row {
        self.target = target.into();
        self.met = Some(met);
        self
    }

    /// Overrides the load average (for figures taken earlier than the row is built).
    pub fn load(mut self, load: String) -> Row {
        self.load = load;
        self
    }
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The machine.
    pub machine: Machine,
    /// When the run started (RFC 3339, UTC).
    pub started: String,
    /// Load average at the start.
    pub load_at_start: String,
    /// Load average at the end.
    pub load_at_end: String,
    /// The figures.
    pub rows: Vec<Row>,
    /// Scenarios that could not be measured, with why.
    pub skipped: Vec<(String, String)>,
    /// Extra observations (e.g. how a hostile run went).
    pub notes: Vec<String>,
}

/// `x` with 2–3 significant decimals, or `n/a`.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

impl Report {
    /// The report as a Markdown document: machine, table, notes.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let mut out = String::new();
        let _ = writeln!(out, "jobhook-bench run of {}", self.started);
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "- machine: {} × {}, {:.1} GiB RAM, Linux {}",
            m.cores, m.cpu, m.ram_gib, m.kernel
        );
        let _ = writeln!(
            out,
            "- toolchain: {}; wasmtime {}; host built at opt-level {}",
            m.rustc,
            m.wasmtime.join(" / "),
            m.opt_level
        );
        let _ = writeln!(
            out,
            "- load average (1/5/15 min): {} at start, {} at end",
            self.load_at_start, self.load_at_end
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "| | figure | value | baseline (same run) | ratio | target | met | load at the time |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for r in &self.rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let ratio = if r.ratio.is_finite() {
                format!("{}×", num(r.ratio))
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                r.scenario, r.figure, r.value, r.baseline, ratio, r.target, met, r.load
            );
        }
        if !self.skipped.is_empty() {
            let _ = writeln!(out);
            for (what, why) in &self.skipped {
                let _ = writeln!(out, "- not measured: {what}: {why}");
            }
        }
        if !self.notes.is_empty() {
            let _ = writeln!(out);
            for note in &self.notes {
                let _ = writeln!(out, "- {note}");
            }
        }
        out
    }
}
