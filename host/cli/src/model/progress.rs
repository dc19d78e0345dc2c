//! A progress bar (indicatif) for pushes, verifications and replication.
//! It draws on stderr when that is a terminal; a line per finished file
//! goes to stdout either way, so that logs and scripts see progress too.

use breakwater_store::model::{Progress, ProgressEvent};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub struct Bar {
    bar: ProgressBar,
    verb: &'static str,
}

impl Bar {
    pub fn new(verb: &'static str) -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{msg:30!} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        Self { bar, verb }
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn line(&self, text: String) {
        self.bar.suspend(|| println!("{text}"));
    }
}

impl Progress for Bar {
    fn event(&self, event: ProgressEvent) {
        match event {
            ProgressEvent::Start { total_bytes, .. } => {
                self.bar.set_length(total_bytes);
                self.bar.set_position(0);
            }
            ProgressEvent::File { path, .. } => self.bar.set_message(path),
            ProgressEvent::Skipped { path, size } => {
                self.bar.inc(size);
                self.line(format!("{path}: already there, skipped"));
            }
            ProgressEvent::Bytes(n) => self.bar.inc(n),
            ProgressEvent::FileDone { path } => self.line(format!("{path}: {}", self.verb)),
        }
    }
}
