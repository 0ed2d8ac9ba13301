//! A small `log` backend: one line per record to stderr or to a file (`[log]` config).
//! Log lines never contain PINs or key bytes: callers log handles, names and codes only.

use parking_lot::Mutex;
use std::io::Write;

struct Logger {
    level: log::LevelFilter,
    file: Option<Mutex<std::fs::File>>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        // Other crates' lines (cryptoki logs each backend mechanism it does not know as an
        // error) are diagnostics for cmkp11's developers: shown only at debug and trace.
        m.level() <= self.level
            && (m.target().starts_with("cmkp11") || self.level >= log::LevelFilter::Debug)
    }

    fn log(&self, r: &log::Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = format!(
            "cmkp11[{}]: {}: {}\n",
            std::process::id(),
            r.level().as_str().to_lowercase(),
            r.args()
        );
        match &self.file {
            Some(f) => {
                let _ = f.lock().write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Installs the logger once per process; later calls only adjust the level.
pub fn init(cfg: &crate::config::Log) {
    let level = cfg.level.parse().unwrap_or(log::LevelFilter::Warn);
    let file = cfg.file.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .ok()
            .map(Mutex::new)
    });
    // set_boxed_logger fails if a logger is already installed (a second C_Initialize, or an
    // application that installed its own): then only the level changes.
    let _ = log::set_boxed_logger(Box::new(Logger { level, file }));
    log::set_max_level(level);
}

/// Logging before a configuration is known: warnings and errors to stderr.
pub fn init_default() {
    init(&crate::config::Log::default());
}
