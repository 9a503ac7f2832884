//! snapctl's progress observer: an indicatif bar over logical bytes on stderr, drawn
//! only when stderr is a terminal and stdout is not for `--json`; warnings always.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use snapreg_client::progress::ProgressObserver;

pub struct Bar {
    bar: ProgressBar,
}

impl Bar {
    /// `show`: the command's output is for a person (no `--json`).
    pub fn new(show: bool) -> Self {
        let bar = if show && std::io::stderr().is_terminal() {
            let b = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>8} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}",
                )
                .expect("static template")
                .progress_chars("=> "),
            );
            b
        } else {
            ProgressBar::hidden()
        };
        Bar { bar }
    }
}

impl ProgressObserver for Bar {
    fn started(&self, verb: &str) {
        self.bar.set_prefix(verb.to_string());
    }

    fn total_grew(&self, bytes: u64) {
        self.bar.inc_length(bytes);
    }

    fn advanced(&self, bytes: u64) {
        self.bar.inc(bytes);
    }

    fn working_on(&self, item: &str) {
        self.bar.set_message(item.to_string());
    }

    fn finished(&self) {
        self.bar.finish_and_clear();
    }

    fn warning(&self, message: &str) {
        // Above the bar, which redraws below it.
        self.bar.suspend(|| eprintln!("snapctl: {message}"));
    }
}
