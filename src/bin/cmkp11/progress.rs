//! A progress bar on stderr, drawn only when stderr is a terminal.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Progress of a long file operation.
pub struct Progress {
    label: &'static str,
    total: u64,
    done: u64,
    start: Instant,
    drawn: Option<Instant>,
    enabled: bool,
}

impl Progress {
    /// A bar for `total` bytes; drawn only if `wanted` and stderr is a terminal.
    pub fn new(label: &'static str, total: u64, wanted: bool) -> Progress {
        Progress {
            label,
            total,
            done: 0,
            start: Instant::now(),
            drawn: None,
            enabled: wanted && std::io::stderr().is_terminal(),
        }
    }

    /// Bytes processed so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Records `n` more bytes; redraws at most ten times a second.
    pub fn add(&mut self, n: u64) {
        self.done += n;
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        if self
            .drawn
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(100))
        {
            return;
        }
        self.drawn = Some(now);
        self.draw();
    }

    fn draw(&self) {
        const WIDTH: u64 = 30;
        let frac = if self.total == 0 {
            1.0
        } else {
            (self.done as f64 / self.total as f64).min(1.0)
        };
        let filled = (frac * WIDTH as f64) as u64;
        let bar: String = (0..WIDTH)
            .map(|i| if i < filled { '#' } else { '-' })
            .collect();
        let secs = self.elapsed().max(1e-6);
        let mbps = self.done as f64 / secs / 1e6;
        let mut e = std::io::stderr().lock();
        let _ = write!(
            e,
            "\r{} [{bar}] {:>3.0}% {:.1}/{:.1} MB {:.0} MB/s ",
            self.label,
            frac * 100.0,
            self.done as f64 / 1e6,
            self.total as f64 / 1e6,
            mbps
        );
        let _ = e.flush();
    }

    /// Draws the final state and ends the line.
    pub fn finish(&self) {
        if self.enabled {
            self.draw();
            eprintln!();
        }
    }

    /// Ends the line after a failure, leaving the bar where it stopped.
    pub fn abandon(&self) {
        if self.enabled && self.drawn.is_some() {
            eprintln!();
        }
    }
}
