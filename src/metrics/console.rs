//! Console progress: an `indicatif` bar on a terminal, plain lines
//! otherwise, or one JSON object per step for a program to follow.

use super::StepReport;
use crate::config::ProgressMode;
use indicatif::{ProgressBar, ProgressStyle};
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Step progress for one run.
pub struct Progress {
    bar: Option<ProgressBar>,
    json: bool,
    total: u64,
    print_every: u64,
    start: Instant,
    first_step: u64,
    /// A line could not be written: stdout's reader is gone.
    lost: AtomicBool,
}

impl Progress {
    /// Progress over steps `first_step..=total`.
    pub fn new(mode: ProgressMode, total: u64, first_step: u64, print_every: u64) -> Self {
        let use_bar = match mode {
            ProgressMode::Bar => true,
            ProgressMode::Lines | ProgressMode::Json => false,
            ProgressMode::Auto => std::io::stdout().is_terminal(),
        };
        let bar = use_bar.then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} {msg} (eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix("train");
            bar.set_position(first_step);
            bar
        });
        Self {
            bar,
            json: mode == ProgressMode::Json,
            total,
            print_every,
            start: Instant::now(),
            first_step,
            lost: AtomicBool::new(false),
        }
    }

    /// Whether a line failed to reach stdout (a closed pipe): nobody is
    /// following the run any more.
    pub fn output_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    fn say(&self, line: &str) {
        if !say(line) {
            self.lost.store(true, Ordering::Relaxed);
        }
    }

    /// Show one step.
    pub fn step(&mut self, r: &StepReport) {
        if self.json {
            self.say(&progress_json(r, self.total).to_string());
            return;
        }
        let msg = format!(
            "loss {:.4} | aux {:.3} | drop {:.1}% | {:.0} tok/s",
            r.loss_total,
            r.loss_aux,
            r.drop_rate() * 100.0,
            r.tokens_per_s
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(r.step);
                bar.set_message(msg);
            }
            None => {
                if r.step.is_multiple_of(self.print_every)
                    || r.step == self.total
                    || r.step == self.first_step + 1
                {
                    let done = (r.step - self.first_step) as f64;
                    let per_step = self.start.elapsed().as_secs_f64() / done.max(1.0);
                    let eta = per_step * (self.total - r.step) as f64;
                    self.say(&format!(
                        "step {}/{} | {msg} | lm {:.4} | z {:.3} | lr {:.2e} | eta {}",
                        r.step,
                        self.total,
                        r.loss_lm,
                        r.loss_z,
                        r.lr,
                        format_secs(eta)
                    ));
                }
            }
        }
    }

    /// Print a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => self.say(line),
        }
    }

    /// Finish the bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

/// Write one line to stdout; false when it could not be written (its pipe
/// has closed). Never panics, unlike `println!`.
pub fn say(line: &str) -> bool {
    writeln!(std::io::stdout().lock(), "{line}").is_ok()
}

/// The machine-readable progress line of one step.
pub fn progress_json(r: &StepReport, total: u64) -> serde_json::Value {
    serde_json::json!({
        "step": r.step,
        "steps": total,
        "loss": r.loss_total,
        "lm": r.loss_lm,
        "aux": r.loss_aux,
        "z": r.loss_z,
        "drop_rate": r.drop_rate(),
        "lr": r.lr,
        "tokens_per_s": r.tokens_per_s,
    })
}

/// "1h02m", "3m05s", "42s".
pub fn format_secs(s: f64) -> String {
    let s = s.max(0.0).round() as u64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec:02}s"),
        (h, m, _) => format!("{h}h{m:02}m"),
    }
}
