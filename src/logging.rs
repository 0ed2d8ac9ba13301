//! A small `log` backend: one line per record to stderr or to a file (`[log]` config).
//! Log lines never contain PINs or key bytes: callers log handles, names and codes only.
//! The logger is installed once per process; each `C_Initialize` applies its own `[log]`.

use parking_lot::RwLock;
use std::io::Write;

struct Sink {
    level: log::LevelFilter,
    file: Option<std::fs::File>,
}

struct Logger {
    sink: RwLock<Sink>,
}

static LOGGER: Logger = Logger {
    sink: RwLock::new(Sink {
        level: log::LevelFilter::Warn,
        file: None,
    }),
};

impl log::Log for Logger {
    fn enabled(&self, m: &log::Metadata) -> bool {
        let level = self.sink.read().level;
        // Other crates' lines (cryptoki logs each backend mechanism it does not know as an
        // error) are diagnostics for cmkp11's developers: shown only at debug and trace.
        m.level() <= level && (m.target().starts_with("cmkp11") || level >= log::LevelFilter::Debug)
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
        match &self.sink.read().file {
            // One write call per line: lines from several threads never interleave.
            Some(f) => {
                let _ = (&*f).write_all(line.as_bytes());
            }
            None => {
                let _ = std::io::stderr().write_all(line.as_bytes());
            }
        }
    }

    fn flush(&self) {}
}

/// Applies a `[log]` configuration (installing the logger the first time).
pub fn init(cfg: &crate::config::Log) {
    let level = cfg.level.parse().unwrap_or(log::LevelFilter::Warn);
    let file = cfg.file.as_ref().and_then(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| {
                eprintln!(
                    "cmkp11: cannot open log file {}: {e}; logging to stderr",
                    p.display()
                )
            })
            .ok()
    });
    *LOGGER.sink.write() = Sink { level, file };
    // Fails only if the application installed its own `log` logger: then cmkp11's lines go
    // there, which is what such an application wants.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Logging before a configuration is known: warnings and errors to stderr.
pub fn init_default() {
    init(&crate::config::Log::default());
}
